"""One exception type for problems the user can fix (bad paths, bad files, bad flags).

The CLI turns it into a single ``Error: ...`` line and a non-zero exit code
instead of a traceback.
"""


class UserError(Exception):
    """A problem with the user's input, explained in one line."""
