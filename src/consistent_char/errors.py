"""Errors the user can fix, each with a message that says what is wrong and what to do.

Every `UserError` reaches the command line as one line on stderr and exit status 2
(`consistent_char.cli`); anything else is a bug and shows its traceback with ``--verbose``. Each
class also derives from the built-in exception a caller would expect (a bad value is a
`ValueError`, a folder that is taken is a `FileExistsError`), so ``except ValueError`` keeps
working.

Example:
    >>> from consistent_char.errors import InvalidValueError, UserError
    >>> try:
    ...     raise InvalidValueError("--steps must be >= 1, got 0")
    ... except UserError as err:
    ...     print(err)
    --steps must be >= 1, got 0
"""

from __future__ import annotations

__all__ = [
    "InputFileError",
    "InputNotFoundError",
    "InvalidValueError",
    "OutputExistsError",
    "OutputNotWritableError",
    "RunLockedError",
    "UserError",
    "one_line",
]


class UserError(Exception):
    """A bad input the user can fix: the message names it and says what to do."""


class InvalidValueError(UserError, ValueError):
    """A value (a prompt, an option, a setting) is empty, out of range, or not finite."""


class InputFileError(UserError, ValueError):
    """A file or folder to read is missing, corrupt, or not of the kind expected (a run
    directory's ``state.json``, an identity's ``identity.json`` or ``.safetensors``)."""


class InputNotFoundError(InputFileError, FileNotFoundError):
    """A file or folder to read does not exist (a model folder, a run to resume)."""


class OutputExistsError(UserError, FileExistsError):
    """Writing would replace or delete something this library did not write (a folder that is
    not an identity or a run, a file of the user's with an output's name)."""


class OutputNotWritableError(UserError, OSError):
    """An output path cannot be created: it is below a file, or its folder is not writable."""


class RunLockedError(UserError, RuntimeError):
    """Another live process is writing the run directory."""


def one_line(message: str) -> str:
    """`message` on one line: indented continuation lines (as in a `ConfigError` naming several
    fields) are joined with ``"; "``, and ``:`` that ended a heading line is kept.

    Example:
        >>> one_line("invalid configuration:\\n  seed = -1: too small\\n  steps = 0: too small")
        'invalid configuration: seed = -1: too small; steps = 0: too small'
    """
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    if not lines:
        return ""
    out = lines[0]
    for line in lines[1:]:
        out += (" " if out.endswith(":") else "; ") + line
    return out
