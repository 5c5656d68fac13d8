"""The command group, the one place where errors become exit statuses, and the helpers every
command shares (console, logging setup, input checks).

See `consistent_char.cli` for the exit statuses and what each means.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.text import Text
from typer.core import TyperGroup

from consistent_char.errors import (
    InvalidValueError,
    UserError,
    one_line,
)

try:  # typer vendors click from 0.20 on
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover - older typer
    from click import exceptions as click_exceptions  # type: ignore[no-redef]

#: The exit status of every error a user can fix.
USER_ERROR = 2
#: The exit status of an unexpected error (a bug).
INTERNAL_ERROR = 1
#: The exit status after Ctrl-C (128 + SIGINT), as shells report it.
INTERRUPTED = 130

# Markup, emoji codes (":cat:") and highlighting off: prompts and paths print as typed.
console = Console(stderr=True, markup=False, emoji=False, highlight=False, soft_wrap=True)


class _State:
    """What the error handler needs from the command that ran."""

    verbose = False


def say(*parts: str | tuple[str, str]) -> None:
    """Prints one line of plain text; a ``(text, style)`` part is styled, never parsed."""
    console.print(Text.assemble(*parts))


def _error_line(message: str) -> None:
    say(("error:", "bold red"), " ", one_line(message))


def fail(message: str) -> NoReturn:
    """Ends the command with a user error (exit status 2) saying `message`."""
    raise InvalidValueError(message)


class _Group(TyperGroup):
    """The command group, with the one place where errors become exit statuses."""

    def main(  # type: ignore[override]
        self,
        args: Any = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        code = self._run(args, prog_name, complete_var, **extra)
        if not standalone_mode:
            return code
        sys.exit(code)

    def _run(self, args: Any, prog_name: str | None, complete_var: str | None, **extra: Any) -> int:
        _State.verbose = False
        try:
            result = super().main(
                args=args,
                prog_name=prog_name,
                complete_var=complete_var,
                standalone_mode=False,
                **extra,
            )
        except click_exceptions.ClickException as err:
            if type(err).__name__ == "NoArgsIsHelpError":
                err.show()
                return int(err.exit_code)
            command = getattr(getattr(err, "ctx", None), "command_path", None)
            hint = f" (see {command} --help)" if command else ""
            _error_line(err.format_message().rstrip(".") + hint)
            return int(err.exit_code)
        except typer.Abort:
            _error_line("aborted")
            return INTERNAL_ERROR
        except UserError as err:
            return _report(err, USER_ERROR, traceback_too=False)
        except OSError as err:
            return _report(err, USER_ERROR, message=_os_error(err))
        except ValueError as err:
            return _report(err, USER_ERROR)
        except Exception as err:
            return _report(
                err,
                INTERNAL_ERROR,
                message=f"unexpected {type(err).__name__}: {err}"
                + ("" if _State.verbose else " (run with --verbose for the traceback)"),
            )
        return result if isinstance(result, int) else 0


def _report(
    err: BaseException, code: int, *, message: str | None = None, traceback_too: bool = True
) -> int:
    if _State.verbose and traceback_too:
        console.print("".join(traceback.format_exception(err)).rstrip())
    _error_line(message if message is not None else str(err) or type(err).__name__)
    return code


#: What to do about the operating system's refusals a user meets most.
_OS_ERROR_HINTS = {
    errno.ENOSPC: "free some space and run the command again (extract: with --resume)",
    errno.EDQUOT: "free some space and run the command again (extract: with --resume)",
    errno.EACCES: "check the permissions of that path, or choose another",
    errno.EPERM: "check the permissions of that path, or choose another",
    errno.EROFS: "the file system is read-only: choose a folder on another one",
    errno.ENOENT: "check the path",
}


def _os_error(err: OSError) -> str:
    what = err.strerror or str(err) or type(err).__name__
    where = f": {err.filename}" if err.filename else ""
    hint = _OS_ERROR_HINTS.get(err.errno or 0)
    return f"{what}{where}" + (f"; {hint}" if hint else "")


app = typer.Typer(
    name="consistent-char",
    cls=_Group,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    help="Find a consistent character for a prompt and use it in any SDXL pipeline.",
)


@app.callback()
def _root() -> None:
    """Find a consistent character for a prompt and use it in any SDXL pipeline."""
    # Before any command imports transformers or diffusers, which read these at import.
    _quiet_environment()


def _quiet_environment() -> None:
    # transformers/diffusers announce every load with bars and advisory notices (a missing
    # torchvision, embedding resizing) that have nothing to do with the user's command.
    for name in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):
        os.environ.setdefault(name, "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def setup_logging(verbose: bool) -> None:
    """Logs INFO with ``--verbose``; otherwise warnings only, and the model libraries quiet."""
    _State.verbose = verbose
    if not verbose:
        _quiet_environment()
        _quiet_libraries()
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _quiet_libraries() -> None:
    import diffusers
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    diffusers.logging.set_verbosity_error()
    diffusers.logging.disable_progress_bar()


def finite(minimum: float | None = None) -> Callable[[float | None], float | None]:
    """A typer callback refusing NaN, infinity and values below `minimum` (click's FloatRange
    lets NaN through: every comparison with it is false)."""

    def check(value: float | None) -> float | None:
        if value is None:
            return None
        if not math.isfinite(value) or (minimum is not None and value < minimum):
            bound = "" if minimum is None else f" >= {minimum:g}"
            raise typer.BadParameter(f"must be a finite number{bound}, got {value}")
        return value

    return check


def scale_or_auto(value: str | None) -> str | None:
    """A typer callback for a scale that may also be ``auto``: refuses anything else, and
    numbers that are negative, NaN or infinite; None passes."""
    if value is None or value == "auto":
        return value
    try:
        number = float(value)
    except ValueError:
        raise typer.BadParameter(f"must be a number >= 0 or 'auto', got {value!r}") from None
    finite(0.0)(number)
    return value


def fraction(value: float | None) -> float | None:
    """A typer callback refusing values outside (0, 1] (NaN included); None passes."""
    if value is not None and not 0 < value <= 1:
        raise typer.BadParameter(f"must be in (0, 1], got {value}")
    return value


def check_prompts(
    prompts: list[str], what: str = "prompt", example: str = "'{token} in the snow'"
) -> None:
    """Refuses an empty prompt before any model loads."""
    for p in prompts:
        if not p.strip():
            fail(f"the {what} is empty; say what to draw, e.g. {example}")


def check_seeds(seed: int, count: int) -> None:
    """Refuses a first seed that leaves no room for `count` images below 2**63."""
    if seed + count - 1 >= 2**63:
        fail(f"--seed {seed} leaves no room for {count} images below 2**63; choose a smaller seed")


def progress_bars(quiet: bool) -> Any:
    """The progress display of long commands (extract, cast): description, bar, count, time;
    nothing with `quiet`."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=quiet,
    )


