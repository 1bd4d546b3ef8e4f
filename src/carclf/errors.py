"""The one exception type for errors a user can cause; the CLI prints it without a traceback."""


class CarclfError(Exception):
    """A problem with the user's data, config or run directory, with a message saying what to do."""
