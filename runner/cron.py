"""Cron expressions for workflow schedules: parsed by Celery's crontab, next fire time found here."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from celery.schedules import ParseException, crontab

SEARCH_DAYS = 366 * 5  # long enough for 29 February on a given weekday


class CronError(ValueError):
    pass


def parse(expression: str) -> crontab:
    """A five-field expression: minute hour day-of-month month day-of-week (UTC)."""
    fields = expression.split()
    if len(fields) != 5:
        raise CronError(f"{expression!r}: a cron expression has five fields: minute hour day month weekday")
    minute, hour, day_of_month, month_of_year, day_of_week = fields
    try:
        # By keyword: crontab's positional order is not cron's.
        return crontab(minute=minute, hour=hour, day_of_month=day_of_month,
                       month_of_year=month_of_year, day_of_week=day_of_week)
    except (ValueError, TypeError, ParseException) as error:  # ParseException: '1,,2', '*/-1'
        raise CronError(f"{expression!r}: {error}") from None


def next_fire(expression: str, after: float) -> float:
    """The first whole minute strictly after `after` (a UNIX time) that the expression names."""
    spec = parse(expression)
    start = datetime.fromtimestamp(after, timezone.utc).replace(second=0, microsecond=0)
    hours, minutes = sorted(spec.hour), sorted(spec.minute)
    for offset in range(SEARCH_DAYS):
        day = start + timedelta(days=offset)
        weekday = (day.weekday() + 1) % 7  # cron counts Sunday as 0
        if day.day not in spec.day_of_month or day.month not in spec.month_of_year or weekday not in spec.day_of_week:
            continue
        for hour in hours:
            for minute in minutes:
                moment = day.replace(hour=hour, minute=minute)
                if moment.timestamp() > after:
                    return moment.timestamp()
    raise CronError(f"{expression!r} never fires")
