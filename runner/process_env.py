"""Environment variables dify-local's own processes pass to each other: the one place for their names."""

SUPERVISED = "DIFY_LOCAL_SUPERVISED"  # "1" under `up`, whose printer adds the time and process name
PROCESS_NAME = "DIFY_LOCAL_PROCESS_NAME"  # the Procfile instance name under `up` (worker, worker.2, …)
SUPERVISOR = "DIFY_LOCAL_SUPERVISOR"  # "pid:start time" of `up`: its roles stop themselves when it is gone
ENV_FILES = "DIFY_LOCAL_ENV_FILES"  # set empty by `up` for its children: it read .env for them
# Hot reload (runner.reload): the supervisor's side of a socket pair, the folders it watches, and
# the two ways a process can be started to take over from a running one.
CHANNEL_FD = "DIFY_LOCAL_CHANNEL_FD"  # file descriptor of the child's end of its channel to `up`
WATCH_ROOTS = "DIFY_LOCAL_WATCH_ROOTS"  # watched folders (os.pathsep-separated): imports under them are reported
STANDBY = "DIFY_LOCAL_STANDBY"  # "1": import libraries, then wait to be told to load (a spare for the next reload)
HANDOVER = "DIFY_LOCAL_HANDOVER"  # "1": once loaded, wait to be told to serve (the old process may still run)
LISTEN_FD = "DIFY_LOCAL_LISTEN_FD"  # the API's listening socket, held by `up` across the API's restarts
