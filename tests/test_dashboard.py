"""The dashboard in a real browser (headless Chromium driven by Playwright) against a real stack:
the queue depths it shows are the monitor's, processes and beat's schedule show, Retry on a failed
task sends it again; user data is shown as text, never run. Also the data behind it: beat's queue
samples and published schedule, through the embedded broker and a real Redis."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import time
from pathlib import Path

import pytest

from runner.topology import QUEUE_NAMES
from tests.helpers import REPO, wait_until

CHROMIUM = "/usr/bin/chromium"  # Debian's package; CI installs it (.ci/run)
# Headless, and nothing that reaches for the network by itself (the machine may have none).
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOT = Path("/tmp/dify-local-dashboard.png")  # the last run's, for a person to look at (and one per size)
LAPTOPS = ((1440, 900), (1366, 768))
UNCONSUMED = ("ops_trace",)  # its only worker (`spare`) is stopped: messages wait there

STACK = "broker: dify-local serve broker\napi: dify-local serve api\nbeat: dify-local serve beat\n"
WORKER = "worker: dify-local serve worker -I tests.support.flaky_tasks -I tests.support.slow_tasks -Q {queues}\n"
SPARE = "spare: dify-local serve worker -Q {queues}\n"  # `up` refuses a queue no worker consumes
XSS = '<img src=x onerror="window.__dashboardXss=1"><script>window.__dashboardXss=2</script>'


def _needed(what: str) -> None:
    """Skip for want of `what`, or fail when CI says the browser must be there (.ci/run)."""
    if os.environ.get("DIFY_LOCAL_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{what} is required here (DIFY_LOCAL_REQUIRE_BROWSER=1)")
    pytest.skip(f"{what} is not available")


@pytest.fixture
def browser(tmp_path: Path):
    """A fresh headless Chromium profile, closed (with every process of it) at the end."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _needed("Playwright for Python (pip install -e '.[test]')")
    executable = CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")
    if executable is None:
        _needed("Debian's chromium (apt-get install chromium)")
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=executable, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": LAPTOPS[0][0], "height": LAPTOPS[0][1]})
        try:
            yield context
        finally:
            context.close()


def client(project, env: dict | None = None):
    from runner.celery_app import create_celery_app
    from runner.settings import load_settings

    return create_celery_app(load_settings(project.dir, environ={**project.env, **(env or {})}),
                             register_tasks=False)


def monitor_depths(project, env: dict) -> dict[str, int]:
    """The depths as the command line reads them (`dify-local queues --json`)."""
    result = project.run("queues", "--json", env=env)
    assert result.returncode == 0, result.stderr
    return {queue["name"]: queue["depth"] for queue in json.loads(result.stdout)["queues"]}


def health_answer(message) -> bool:
    """The browser's line for /health's 503: the stack's state, which the page shows, not a fault of it."""
    return message.location.get("url", "").endswith("/health") and "503" in message.text


def open_dashboard(browser, project, problems: list[str]):
    page = browser.new_page()
    page.on("console", lambda message: problems.append(message.text)
            if message.type == "error" and not health_answer(message) else None)
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.goto(f"http://127.0.0.1:{project.api_port}/dashboard")
    refreshed(page, 1)
    return page


def refreshed(page, times: int = 1) -> None:
    """Wait until the page has redrawn `times` more times (each refresh reads every endpoint)."""
    done = int(page.evaluate("() => Number(document.body.dataset.refreshed || 0)")) + times
    page.wait_for_function(f"() => Number(document.body.dataset.refreshed || 0) >= {done}", timeout=30000)


def shown_depths(page) -> dict[str, int]:
    return dict(page.locator("#queues tr[data-queue]").evaluate_all(
        "rows => rows.map(row => [row.dataset.queue, Number(row.querySelector('.depth').dataset.depth)])"))


def screenshots(page, tmp_path: Path) -> list[Path]:
    """A full-page screenshot at each laptop size, in the test's folder; the first also at SCREENSHOT."""
    written = []
    page.evaluate("() => window.scrollTo(0, 0)")  # a click scrolled it; the sticky bar would be drawn midway
    for width, height in LAPTOPS:
        page.set_viewport_size({"width": width, "height": height})
        refreshed(page)
        path = tmp_path / f"dashboard-{width}x{height}.png"
        page.screenshot(path=str(path), full_page=True)
        assert page.evaluate("() => document.documentElement.scrollWidth") <= width, "the page scrolls sideways"
        written.append(path)
    stable = [SCREENSHOT, *(SCREENSHOT.with_name(f"{SCREENSHOT.stem}-{path.stem.split('-')[-1]}.png")
                            for path in written)]
    for source, target in zip([written[0], *written], stable, strict=True):
        shutil.copyfile(source, target)
    for path in (*written, *stable):
        print(f"dashboard screenshot: {path}")
    return written


