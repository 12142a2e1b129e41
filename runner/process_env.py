"""Environment variables dify-local's own processes pass to each other: the one place for their names."""

SUPERVISED = "DIFY_LOCAL_SUPERVISED"  # "1" under `up`, whose printer adds the time and process name
PROCESS_NAME = "DIFY_LOCAL_PROCESS_NAME"  # the Procfile instance name under `up` (worker, worker.2, …)
ENV_FILES = "DIFY_LOCAL_ENV_FILES"  # set empty by `up` for its children: it read .env for them
