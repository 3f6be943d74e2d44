"""The project's error types.

Library code (config, model resolution, convert, engine) raises these; the CLI catches them in one
place (cli/ui.py) and prints one red line, and the server maps them to OpenAI-style HTTP errors.
Anything else that escapes is a bug and is shown with its traceback.
"""

from __future__ import annotations


class MinisglError(Exception):
    """A failure the user can act on (missing file, model does not fit, ...). CLI exit code 1."""

    exit_code = 1


class UsageError(MinisglError):
    """The user asked for something invalid (bad flag value, unknown config key, ...). CLI exit code 2."""

    exit_code = 2


class InvalidParameter(UsageError):
    """A request parameter is out of range. `param` names it, so the server can fill OpenAI's error field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param
