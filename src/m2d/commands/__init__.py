"""One module per `m2d` subcommand: `add_arguments(parser)` and `run(args) -> int`."""

from ..errors import M2DError


class CommandError(M2DError, ValueError):
    """A user error a command reports as one line, ``m2d COMMAND: error: ...`` (exit status 2)."""
