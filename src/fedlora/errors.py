"""The one exception type for user mistakes."""


class ConfigError(ValueError):
    """A user mistake in a configuration, a command line or an input file.

    The message names the key, flag or file, so the command line prints one line and
    exits 2 instead of a traceback.
    """


def check(key: str, ok: bool, message: str) -> None:
    """Raise a ConfigError ``"<key>: <message>"`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key}: {message}")
