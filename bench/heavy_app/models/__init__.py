from models import account, dataset, workflow  # noqa: F401