def test_dashboard_shows_the_stack_and_retries_a_failed_task(project, browser, tmp_path):
    others = ",".join(name for name in QUEUE_NAMES if name not in UNCONSUMED)
    procfile = STACK + WORKER.format(queues=others) + SPARE.format(queues=",".join(UNCONSUMED))
    (project.dir / "Procfile").write_text(procfile)
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "DIFY_LOCAL_QUEUE_SAMPLE_INTERVAL": "1", "CELERY_WORKER_AMOUNT": "2"}
    project.up(env=env)
    stopped = project.run("stop", "spare")
    assert stopped.returncode == 0, stopped.stderr
    import tests.support.flaky_tasks  # noqa: F401  (registers tests.flaky and tests.sleep with the client)
    import tests.support.slow_tasks  # noqa: F401

    app = client(project, env)
    flag = project.dir / "flag"
    flaky = app.send_task("tests.flaky", args=[str(flag)], queue="workflow_storage")
    app.send_task("tests.sleep", args=[60, str(project.dir / "runs"), "long"], queue="dataset")  # a task running
    app.send_task("tests.sleep", args=[1, str(project.dir / "runs"), "typo"], queue="reprots")  # not one of the 16
    for index, subject in enumerate(["Welcome", f"Hi {XSS}", "Your digest"]):
        status, sent = project.api.post("/v1/tasks/send_mail_task",
                                        {"args": [f"user{index}@example.com", subject, "text"]})
        assert status == 202, sent
    for name, priority in (("first", None), ("second", 6), ("third", None)):  # one in a priority sub-list
        body = {"args": ["app1", name, {"n": 1}]}
        status, sent = project.api.post("/v1/tasks/process_trace_tasks", {**body, "priority": priority} if priority
                                        else body)
        assert status == 202, sent
    failed = wait_until(lambda: [row for row in project.api.get("/v1/failed")[1]["failed"]
                                 if row["task_id"] == flaky.id], 60, "the flaky task to fail for good")[0]

    problems: list[str] = []
    page = open_dashboard(browser, project, problems)

    # the queue depths shown are the monitor's (the only ones not 0 are those nobody consumes)
    def same_depths():
        shown, read = shown_depths(page), monitor_depths(project, env)
        return read if shown == read else refreshed(page)
    depths = wait_until(same_depths, 60, "the dashboard's depths to match the monitor's", interval=0)
    assert depths["ops_trace"] == 3 and depths["reprots"] == 1, depths
    # beat samples them: a line in each chart, and the samples in the database
    queue = page.locator('#queues tr[data-queue="ops_trace"]')
    wait_until(lambda: queue.locator("svg.spark path.line").count() or refreshed(page), 30,
               "the chart of ops_trace to have a line", interval=0)
    with sqlite3.connect(project.database) as db:
        assert db.execute("SELECT MAX(depth) FROM queue_samples WHERE queue = 'ops_trace'").fetchone()[0] == 3
    assert "none" in queue.inner_text()  # no consumer, and it says so

    # processes, from `up` over its control socket
    processes = {row.get_attribute("data-process"): row.inner_text()
                 for row in page.locator("#processes tr[data-process]").all()}
    assert set(processes) == {"broker", "api", "beat", "worker", "spare"}, processes
    assert "ready" in processes["worker"] and "stopped" in processes["spare"] and "this" in processes["api"]

    # beat's schedule, as beat published it, with next runs
    entries = {row.get_attribute("data-entry"): row for row in page.locator("#beat tr[data-entry]").all()}
    assert {"check_upgradable_plugin_task", "workflow_schedule_poller_task", "clean_queue_samples_task"} <= set(entries)
    next_run = entries["check_upgradable_plugin_task"].locator(".next-run").inner_text()
    assert next_run.startswith("in ") or next_run == "due now", next_run
    assert "every 15 minutes" in entries["check_upgradable_plugin_task"].inner_text()

    # the worker and what it runs
    wait_until(lambda: "tests.sleep" in page.locator("#workers").inner_text() or refreshed(page), 30,
               "the running task in the workers card", interval=0)

    # user data is text: the subject shows as typed, nothing of it ran
    wait_until(lambda: f"Hi {XSS}" in page.locator("#mail").inner_text() or refreshed(page), 30,
               "the mail's subject in the outbox card", interval=0)

    # refreshing keeps the page where it is and leaves alone what did not change (no flicker)
    page.evaluate("() => { window.scrollTo(0, 300); document.querySelector('#mail tbody').dataset.kept = '1'; }")
    refreshed(page, 2)
    assert page.evaluate("() => window.scrollY") == 300
    assert page.locator("#mail tbody[data-kept]").count() == 1
    assert page.evaluate("() => window.__dashboardXss === undefined")
    assert page.locator("main img, main script").count() == 0

    # Retry on the failed task sends it again: a new task id, the row marked retried, and it runs
    flag.write_text("there now")
    row = page.locator(f'#failed tr[data-failed="{failed["id"]}"]')
    row.locator("button.retry").click()
    retried = wait_until(lambda: (lambda body: body if body["retry_task_id"] else None)(
        project.api.get(f"/v1/failed/{failed['id']}")[1]), 30, "the failed task to be marked retried")
    new_id = retried["retry_task_id"]
    assert new_id != flaky.id and retried["retried_at"]
    wait_until(lambda: project.api.get(f"/v1/tasks/{new_id}")[1]["state"] == "SUCCESS", 30, "the retried task to run")
    assert project.api.get(f"/v1/tasks/{new_id}")[1]["result"] == "there now"
    wait_until(lambda: "retried" in row.inner_text() or refreshed(page), 30, "the row to show it retried",
               interval=0)
    assert new_id in page.locator("#failed .flash").inner_text()
    wait_until(lambda: page.locator(f'#runs tr[data-run="{new_id}"]').count() or refreshed(page), 30,
               "the new run in the task runs", interval=0)

    screenshots(page, tmp_path)
    assert not problems, problems


