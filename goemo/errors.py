"""goemo's one error type: a problem the user can fix, printed by the commands as one line."""


class GoemoError(Exception):
    """An error the user can fix; the CLI prints it as one line (set GOEMO_DEBUG=1 for the traceback)."""