# Options of the commands that run the loop (extract, cast), declared once.
ConfigOption = Annotated[Path | None, typer.Option("--config", help="YAML/JSON config file.")]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a setting: key=value (dotted, repeatable)."),
]

# Options of the commands that draw with an identity (generate, edit, story), declared once.
ModelOption = Annotated[
    str | None, typer.Option(help="Base model (default: the one the identity was learned on).")
]
SeedOption = Annotated[
    int, typer.Option(min=0, help="Seed of the first image; image j uses seed+j.")
]
NumImagesOption = Annotated[
    int, typer.Option("--num-images", "-n", min=1, help="Images per prompt.")
]
StepsOption = Annotated[int | None, typer.Option(min=1, help="Denoising steps.")]
GuidanceOption = Annotated[
    float | None, typer.Option(callback=finite(0.0), help="CFG scale (>= 0).")
]
LoraScaleOption = Annotated[float, typer.Option(callback=finite(0.0), help="LoRA scale (>= 0).")]
DeviceOption = Annotated[str, typer.Option(help="auto, cpu, cuda, ...")]
InControlNetOption = Annotated[
    bool,
    typer.Option(
        "--identity-in-controlnet",
        help="With --controlnet: apply the identity's LoRA to the ControlNet's UNet copy too.",
    ),
]
LateControlScaleOption = Annotated[
    float | None,
    typer.Option(
        callback=finite(0.0),
        help="With --identity-until: the ControlNet's strength in the steps after it "
        "(default: --control-scale).",
    ),
]


def check_late_control(late_control_scale: float | None, identity_until: float) -> None:
    """Refuses `--late-control-scale` without `--identity-until` below 1 (it would act in no
    step)."""
    if late_control_scale is not None and identity_until == 1:
        fail("--late-control-scale acts in the steps after --identity-until: give it below 1")


IdentityUntilOption = Annotated[
    float,
    typer.Option(
        callback=fraction,
        help="With --controlnet: the fraction of the steps the identity's LoRA acts in (0-1].",
    ),
]
