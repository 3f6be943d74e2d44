"""The project's error types, and the CLI's exit-status policy they carry.

Library code (config, model resolution, convert, engine) raises these; the CLI catches them in one
place (cli/ui.py) and prints one red line, and the server maps them to OpenAI-style HTTP errors.
Anything else that escapes is a bug and is shown with its traceback.

Exit status, the same for every subcommand:
  0    done;
  2    UsageError: the request cannot work as given, and nothing was run: a bad flag or config value, a
       path that does not exist or is the wrong kind of file, an input file that is empty, unreadable or
       not in the expected format, a model name that resolves to nothing (not cached, not downloadable) or
       to an unsupported architecture, a device this machine does not have;
  1    MinisglError: a valid request failed while running: the model does not fit in memory, a server or
       rank died, the hub or a server answered an error, generate skipped malformed lines and ran the rest;
       also any unexpected exception (a bug, shown with its traceback);
  130  interrupted (Ctrl-C).
"""

from __future__ import annotations


class MinisglError(Exception):
    """A valid request that failed while running (model does not fit, a server died, ...). CLI exit code 1."""

    exit_code = 1


class UsageError(MinisglError):
    """The user asked for something that cannot work (bad flag value, missing or unreadable file, unknown model,
    absent device, ...). CLI exit code 2."""

    exit_code = 2


class InvalidParameter(UsageError):
    """A request parameter is out of range. `param` names it, so the server can fill OpenAI's error field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param
