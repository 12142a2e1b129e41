"""Every setting, declared once: name (Dify's), kind, default, group and what it governs here.

Names are Dify's, so a Dify `.env` works unchanged; the few that are ours start with DIFY_LOCAL_ or
are Dify's own API/Redis names reused for the embedded pieces.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

from runner.settings.kinds import (
    BindAddress,
    Boolean,
    BrokerUrl,
    Choice,
    EmailList,
    FilePath,
    Integer,
    Kind,
    MailSender,
    QueueList,
    PositiveNumber,
    Text,
)
from runner.topology import QUEUE_NAMES

WORKER_CLASSES = ("threads", "prefork", "gevent", "solo")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
MODES = ("api", "worker", "beat", "job", "broker")
MAIL_TYPES = ("outbox", "smtp", "resend", "sendgrid")


@dataclass(frozen=True)
class Setting:
    name: str
    kind: Kind
    default: Any
    group: str
    help: str
    secret: bool = False
    # A default computed on this machine (CPU count), and how `config` names it.
    default_factory: Callable[[], Any] | None = None
    default_note: str = ""

    def default_value(self) -> Any:
        return self.default_factory() if self.default_factory else self.default


def _cpu_count() -> int:
    return os.cpu_count() or 1


def _flag(name: str, default: bool, task: str, queue: str) -> Setting:
    return Setting(name, Boolean(), default, "beat", f"run the periodic task {task} (queue {queue})")


SETTINGS: tuple[Setting, ...] = (
    # broker / backend
    Setting("CELERY_BROKER_URL", BrokerUrl(), "", "broker / backend",
            "Redis URL of the broker; empty starts and uses the embedded broker", secret=True),
    Setting("CELERY_BACKEND", Choice(("redis",)), "redis", "broker / backend",
            "where task results are kept: redis (the broker's server)"),
    Setting("CELERY_RESULT_EXPIRES", Integer(minimum=1), 86400, "broker / backend",
            "seconds a task result is kept before it expires"),
    Setting("BROKER_USE_SSL", Boolean(), False, "broker / backend",
            "TLS to the broker and result backend (certificates verified); rediss:// implies it"),
    # Dify's names for Redis TLS files; used for the broker and the result backend whenever TLS is on.
    Setting("REDIS_SSL_CA_CERTS", FilePath(), "", "broker / backend",
            "PEM file of the CA that signed the TLS Redis server's certificate (empty: the system's CAs)"),
    Setting("REDIS_SSL_CERTFILE", FilePath(), "", "broker / backend",
            "client certificate (PEM) for a TLS Redis that asks for one (tls-auth-clients)"),
    Setting("REDIS_SSL_KEYFILE", FilePath(), "", "broker / backend",
            "private key of REDIS_SSL_CERTFILE (empty: the key is in that file)"),
    Setting("CELERY_USE_SENTINEL", Boolean(), False, "broker / backend",
            "CELERY_BROKER_URL lists Redis Sentinel hosts (sentinel://…;sentinel://…)"),
    Setting("CELERY_SENTINEL_MASTER_NAME", Text(), "", "broker / backend",
            "name of the master the sentinels watch (required with CELERY_USE_SENTINEL)"),
    Setting("CELERY_SENTINEL_PASSWORD", Text(), "", "broker / backend",
            "password of the sentinels themselves", secret=True),
    Setting("CELERY_SENTINEL_SOCKET_TIMEOUT", PositiveNumber(), 0.1, "broker / backend",
            "seconds to wait for a sentinel to answer"),
    # embedded broker (Dify's Redis names, so Dify's own .env points at it unchanged)
    Setting("REDIS_HOST", BindAddress(), "127.0.0.1", "embedded broker",
            "address the embedded broker listens on; other than loopback only with a password (not Dify's "
            "published one)"),
    Setting("REDIS_PORT", Integer(minimum=1, maximum=65535), 6379, "embedded broker",
            "port of the embedded broker"),
    Setting("REDIS_PASSWORD", Text(), "", "embedded broker",
            "password every client of the embedded broker must give (AUTH)", secret=True,
            default_note="random, made once per state folder and kept in its broker-password file"),
    Setting("DIFY_LOCAL_BROKER_PERSIST", Boolean(), True, "embedded broker",
            "keep the embedded broker's data in an append-only log in the state folder (false: memory only)"),
    Setting("DIFY_LOCAL_BROKER_COMPILED", Boolean(), True, "embedded broker",
            "run the embedded broker's read loop compiled (C, built at install where a compiler is found); "
            "false: the same loop in Python, slower (for debugging it)"),
    Setting("DIFY_LOCAL_BROKER_LUA_TIME_LIMIT", PositiveNumber("seconds of CPU, e.g. 5 or 0.5"), 5,
            "embedded broker",
            "CPU seconds a Lua script (EVAL, FCALL) may run before the embedded broker stops it with an error, so "
            "its other clients are served again (redis-server's lua-time-limit, after which it answers them BUSY)"),
    # worker
    Setting("CELERY_WORKER_CLASS", Choice(WORKER_CLASSES), "threads", "worker",
            "worker pool: threads (local default, debugger-friendly), prefork, gevent, solo"),
    Setting("CELERY_WORKER_AMOUNT", Integer(minimum=1), None, "worker",
            "worker concurrency (threads or processes)", default_factory=_cpu_count,
            default_note="this machine's CPU count"),
    Setting("CELERY_AUTO_SCALE", Boolean(), False, "worker",
            "grow and shrink the pool between CELERY_MIN_WORKERS and CELERY_MAX_WORKERS"),
    Setting("CELERY_MAX_WORKERS", Integer(minimum=1), None, "worker",
            "autoscale ceiling (empty: CELERY_WORKER_AMOUNT)"),
    Setting("CELERY_MIN_WORKERS", Integer(minimum=0), None, "worker",
            "autoscale floor (empty: 1)"),
    Setting("CELERY_QUEUES", QueueList(), QUEUE_NAMES, "worker",
            "queues the worker consumes, served by priority class whatever the order given (ours: of the 16)"),
    Setting("CELERY_WORKER_PREFETCH_MULTIPLIER", Integer(minimum=1), 1, "worker",
            "messages reserved per pool slot; 1 lets a high-priority task overtake a backlog"),
    Setting("DIFY_LOCAL_TASK_TIME_LIMIT", Integer(minimum=1), 600, "worker",
            "seconds a task may run: Celery's time limit (a soft one a little before it), enforced by the prefork "
            "and gevent pools; the threads and solo pools cannot stop a thread, so there it only sizes the "
            "visibility timeout"),
    Setting("DIFY_LOCAL_MAX_COUNTDOWN", Integer(minimum=0), 300, "worker",
            "longest countdown (seconds) the API accepts when it sends a task; it sizes the visibility timeout"),
    Setting("DIFY_LOCAL_VISIBILITY_TIMEOUT", Integer(minimum=1), None, "worker",
            "seconds a message taken by a worker stays unacknowledged before the broker hands it out again (the "
            "tasks of a worker killed with -9 come back after it); empty: derived from the two above",
            default_note="DIFY_LOCAL_MAX_COUNTDOWN + CELERY_WORKER_PREFETCH_MULTIPLIER × DIFY_LOCAL_TASK_TIME_LIMIT "
                         "+ 60"),
    Setting("SERVER_WORKER_CONNECTIONS", Integer(minimum=1, maximum=1000), 10, "worker",
            "Dify: connections per gevent worker; here: the API's threads, the requests it answers at once "
            "(one event loop reads every connection, so clients still sending hold no thread)"),
    # beat
    Setting("CELERY_BEAT_SCHEDULER_TIME", Integer(minimum=1), 1, "beat",
            "seconds between beat's checks of the schedule"),
    _flag("ENABLE_CLEAN_EMBEDDING_CACHE_TASK", False, "clean_embedding_cache_task", "ops_trace"),
    _flag("ENABLE_CLEAN_UNUSED_DATASETS_TASK", False, "clean_unused_datasets_task", "dataset"),
    _flag("ENABLE_CREATE_TIDB_SERVERLESS_TASK", False, "create_tidb_serverless_task", "dataset"),
    _flag("ENABLE_UPDATE_TIDB_SERVERLESS_STATUS_TASK", False, "update_tidb_serverless_status_task", "dataset"),
    _flag("ENABLE_CLEAN_MESSAGES", False, "clean_messages", "conversation"),
    _flag("ENABLE_MAIL_CLEAN_DOCUMENT_NOTIFY_TASK", False, "mail_clean_document_notify_task", "mail"),
    _flag("ENABLE_DATASETS_QUEUE_MONITOR", False, "datasets_queue_monitor", "ops_trace"),
    _flag("ENABLE_CHECK_UPGRADABLE_PLUGIN_TASK", True, "check_upgradable_plugin_task", "plugin"),
    _flag("ENABLE_WORKFLOW_SCHEDULE_POLLER_TASK", True, "workflow_schedule_poller_task", "schedule_poller"),
    Setting("WORKFLOW_SCHEDULE_POLLER_INTERVAL", Integer(minimum=1), 1, "beat",
            "minutes between polls for due workflow schedules"),
    Setting("WORKFLOW_SCHEDULE_POLLER_BATCH_SIZE", Integer(minimum=1), 100, "beat",
            "due schedules claimed per poll"),
    Setting("WORKFLOW_SCHEDULE_MAX_DISPATCH_PER_TICK", Integer(minimum=0), 0, "beat",
            "schedules dispatched per poll at most (0: no limit)"),
    Setting("DIFY_LOCAL_WORKFLOW_HTTP_ALLOWED_HOSTS", Text(), "", "workflows",
            "hosts (name or name:port, comma-separated) a workflow's http node may reach; empty: none"),
    Setting("DIFY_LOCAL_TEMPLATE_MAX_OUTPUT", Integer(minimum=1), 1_000_000, "workflows",
            "characters a workflow template (or http node url or body) may render"),
    Setting("DIFY_LOCAL_TEMPLATE_TIME_LIMIT", PositiveNumber(), 5, "workflows",
            "seconds of CPU one template or condition may take (compiling a graph's templates: all of them)"),
    Setting("DIFY_LOCAL_TEMPLATE_MEMORY", Integer(minimum=16), 256, "workflows",
            "megabytes of memory one template or condition may use (it runs in a child process)"),
    # plugins
    Setting("PLUGIN_MAX_PACKAGE_SIZE", Integer(minimum=1), 15 * 1024 * 1024, "plugins",
            "bytes a plugin package (zip) may have"),
    Setting("DIFY_LOCAL_PLUGIN_MAX_UNPACKED_SIZE", Integer(minimum=1), 50 * 1024 * 1024, "plugins",
            "bytes a plugin package may unpack to (the sum of its entries' sizes)"),
    # monitor
    Setting("QUEUE_MONITOR_THRESHOLD", Integer(minimum=1), 200, "monitor",
            "dataset queue depth that triggers an alert mail"),
    Setting("QUEUE_MONITOR_ALERT_EMAILS", EmailList(), (), "monitor",
            "who gets the queue alert mail (comma-separated)"),
    Setting("QUEUE_MONITOR_INTERVAL", Integer(minimum=1), 30, "monitor",
            "minutes between queue depth checks"),
    Setting("DIFY_LOCAL_QUEUE_SAMPLE_INTERVAL", Integer(minimum=0, maximum=3600), 5, "monitor",
            "seconds between beat's samples of every queue's depth into queue_samples, the dashboard's "
            "charts (0: no samples)"),
    # mail (Dify's names): the local outbox by default, a real SMTP server when configured
    Setting("MAIL_TYPE", Choice(MAIL_TYPES), "outbox", "mail",
            "outbox: one .eml file per mail in the state folder; smtp: SMTP_SERVER (Dify's resend and "
            "sendgrid, which need their services, also write to the outbox here)"),
    Setting("MAIL_DEFAULT_SEND_FROM", MailSender(), "dify-local <noreply@dify-local.localhost>", "mail",
            "the From of every mail"),
    Setting("SMTP_SERVER", Text(), "", "mail", "SMTP host (MAIL_TYPE=smtp)"),
    Setting("SMTP_PORT", Integer(minimum=1, maximum=65535), 465, "mail",
            "SMTP port: 465 with SMTP_USE_TLS (TLS from the start), 587 with SMTP_OPPORTUNISTIC_TLS, 25 plain"),
    Setting("SMTP_USERNAME", Text(), "", "mail", "SMTP login (empty: no login)"),
    Setting("SMTP_PASSWORD", Text(), "", "mail", "SMTP password", secret=True),
    Setting("SMTP_USE_TLS", Boolean(), True, "mail", "speak TLS to the SMTP server (certificate verified)"),
    Setting("SMTP_OPPORTUNISTIC_TLS", Boolean(), False, "mail",
            "with SMTP_USE_TLS: connect in plain text, then STARTTLS (port 587)"),
    Setting("RESET_PASSWORD_TOKEN_EXPIRY_MINUTES", Integer(minimum=1), 5, "mail",
            "minutes a password-reset code stays valid; retention removes it after"),
    # retention (the retention queue's clean-ups)
    Setting("DIFY_LOCAL_TEMP_FILE_HOURS", Integer(minimum=1), 24, "retention",
            "hours after which files in the state folder's files/tmp are removed"),
    Setting("DIFY_LOCAL_LOG_RETENTION_DAYS", Integer(minimum=1), 14, "retention",
            "days after which rotated log files (NAME.log.1 …) are removed"),
    Setting("DIFY_LOCAL_QUEUE_SAMPLE_RETENTION_HOURS", Integer(minimum=1), 24, "retention",
            "hours queue depth samples are kept (clean_queue_samples_task, hourly, removes older ones)"),
    # database: SQLite has no server pool; these govern the per-process connection pool of the
    # metadata store so a Dify .env keeps its meaning.
    Setting("SQLALCHEMY_POOL_SIZE", Integer(minimum=1), 30, "database",
            "SQLite connections a process keeps open"),
    Setting("SQLALCHEMY_MAX_OVERFLOW", Integer(minimum=0), 10, "database",
            "extra connections a process may open under load, closed when returned"),
    Setting("SQLALCHEMY_POOL_RECYCLE", Integer(minimum=-1), 3600, "database",
            "seconds after which a pooled connection is reopened (-1: never)"),
    Setting("SQLALCHEMY_POOL_TIMEOUT", Integer(minimum=1), 30, "database",
            "seconds to wait for a free connection, and SQLite's busy timeout for a locked database"),
    # logs
    Setting("LOG_LEVEL", Choice(LOG_LEVELS), "INFO", "logs", "log level of every process"),
    Setting("LOG_FILE", Text(), "", "logs", "a file that also collects every process's log lines"),
    Setting("LOG_FILE_MAX_SIZE", Integer(minimum=1), 20, "logs", "megabytes before a log file is rotated"),
    Setting("LOG_FILE_BACKUP_COUNT", Integer(minimum=0), 5, "logs", "rotated log files kept"),
    # run modes
    Setting("MODE", Choice(MODES), "", "run modes",
            "role of `dify-local serve` when none is named: api, worker, beat, job or broker"),
    Setting("MIGRATION_ENABLED", Boolean(), True, "run modes",
            "apply pending database migrations when the API starts (Dify's upgrade-db)"),
    # api (Dify's names for the API server's address)
    Setting("DIFY_BIND_ADDRESS", BindAddress(), "127.0.0.1", "api", "address the API listens on"),
    Setting("DIFY_PORT", Integer(minimum=1, maximum=65535), 5001, "api", "port the API listens on"),
    # knowledge base
    Setting("UPLOAD_FILE_SIZE_LIMIT", Integer(minimum=1, maximum=1024), 15, "knowledge base",
            "megabytes an uploaded document may have (Dify's name and default)"),
    Setting("DIFY_LOCAL_CHUNK_SIZE", Integer(minimum=50), 500, "knowledge base",
            "characters per segment when a dataset or upload names none"),
    Setting("DIFY_LOCAL_CHUNK_OVERLAP", Integer(minimum=0), 50, "knowledge base",
            "characters a segment repeats from the one before (less than the segment size)"),
    Setting("INDEXING_MAX_SEGMENTATION_TOKENS_LENGTH", Integer(minimum=50), 4000, "knowledge base",
            "largest segment size a dataset or upload may ask for (Dify counts tokens; here characters)"),
    Setting("DIFY_LOCAL_EMBEDDER", Text(), "hashing", "knowledge base",
            "embedder of segments and queries: hashing (local, no download) or package.module:attribute"),
    Setting("DIFY_LOCAL_EXTRACT_MAX_UNPACKED_SIZE", Integer(minimum=1), 50, "knowledge base",
            "megabytes a document may unpack to while its text is extracted: a DOCX's parts, each PDF stream, "
            "the text"),
    Setting("DIFY_LOCAL_EXTRACT_MAX_EXPANSION", Integer(minimum=1), 100, "knowledge base",
            "times its own size a DOCX may unpack to (Word's own files: under 20; a zip bomb: about 1000)"),
    Setting("DIFY_LOCAL_EXTRACT_MAX_PAGES", Integer(minimum=1), 5000, "knowledge base", "pages a PDF may have"),
    Setting("DIFY_LOCAL_EXTRACT_MEMORY", Integer(minimum=64), 1024, "knowledge base",
            "megabytes of memory the extraction of one document may use (it runs in a child process)"),
    Setting("DIFY_LOCAL_EXTRACT_TIME_LIMIT", PositiveNumber(), 120, "knowledge base",
            "seconds of CPU the extraction of one document may take"),
    # state
    Setting("DIFY_LOCAL_STATE_DIR", Text(), ".dify-local", "state",
            "folder for the database, files, logs, beat schedule and broker data (relative to the project)"),
    # up
    Setting("DIFY_LOCAL_CGROUP", Boolean(), True, "up",
            "`up` puts what it starts in a cgroup of its own where it may make one (Linux cgroup v2), so that "
            "nothing outlives a kill -9 of `up`; false: found by their environment only"),
    # doctor's thresholds
    Setting("DIFY_LOCAL_STUCK_DOCUMENT_MINUTES", PositiveNumber("minutes, e.g. 10 or 0.5"), 10, "doctor",
            "minutes a document may stay waiting, parsing, splitting or indexing before `doctor` calls it stuck"),
    Setting("DIFY_LOCAL_MIN_FREE_MB", Integer(minimum=0), 500, "doctor",
            "megabytes the state folder's disk must have free for `doctor` to pass"),
)

BY_NAME: dict[str, Setting] = {setting.name: setting for setting in SETTINGS}
GROUPS: tuple[str, ...] = tuple(dict.fromkeys(setting.group for setting in SETTINGS))
