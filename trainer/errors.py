"""The one exception type that reaches users as a single line (no traceback)."""


class UserError(Exception):
    """A problem with the user's input: a file, a field, a path.

    The message is one line that names the thing and, where possible, what to do.
    Front-ends print it as ``error: <message>`` and exit non-zero.
    """

    def __init__(self, message: str, *, field: str | None = None, path: str | None = None):
        super().__init__(" ".join(str(message).split()))
        self.field = field
        self.path = path

