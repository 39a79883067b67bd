"""User-facing errors: the CLI prints these as one line and exits with status 2, never a traceback."""


class PonderError(Exception):
    """A problem with the user's input (config, data, run directory) that the user can fix."""
