"""The error type that reaches users as a single line (no traceback): see ``datasets_tools.errors``."""

from datasets_tools.errors import DatasetError, UserError, first_line  # noqa: F401
