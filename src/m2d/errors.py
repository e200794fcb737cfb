"""The one base class of the errors m2d reports to a user.

Library code raises a subclass of `M2DError` whose message names the file or the argument at
fault; `m2d.cli.main` is the only place that catches it, prints ``m2d COMMAND: error: MESSAGE`` and
exits with status 2. Internal bugs stay ordinary exceptions with a traceback.
"""

from __future__ import annotations


class M2DError(Exception):
    """A user error: a bad file, argument or setting, explained in one line."""

    exit_code = 2
