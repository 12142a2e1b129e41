"""`broker info`: what the broker in use is and holds, read from its INFO and the queue keys.

It connects as the worker does (kombu, with the settings' transport and TLS options), so a
sentinel:// or rediss:// URL that works here works for the stack, and a refusal reads the same.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import time
from typing import Any, Iterator

import click

from runner import topology
from runner.cli import fail, main, settings_from
from runner.monitor.format import duration
from runner.settings import Settings, mask_url
from runner.settings.kinds import host_port
from runner.settings.loader import IF_POSSIBLE
from runner.strict_json import loads_or_none

CONNECT_TIMEOUT = 5.0  # seconds; bounds each socket operation, so a silent host cannot hang the command
UNACKED_PARSE_LIMIT = 10_000  # unacked messages read one by one to count them per queue; beyond: total only


@main.group()
def broker() -> None:
    """The broker in use: the embedded one, or the Redis that CELERY_BROKER_URL names."""


@broker.command("info")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@click.pass_context
def info(ctx: click.Context, as_json: bool) -> None:
    """Server, uptime, clients, memory, persistence, keys per database and the 16 queues."""
    settings = settings_from(ctx, make_password=IF_POSSIBLE)
    try:
        with connected(settings) as channel:
            report = gather(settings, channel)
    except Exception as error:  # every way of failing to reach it ends as one line
        from runner.broker_config import explain_broker_error

        fail(explain_broker_error(error, settings, settings.broker_url)[1])
    click.echo(json.dumps(report, indent=2) if as_json else render(report))


@contextlib.contextmanager
def connected(settings: Settings) -> Iterator[Any]:
    """A kombu Redis channel to the broker, with no retries: one try, then the error."""
    from runner.broker_config import broker_connection

    connection = broker_connection(settings, timeout=CONNECT_TIMEOUT)
    try:
        connection.ensure_connection(max_retries=0)
        yield connection.default_channel
    finally:
        connection.release()


# -- gathering ----------------------------------------------------------------------------------------

def gather(settings: Settings, channel) -> dict[str, Any]:
    from runner.monitor.queues import channel_queue_depths

    client = channel.client
    facts = client.info("all")
    embedded = facts.get("server_name") == "dify-local"
    pending = channel_queue_depths(channel, topology.QUEUE_NAMES)
    unacked_total, unacked = _unacked(client, channel.unacked_key)
    return {
        "url": mask_url(settings.broker_url),
        "embedded": embedded,
        "server": _server(facts, embedded),
        "address": _address(client),
        "uptime_seconds": facts.get("uptime_in_seconds"),
        "clients": {"connected": facts.get("connected_clients"), "blocked": facts.get("blocked_clients")},
        "memory": {"used_bytes": facts.get("used_memory"), "used_human": facts.get("used_memory_human")},
        "persistence": _persistence(facts, embedded),
        "keyspace": {name[2:]: {"keys": value.get("keys", 0), "expires": value.get("expires", 0)}
                     for name, value in facts.items() if name.startswith("db") and isinstance(value, dict)},
        "queues": [{"name": spec.name, "priority": spec.priority.label, "pending": pending[spec.name],
                    "unacked": unacked.get(spec.name, 0) if unacked is not None else None}
                   for spec in topology.QUEUES],
        "unacked": unacked_total,
    }


def _server(facts: dict, embedded: bool) -> dict[str, Any]:
    server = {"name": "dify-local embedded broker" if embedded else "Redis",
              "redis_version": facts.get("redis_version"), "mode": facts.get("redis_mode"),
              "pid": facts.get("process_id")}
    if embedded:
        server["fakeredis_version"] = facts.get("fakeredis_version")
        server["read_loop"] = facts.get("read_loop")
    else:
        server["role"] = facts.get("role")
    return server


def _address(client) -> str:
    pool = client.connection_pool
    if hasattr(pool, "get_master_address"):  # through sentinels: the master they name
        host, port = pool.get_master_address()
    else:
        host, port = pool.connection_kwargs.get("host"), pool.connection_kwargs.get("port")
    return host_port(host, port)


def _persistence(facts: dict, embedded: bool) -> dict[str, Any]:
    aof = bool(facts.get("aof_enabled"))
    if embedded:
        return {"aof_enabled": aof, "aof_size": facts.get("aof_current_size"),
                "aof_size_at_last_rewrite": facts.get("aof_base_size"), "aof_rewrites": facts.get("aof_rewrites"),
                "last_rewrite": facts.get("aof_last_rewrite_time") or None,
                "last_fsync": facts.get("aof_last_fsync") or None,
                "path": facts.get("aof_path") or None,
                "write_status": facts.get("aof_last_write_status") or "ok",
                "write_error": facts.get("aof_last_error") or None,
                "restored_writes": facts.get("aof_loaded_commands"),
                "set_aside": facts.get("aof_set_aside") or None}
    return {"aof_enabled": aof, "aof_size": facts.get("aof_current_size") if aof else None,
            "aof_last_write_status": facts.get("aof_last_write_status"),
            "aof_last_rewrite_status": facts.get("aof_last_bgrewrite_status"),
            "aof_rewrite_in_progress": bool(facts.get("aof_rewrite_in_progress")),
            "rdb_last_save": facts.get("rdb_last_save_time"),
            "rdb_last_save_status": facts.get("rdb_last_bgsave_status"),
            "rdb_changes_since_last_save": facts.get("rdb_changes_since_last_save"),
            "rdb_save_in_progress": bool(facts.get("rdb_bgsave_in_progress"))}


def _unacked(client, key: str) -> tuple[int, dict[str, int] | None]:
    """Messages delivered to a worker and not yet acknowledged (running, with acks late), in
    total and per queue (kombu keeps each as [message, exchange, routing key]; our routing key is
    the queue's name)."""
    total = client.hlen(key)
    if total > UNACKED_PARSE_LIMIT:
        return total, None
    per_queue: dict[str, int] = {}
    for raw in client.hvals(key):
        try:
            queue = loads_or_none(raw)[2]
        except (IndexError, TypeError, KeyError):
            continue
        if not isinstance(queue, str):
            continue
        per_queue[queue] = per_queue.get(queue, 0) + 1
    return total, per_queue


# -- text -------------------------------------------------------------------------------------------

def render(report: dict[str, Any]) -> str:
    server = report["server"]
    if report["embedded"]:
        what = (f"dify-local embedded broker (fakeredis {server['fakeredis_version']}, Redis "
                f"{server['redis_version']}, {server['read_loop']} read loop)")
    else:
        what = f"Redis {server['redis_version']} ({server['mode']}, {server['role']})"
    clients = report["clients"]
    rows = [
        ("broker", f"{report['url']} ({'embedded' if report['embedded'] else 'external'})"),
        ("server", f"{what}, pid {server['pid']}"),
        ("address", report["address"]),
        ("uptime", duration(report["uptime_seconds"])),
        ("clients", f"{clients['connected']} connected, {clients['blocked']} blocked"),
        ("memory", f"{report['memory']['used_human']} used"),
        *_persistence_rows(report["persistence"], report["embedded"]),
        ("keys", " · ".join(f"db{db}: {space['keys']}" + (f" ({space['expires']} expiring)" if space["expires"] else "")
                            for db, space in report["keyspace"].items()) or "none"),
    ]
    lines = [f"{label:<12} {value}" for label, value in rows]
    queue_rows = [[q["name"], q["priority"], str(q["pending"]), "?" if q["unacked"] is None else str(q["unacked"])]
                  for q in report["queues"]]
    total_pending = sum(q["pending"] for q in report["queues"])
    queue_rows.append(["(all 16)", "", str(total_pending), str(report["unacked"])])
    lines += ["", _table(queue_rows, ["QUEUE", "PRIORITY", "PENDING", "UNACKED"]),
              "(pending: waiting in the queue; unacked: delivered to a worker, not yet acknowledged)"]
    return "\n".join(lines)


def _persistence_rows(p: dict[str, Any], embedded: bool) -> list[tuple[str, str]]:
    if embedded:
        if not p["aof_enabled"]:
            return [("persistence", "off: memory only, the data goes when the broker stops "
                                    "(DIFY_LOCAL_BROKER_PERSIST=false)")]
        text = (f"append-only log {p['path'] or ''}, {_size(p['aof_size'])} ({_size(p['aof_size_at_last_rewrite'])} "
                f"after the last rewrite or load), {p['aof_rewrites']} rewrites since start")
        if p["write_status"] != "ok":
            text += f"; WRITES FAILING ({p['write_error']}): they are kept in memory and retried"
        if p["restored_writes"]:
            text += f", {p['restored_writes']} writes restored at start"
        rows = [("persistence", text),
                ("last fsync", _moment(p["last_fsync"])),
                ("last rewrite", _moment(p["last_rewrite"]) if p["last_rewrite"] else "none yet")]
        if p["set_aside"]:
            rows.append(("set aside", f"{p['set_aside']} (a damaged log tail kept aside at load)"))
        return rows
    aof = (f"on, {_size(p['aof_size'])}, last write {p['aof_last_write_status']}, "
           f"last rewrite {p['aof_last_rewrite_status']}" if p["aof_enabled"] else "off")
    if p["aof_rewrite_in_progress"]:
        aof += ", rewriting now"
    rdb = (f"last save {p['rdb_last_save_status']}, {p['rdb_changes_since_last_save']} changes since"
           + (", saving now" if p["rdb_save_in_progress"] else ""))
    return [("persistence", f"AOF {aof}; RDB {rdb}"), ("last save", _moment(p["rdb_last_save"]))]


def _table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]
    return "\n".join("  ".join(cell.rjust(width) if i >= 2 else cell.ljust(width)
                               for i, (cell, width) in enumerate(zip(cells, widths, strict=True))).rstrip()
                     for cells in [headers, *rows])


def _size(count: int | None) -> str:
    if count is None:
        return "?"
    for unit in ("B", "KiB", "MiB"):
        if count < 1024:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GiB"


def _moment(stamp: int | float | None) -> str:
    if not stamp:
        return "never"
    when = datetime.datetime.fromtimestamp(stamp).strftime("%Y-%m-%d %H:%M:%S")
    return f"{when} ({duration(max(0, time.time() - stamp))} ago)"
