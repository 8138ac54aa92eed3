"""User-facing errors: the CLI prints them as one line and exits 2, without a traceback."""


class LdmkitError(Exception):
    """A problem with the user's input (config, data, run directory), with the fix in its text."""


class ConfigError(LdmkitError):
    """A config key is unknown, mistyped or out of range."""


class DataError(LdmkitError):
    """A dataset path is missing or holds no readable image."""


class CheckpointError(LdmkitError):
    """A run directory or checkpoint is missing, incomplete or incompatible."""
