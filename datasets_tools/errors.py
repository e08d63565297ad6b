"""The one exception type datasets_tools raises for bad user input (one line naming the file or field)."""

from __future__ import annotations


class DatasetError(Exception):
    """A problem with the user's data: a folder, an image, a caption file, a captioner model.

    The message is one line; front-ends print it as-is (the CLI converts it to trainer.errors.UserError).
    """

    def __init__(self, message: str, *, path: str | None = None, field: str | None = None):
        # Collapse newlines so a wrapped library message still prints as one line.
        super().__init__(" ".join(str(message).split()))
        self.path = path
        self.field = field
