"""The `consistent-char` command. The library logs; only this package prints.

Every error a user can fix ends the command with one line on stderr, ``error: ...``, and exit
status 2: bad options (click's usage errors), bad settings and files (`consistent_char.errors`'
`UserError`\\ s, `ValueError`\\ s of the library's input checks) and the operating system's
refusals (`OSError`: a full disk, a folder without permission). They are caught in one place,
`consistent_char.cli.core`'s command group. Anything else is a bug: one line and exit 1, and the
traceback with ``--verbose``. Ctrl-C exits 130; in `extract` it prints the command that resumes
the run.

User text (prompts, paths, tokens, model names) is printed literally: the console interprets no
markup, emoji codes or highlighting.

- `consistent_char.cli.core`: the command group, error-to-exit-status handling, shared checks;
- `consistent_char.cli.commands`: ``extract``, ``generate``, ``report``, ``story``, ``export``;
- `consistent_char.cli.edit_command`: ``edit`` (an identity drawn into a region of an image);
- `consistent_char.cli.cast_command`: ``cast``, many subjects at once (in process or on Ray);
- `consistent_char.cli.eval_commands`: the ``eval`` subcommands, which parse their options and
  hand the work to `consistent_char.eval.commands`.
"""

# Importing the command modules registers their commands on `app`, in the order --help lists.
from consistent_char.cli import cast_command as _cast_command
from consistent_char.cli import commands as _commands
from consistent_char.cli import edit_command as _edit_command
from consistent_char.cli import eval_commands as _eval_commands
from consistent_char.cli.commands import _ProgressPrinter as _ProgressPrinter
from consistent_char.cli.core import INTERNAL_ERROR, INTERRUPTED, USER_ERROR, app, console

__all__ = ["INTERNAL_ERROR", "INTERRUPTED", "USER_ERROR", "app", "console", "main"]

del _cast_command, _commands, _edit_command, _eval_commands


def main() -> None:  # pragma: no cover - console entry point
    app()