def test_dashboard_without_up_says_so(project, browser, tmp_path):
    project.serve_broker()
    project.start("serve", "api")
    wait_until(lambda: project.api.status("/health/api") == 200, 30, "the API to be healthy")
    status, body = project.api.get("/v1/processes")
    assert status == 200 and body["running"] is False and body["supervised"] is False and body["processes"] == []
    assert "not running under `dify-local up`" in body["message"]
    status, beat = project.api.get("/v1/beat")
    assert status == 200 and beat["running"] is False and beat["entries"] == []
    assert {entry["flag"] for entry in beat["disabled"]} >= {"ENABLE_CLEAN_MESSAGES"}

    problems: list[str] = []
    page = open_dashboard(browser, project, problems)
    assert "not running under dify-local up:" in page.locator("#processes").inner_text()
    health = page.locator("#health").inner_text()
    assert "workers not running" in health and "beat not running" in health, health  # no heartbeats
    assert "Beat is not running" in page.locator("#beat").inner_text()
    assert "No worker answered" in page.locator("#workers").inner_text()
    assert "No failed tasks" in page.locator("#failed").inner_text()
    assert "outbox is empty" in page.locator("#mail").inner_text()
    assert not problems, problems


def test_bad_queries_are_400s(project):
    project.serve_broker()
    project.start("serve", "api")
    wait_until(lambda: project.api.status("/health/api") == 200, 30, "the API to be healthy")
    for path, field in (("/v1/queues?history=0", "history"), ("/v1/queues?history=1441", "history"),
                        ("/v1/queues?histry=5", "histry"), ("/v1/task-runs?limit=501", "limit"),
                        ("/v1/task-runs?state=DONE", "state"), ("/v1/task-runs?limit=%C2%B2", "limit")):
        status, body = project.api.get(path)
        assert status == 400 and field in body["error"], (path, body)
    status, body = project.api.get("/dashboard/static/../__init__.py")
    assert status == 404
    status, page = project.api.get("/dashboard")
    assert status == 200 and "<title>dify-local</title>" in page


def test_samples_and_schedule_through_a_real_redis(project, redis_server):
    """With a real Redis as the broker, beat samples the queues and publishes its schedule there."""
    project.up("--broker", f"{redis_server}/4", env={"DIFY_LOCAL_QUEUE_SAMPLE_INTERVAL": "1"})
    status, beat = project.api.get("/v1/beat")
    assert status == 200 and beat["running"], beat
    entries = {entry["task"]: entry for entry in beat["entries"]}
    assert set(entries) == {"check_upgradable_plugin_task", "workflow_schedule_poller_task", "clean_queue_samples_task"}
    poller = entries["workflow_schedule_poller_task"]
    assert poller["queue"] == "schedule_poller" and poller["schedule"] == "every 1 minute(s)"
    assert time.time() - 5 < poller["next_run_at"] <= time.time() + 61

    import redis

    server = redis.Redis.from_url(f"{redis_server}/4")
    assert server.exists("dify-local:beat:schedule")
    wait_until(lambda: len(project.api.get("/v1/queues?history=5")[1]["queues"][0]["history"]) >= 2, 30,
               "two samples of the queues")
    status, queues = project.api.get("/v1/queues?history=5")
    assert status == 200 and queues["history"]["minutes"] == 5 and queues["sample_interval"] == 1
    assert all(queue["consumers"] for queue in queues["queues"]), queues  # the worker consumes all 16
