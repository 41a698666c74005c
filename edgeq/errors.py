"""One exception type for everything the user can fix: bad files, bad shapes, bad targets.

The CLI prints its message as one line and exits with code 2; anything else is an internal error (code 1).
"""


class EdgeqError(Exception):
    """A problem with the user's input, explained in one line."""

    exit_code = 2
