"""The one exception type for problems the user can fix, and the one way to say them in a line.

The CLI turns a UserError into a single ``Error: ...`` line and a non-zero exit code instead of a
traceback. Libraries' own messages (onnxruntime's, torch's, a decoder's) often span many lines:
``one_line`` folds them into the short form every message here quotes them in.
"""


class UserError(Exception):
    """A problem with the user's input, explained in one line."""


def one_line(text, limit: int = 300) -> str:
    """``text`` (or an exception) on one line, whitespace collapsed, at most ``limit`` characters."""
    return " ".join(str(text).split())[:limit]
