"""The command line: parse options, call the library, render.  Heavy modules load lazily."""

from __future__ import annotations

import math
import os
import re
import signal
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import click

from . import __version__

# gclip makes no BLAS calls: spare the start-up and the spinning of OpenBLAS helper threads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

if TYPE_CHECKING:
    from .report import Report

EXIT_CODES_HELP = """\b
Exit codes:
  0    success
  2    usage error (bad option or argument)
  3    bad input (missing, unreadable, malformed or unsupported file)
  4    input holds NaN/Inf values (rescale refuses them)
  5    output cannot be written
  130  interrupted (Ctrl-C)
  143  terminated (SIGTERM)
"""


class NormTypeParam(click.ParamType):
    name = "P"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        if isinstance(value, float):
            return value
        text = str(value).strip().lower()
        number = math.inf if text in ("inf", "infinity") else _float_or_none(text)
        if number is None or not number > 0:
            self.fail(f"{value!r} is not a norm type: give a number > 0 or 'inf'", param, ctx)
        return number


class PositiveFiniteParam(click.ParamType):
    name = "FLOAT"

    def __init__(self, allow_zero: bool = False) -> None:
        self.allow_zero = allow_zero

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        number = value if isinstance(value, float) else _float_or_none(str(value))
        low_ok = number is not None and (number >= 0 if self.allow_zero else number > 0)
        if not low_ok or not math.isfinite(number):
            bound = ">= 0" if self.allow_zero else "> 0"
            self.fail(f"{value!r} is not a finite number {bound}", param, ctx)
        return number


class ByteSizeParam(click.ParamType):
    name = "SIZE"
    _UNITS: ClassVar[dict[str, int]] = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        match = re.fullmatch(r"\s*(\d+)\s*([kmg]?)(?:i?b)?\s*", str(value), re.IGNORECASE)
        if not match or int(match[1]) == 0:
            self.fail(f"{value!r} is not a size such as 65536, 512K, 64M or 1G", param, ctx)
        return int(match[1]) * self._UNITS[match[2].lower()]


def _float_or_none(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _reports_errors(command: Callable[..., None]) -> Callable[..., None]:
    """Turn library errors into one ``gclip: error:`` line on stderr and their exit code."""

    @wraps(command)
    def run(*args: Any, **kwargs: Any) -> None:
        from .errors import ExitCode, GclipError, Terminated, UsageError

        debug = click.get_current_context().find_root().params.get("debug", False)
        try:
            command(*args, **kwargs)
        except UsageError as exc:
            raise click.UsageError(exc.message) from None
        except GclipError as exc:
            if debug:
                raise
            click.echo(f"gclip: error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("gclip: interrupted", err=True)
            sys.exit(ExitCode.INTERRUPTED)
        except Terminated:
            click.echo("gclip: terminated", err=True)
            sys.exit(ExitCode.TERMINATED)

    return run


def _common_options(command: Callable[..., None]) -> Callable[..., None]:
    options = [
        click.option(
            "--norm-type",
            "-p",
            type=NormTypeParam(),
            default="2",
            show_default=True,
            help="p of the p-norm: any number > 0, or inf.",
        ),
        click.option(
            "--eps",
            type=PositiveFiniteParam(allow_zero=True),
            default=0.0,
            show_default=True,
            help="Added to the norm in the factor max_norm / (norm + eps); "
            "1e-6 reproduces PyTorch.",
        ),
        click.option(
            "--chunk-size",
            type=ByteSizeParam(),
            default="64M",
            show_default=True,
            help="Bytes read per chunk: bounds the memory used.",
        ),
        click.option(
            "--nonfinite",
            type=click.Choice(["error", "zero", "keep"]),
            default="error",
            show_default=True,
            help="NaN/Inf values: refuse the file, count and write them as 0, or keep them "
            "as they are (the norm is then that of the finite values).",
        ),
        click.option(
            "--json",
            "as_json",
            is_flag=True,
            help="Print one JSON object on stdout instead of text.",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@click.group(
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog=EXIT_CODES_HELP,
)
@click.version_option(__version__, "-V", "--version", prog_name="gclip")
@click.option("--debug", is_flag=True, help="Show Python tracebacks for errors.")
def main(debug: bool) -> None:
    """Inspect and clip gradient dumps in .npz, safetensors and HDF5 files, streaming.

    \b
    Examples:
      gclip inspect grads.safetensors
      gclip inspect grads.h5 --max-norm 1.0 --json
      gclip rescale grads.npz clipped.npz --max-norm 1.0
    """
    signal.signal(signal.SIGTERM, _terminate)


def _terminate(signum: int, frame: object) -> None:
    """SIGTERM unwinds like Ctrl-C does, so temporary files are removed on the way out."""
    from .errors import Terminated

    raise Terminated


@main.command()
@click.argument("file", type=click.Path(path_type=Path, dir_okay=True))
@click.option(
    "--max-norm",
    type=PositiveFiniteParam(),
    help="Also show the factor 'rescale --max-norm' would apply.",
)
@_common_options
@_reports_errors
def inspect(
    file: Path,
    max_norm: float | None,
    norm_type: float,
    eps: float,
    chunk_size: int,
    nonfinite: str,
    as_json: bool,
) -> None:
    """Show every tensor's norm, share, max |x| and non-finite count, and the global norm."""
    from .api import inspect_file

    report = inspect_file(
        file,
        norm_type=norm_type,
        max_norm=max_norm,
        eps=eps,
        chunk_size=chunk_size,
        nonfinite=nonfinite,
    )
    _emit(report, as_json, human=_print_inspect)


@main.command()
@click.argument("input_file", metavar="IN", type=click.Path(path_type=Path))
@click.argument("output_file", metavar="OUT", type=click.Path(path_type=Path))
@click.option(
    "--max-norm",
    type=PositiveFiniteParam(),
    required=True,
    help="Clip so that the global norm is at most this.",
)
@click.option("--no-clobber", is_flag=True, help="Fail rather than replace an existing OUT.")
@_common_options
@_reports_errors
def rescale(
    input_file: Path,
    output_file: Path,
    max_norm: float,
    norm_type: float,
    eps: float,
    chunk_size: int,
    nonfinite: str,
    as_json: bool,
    no_clobber: bool,
) -> None:
    """Write IN to OUT with every gradient scaled by max_norm / global_norm, if that is < 1.

    OUT has IN's format; non-float tensors and all other content are copied untouched. The
    output appears only when complete; IN is never modified.
    """
    from .api import rescale_file

    report = rescale_file(
        input_file,
        output_file,
        max_norm=max_norm,
        norm_type=norm_type,
        eps=eps,
        chunk_size=chunk_size,
        nonfinite=nonfinite,
        clobber=not no_clobber,
    )
    _emit(report, as_json, human=_print_rescale)


def _emit(report: Report, as_json: bool, human: Callable[[Report], None]) -> None:
    if as_json:
        from .render import report_json

        click.echo(report_json(report))
    else:
        human(report)


def _print_inspect(report: Report) -> None:
    from rich.console import Console

    from .render import print_inspect

    print_inspect(report, Console(highlight=False))


def _print_rescale(report: Report) -> None:
    from rich.console import Console

    from .render import print_rescale

    print_rescale(report, Console(stderr=True, highlight=False))
