"""The one error hierarchy for bad user input: a single line that names the file or field, no traceback.

``UserError`` is the root; it lives here, in the lowest package, because imports go app -> trainer ->
datasets_tools and every layer raises it. ``trainer.errors`` re-exports it. Front-ends catch ``UserError``
(``DatasetError`` is one), print ``error: <message>`` and exit non-zero: there is no translation layer.
"""

from __future__ import annotations


def first_line(e: BaseException, limit: int = 300) -> str:
    """The first line of a library's exception message, for a one-line error (its type name if it has none)."""
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:limit]


class UserError(Exception):
    """A problem with the user's input: a file, a field, a path.

    The message is one line that names the thing and, where possible, what to do.
    """

    def __init__(self, message: str, *, field: str | None = None, path: str | None = None):
        # Collapse newlines so a wrapped library message still prints as one line.
        super().__init__(" ".join(str(message).split()))
        self.field = field
        self.path = path


class DatasetError(UserError):
    """A problem with the user's data: a folder, an image, a caption file, a captioner model."""
