"""Settings: declared once in `table`, read through the layers by `loader`."""

from runner.settings.kinds import mask_command, mask_url
from runner.settings.loader import Override, Settings, SettingsError, load_settings
from runner.settings.table import BY_NAME, GROUPS, SETTINGS, Setting

__all__ = [
    "BY_NAME", "GROUPS", "SETTINGS", "Override", "Setting", "Settings", "SettingsError", "load_settings",
    "mask_command", "mask_url",
]
