"""The command line: parse options, call the library, render.  Heavy modules load lazily."""

from __future__ import annotations

import atexit
import io
import math
import os
import re
import signal
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import click

from . import __version__, interrupts, kernels
from .errors import ExitCode, Interrupted, Terminated
from .formats.registry import FORMAT_NAMES  # light: names only, no numpy

# gclip makes no BLAS calls: spare the start-up and the spinning of OpenBLAS helper threads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

if TYPE_CHECKING:
    from rich.console import Console

    from .compare import Diff
    from .history import History
    from .layer_history import LayerHistory
    from .options import Options
    from .progress_display import ProgressDisplay
    from .reports import InspectReport, Report, RewriteReport
    from .strategies import Strategy
    from .views import View

Decorator = Callable[[Callable[..., None]], Callable[..., None]]

EXIT_CODES_HELP = """\b
Every tensor of every input is counted, or named as not counted with the
reason; files a folder holds that are not tensor files are listed on stderr.
gclip refuses what it does not understand (one line, nothing written): files
of unknown or unsupported kinds, raw values of unrecorded type, an index that
disagrees with its shards, --include/--exclude that match nothing, and, for
norm, check and the rewriting commands, inputs with no tensor to count.

\b
Exit codes:
  0    success (check: the norm is within --max-norm; diff: no difference)
  1    check: the norm exceeds --max-norm; diff: the files differ
  2    usage error (bad option or argument); any other error of check
  3    bad input (missing, unreadable, malformed, unsupported or refused file)
  4    the values hold NaN/Inf (with --nonfinite error, the default): every
       command prints its report, then exits 4; rewriting commands write nothing
  5    output cannot be written
  130  interrupted (Ctrl-C)
  141  standard output closed early (| head): stopped quietly
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


class GroupParam(click.ParamType):
    name = "GLOB=C"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> tuple[str, float]:
        if isinstance(value, tuple):
            return value
        glob, _, limit = str(value).rpartition("=")
        number = _float_or_none(limit)
        if not glob or number is None or not 0 < number < math.inf:
            self.fail(
                f"{value!r} is not GLOB=C with C a finite number > 0, e.g. 'h.*=0.5'", param, ctx
            )
        return glob, number


def _float_or_none(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


@dataclass(frozen=True)
class _Settings:
    """The group's options, for every command."""

    debug: bool = False
    color: str = "auto"


def _settings() -> _Settings:
    return click.get_current_context().find_object(_Settings) or _Settings()


def _reports_errors(
    error_code: int | None = None,
) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Turn library errors into one ``gclip: error:`` line on stderr and an exit code (their
    own, or *error_code* for every error, as check's 2); with --debug the traceback comes
    first, the exit code stays.  A closed standard output is 141 for every command."""

    def decorate(command: Callable[..., None]) -> Callable[..., None]:
        @wraps(command)
        def run(*args: Any, **kwargs: Any) -> None:
            from .errors import GclipError, UsageError
            from .streams import STDOUT_NAME, stdout_failure

            try:
                command(*args, **kwargs)
                sys.stdout.flush()  # a reader gone away, a full disk: found here, not at exit
            except UsageError as exc:
                raise click.UsageError(exc.message) from None
            except GclipError as exc:
                _stop_if_signalled()
                _traceback_if_debug()
                if exc.path == STDOUT_NAME:
                    _discard_stdout()
                click.echo(f"gclip: error: {exc}", err=True)
                sys.exit(error_code or exc.exit_code)
            except BrokenPipeError:  # the reader went away (| head): stop quietly
                _discard_stdout()
                sys.exit(ExitCode.BROKEN_PIPE)
            except OSError as exc:  # the report could not be written: never exit 0
                failure = stdout_failure(exc)
                if failure is None:
                    raise
                _traceback_if_debug()
                _discard_stdout()
                click.echo(f"gclip: error: {failure}", err=True)
                sys.exit(error_code or failure.exit_code)
            except (KeyboardInterrupt, Interrupted):
                click.echo("gclip: interrupted", err=True)
                sys.exit(error_code or ExitCode.INTERRUPTED)
            except Terminated:
                click.echo("gclip: terminated", err=True)
                sys.exit(error_code or ExitCode.TERMINATED)

        return run

    return decorate


def _discard_stdout() -> None:
    """What is left in standard output's buffer goes nowhere: flushing it at exit would fail
    again (and print a traceback)."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _stop_if_signalled() -> None:
    """After Ctrl-C or SIGTERM an error is its consequence (a child stopped, an import cut
    short): report the signal, not the error."""
    signum = interrupts.received()
    if signum is not None:
        interrupts.exit_stopped(signum)


def _traceback_if_debug() -> None:
    if _settings().debug:
        import traceback

        traceback.print_exc()


def _options(*decorators: Callable[[Callable[..., None]], Callable[..., None]]):
    def apply(command: Callable[..., None]) -> Callable[..., None]:
        for decorator in reversed(decorators):
            command = decorator(command)
        return command

    return apply


class _EnvOption(click.Option):
    """An option whose default may come from an environment variable, which its errors name
    only when the value came from there."""

    def get_error_hint(self, ctx: click.Context | None) -> str:
        hint = click.Parameter.get_error_hint(self, ctx)
        from_env = ctx is not None and ctx.get_parameter_source(self.name) is _ENVIRONMENT
        return f"{hint} (from ${self.envvar})" if from_env else hint


_ENVIRONMENT = click.core.ParameterSource.ENVIRONMENT


def _env_option(*names: str, envvar: str, **settings: Any):
    return click.option(*names, cls=_EnvOption, envvar=envvar, show_envvar=True, **settings)


def _gathered(keyword: str, build: Callable[..., object], *decorators: Decorator) -> Decorator:
    """Options (*decorators*) whose values reach the command as one object: *keyword* =
    build(**their values).  So a command takes Options, a View, ... whole, never a dict of
    options to pop by key."""

    def probe() -> None: ...

    names = [p.name for p in _options(*decorators)(probe).__click_params__]

    def decorate(command: Callable[..., None]) -> Callable[..., None]:
        @wraps(command)
        def run(*args: Any, **kwargs: Any) -> None:
            from .errors import UsageError

            values = {name: kwargs.pop(name) for name in names}
            try:
                made = build(**values)
            except UsageError as exc:
                raise click.UsageError(exc.message) from None
            command(*args, **{keyword: made}, **kwargs)

        return _options(*decorators)(run)

    return decorate


def _make_options(**values: Any) -> Options:
    from .options import Options

    return Options(**values)


_NORM_OPTIONS = (
    _env_option(
        "--norm-type",
        "-p",
        type=NormTypeParam(),
        default="2",
        show_default=True,
        envvar="GCLIP_NORM_TYPE",
        help="p of the p-norm: any number > 0, or inf.",
    ),
    _env_option(
        "--nonfinite",
        type=click.Choice(["error", "zero", "keep"]),
        default="error",
        show_default=True,
        envvar="GCLIP_NONFINITE",
        help="NaN/Inf values: refuse them (exit 4), count them as 0, or keep them as "
        "they are (the norm is then that of the finite values).",
    ),
)
_SELECTION_OPTIONS = (
    click.option(
        "--include",
        multiple=True,
        metavar="GLOB",
        help="Count only tensors whose name matches (repeatable; '.' and '/' alike). "
        "A glob that matches nothing is an error.",
    ),
    click.option(
        "--exclude",
        multiple=True,
        metavar="GLOB",
        help="Do not count tensors whose name matches (repeatable); rewriting commands "
        "copy them untouched.",
    ),
    click.option(
        "--opaque-dtype",
        "opaque_dtypes",
        multiple=True,
        metavar="DTYPE",
        help="Read raw 2- or 1-byte values (|V2, |V1: how np.savez and h5py store "
        "bfloat16 and float8) as DTYPE: bfloat16, float8_e4m3fn, float8_e5m2, ... "
        "(without it they are refused).",
    ),
    _env_option(
        "--chunk-size",
        type=ByteSizeParam(),
        default="64M",
        show_default=True,
        envvar="GCLIP_CHUNK_SIZE",
        help="Bytes read per chunk: bounds the memory used.",
    ),
    click.option(
        "--file-format",
        type=click.Choice(FORMAT_NAMES),
        help="The input's format, instead of detecting it from its content.",
    ),
    click.option(
        "--storage-option",
        "storage_options",
        multiple=True,
        metavar="KEY=VALUE",
        help="For URLs (s3://, gs://, ...): passed to their file system (fsspec), e.g. "
        "anon=true or endpoint_url=http://host:9000; VALUE is read as JSON where it can be "
        "(repeatable).",
    ),
)
_DIFF_NONFINITE = _env_option(
    "--nonfinite",
    type=click.Choice(["error", "zero", "keep"]),
    default="error",
    show_default=True,
    envvar="GCLIP_NONFINITE",
    help="NaN/Inf values: exit 4 after the report (norms holding them are nan/inf); compare "
    "and count them as 0; or keep them (a NaN matches a NaN, an Inf the same Inf; norms of "
    "the finite values).",
)


def _jobs_option(jobs_help: str) -> Decorator:
    return _env_option(
        "--jobs",
        "-j",
        type=click.IntRange(min=1),
        envvar="GCLIP_JOBS",
        help=f"Processes to use [default: all cores]: {jobs_help}",
    )


def _measure_options(jobs_help: str = "a large file is cut into N parts.") -> Decorator:
    """The options of Options, given to the command as ``options``."""
    return _gathered(
        "options", _make_options, *_NORM_OPTIONS, *_SELECTION_OPTIONS, _jobs_option(jobs_help)
    )


def _output_format(output_format: str, as_json: bool) -> str:
    return "json" if as_json else output_format


_REPORT_FORMAT_DECORATORS = (
    _env_option(
        "--format",
        "output_format",
        type=click.Choice(["table", "json", "jsonl", "csv"]),
        default="table",
        show_default=True,
        envvar="GCLIP_FORMAT",
        help="Report as a table (for people), JSON, JSON Lines or CSV.",
    ),
    click.option("--json", "as_json", is_flag=True, help="Short for --format json."),
)
_report_format_options = _gathered("output_format", _output_format, *_REPORT_FORMAT_DECORATORS)


def _make_view(**values: Any) -> View:
    from .views import View

    return View(**values)


_view_options = _gathered(
    "view",
    _make_view,
    click.option(
        "--sort",
        type=click.Choice(["name", "norm", "size", "file", "nonfinite"]),
        help="Order the tensors (default: as in the file), or the layers with --by-layer; "
        "nonfinite: most NaN/Inf first.",
    ),
    click.option("--top", type=click.IntRange(min=1), metavar="N", help="Show the first N only."),
    click.option(
        "--by-layer",
        is_flag=True,
        help="One row per layer: the name up to its first number (h.3, encoder.layer.5).",
    ),
    click.option(
        "--depth",
        type=click.IntRange(min=1),
        metavar="N",
        help="With --by-layer: a layer is the first N name components.",
    ),
)


def _eps_option(help_text: str) -> Decorator:
    return _env_option(
        "--eps",
        type=PositiveFiniteParam(allow_zero=True),
        default=0.0,
        show_default=True,
        envvar="GCLIP_EPS",
        help=help_text,
    )


def _max_norm_option(required: bool, help_text: str) -> Decorator:
    return _env_option(
        "--max-norm",
        type=PositiveFiniteParam(),
        required=required,
        envvar="GCLIP_MAX_NORM",
        help=help_text,
    )


@click.group(
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog=EXIT_CODES_HELP,
)
@click.version_option(
    __version__,
    "-V",
    "--version",
    prog_name="gclip",
    message=f"%(prog)s, version %(version)s ({kernels.describe()})",
)
@click.option("--debug", is_flag=True, help="Show Python tracebacks for errors.")
@click.option(
    "--color",
    type=click.Choice(["auto", "always", "never"]),
    default="auto",
    show_default=True,
    envvar="GCLIP_COLOR",
    help="Colour in tables; auto: when writing to a terminal and NO_COLOR is unset.",
)
@click.pass_context
def main(ctx: click.Context, debug: bool, color: str) -> None:
    """Inspect and clip gradient dumps in .npz, safetensors and HDF5 files, streaming.

    \b
    Examples:
      gclip inspect grads.safetensors --sort norm --top 10
      gclip inspect shards/model.safetensors.index.json --by-layer
      gclip norm grads.h5
      gclip check grads.npz --max-norm 1.0 || echo "exploding"
      gclip rescale grads.npz clipped.npz --max-norm 1.0
      cat g.safetensors | gclip rescale - - --max-norm 1 | gclip norm -
    """
    ctx.obj = _Settings(debug, color)
    _quiet_warnings(debug)
    if not isinstance(signal.getsignal(signal.SIGTERM), interrupts.Stop):
        # called from Python rather than as the gclip command: SIGTERM at least unwinds
        signal.signal(signal.SIGTERM, _terminate)
    _whole_writes()


def _whole_writes() -> None:
    """Standard streams whose writes are whole or fail.

    Under PYTHONUNBUFFERED (or -u) the binary layer of sys.stdout is the raw file, whose
    write() may write part of what it is given (a pipe whose reader went away, a full disk)
    and say so only in its return value, which the text layer and shutil.copyfileobj ignore:
    output cut short with exit 0.  A BufferedWriter writes everything or raises.
    """
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if isinstance(getattr(stream, "buffer", None), io.FileIO):
            raw = io.FileIO(stream.fileno(), "w", closefd=False)  # the original stays open
            whole = io.TextIOWrapper(
                io.BufferedWriter(raw),
                encoding=stream.encoding,
                errors=stream.errors,
                line_buffering=True,
                write_through=True,
            )
            setattr(sys, name, whole)


def _quiet_warnings(debug: bool) -> None:
    """numpy and h5py warn on stderr in two lines or more (a signalling NaN cast to float64, a
    Python 2 ``.npy`` header); gclip says itself what it found, on one line.  Their warnings
    are silenced, unless --debug: here and in forked workers by the filter, in spawned ones
    (--out-dir) by the -W option multiprocessing gives them from sys.warnoptions."""
    if not debug:
        warnings.simplefilter("ignore")
        if "ignore" not in sys.warnoptions:
            sys.warnoptions.append("ignore")


def entry_point() -> None:
    """The ``gclip`` command: main(), then an exit without the interpreter's teardown.

    Tearing down (a last garbage collection over every object, then each module cleared one
    by one) took 35-40 ms of every run, a fifth of a small file's; the system frees the memory
    at once.  Threads are still joined, exit handlers still run (this one last: exit handlers
    run in reverse order of registration) and the standard streams are flushed.
    """
    interrupts.install()
    status: list[int] = []  # the exit status, once known, for _exit_now
    atexit.register(_exit_now, status)
    try:
        with interrupts.reported():
            main()
    except SystemExit as done:
        code = interrupts.final_status(done.code)
        if isinstance(code, int) or code is None:  # else Python prints it
            status.append(code or 0)
        if code != done.code:
            raise SystemExit(code) from None
        raise


def _exit_now(status: list[int]) -> None:
    """Exit with *status*[0] at once, if the status is known (see entry_point)."""
    if not status:
        return
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:  # Python's own teardown reports it
        return
    os._exit(status[0])


def _terminate(signum: int, frame: object) -> None:
    """SIGTERM unwinds like Ctrl-C does, so temporary files are removed on the way out."""
    raise Terminated


@main.command()
@click.argument("files", nargs=-1, required=True, metavar="FILE...")
@_reports_errors()
@_max_norm_option(False, "Also show the factor 'rescale --max-norm' would apply.")
@_eps_option("Added to the norm in the factor shown: max_norm / (norm + eps).")
@_measure_options()
@_report_format_options
@_view_options
def inspect(
    files: tuple[str, ...],
    max_norm: float | None,
    eps: float,
    options: Options,
    output_format: str,
    view: View,
) -> None:
    """Show every tensor's norm, share, max |x| and NaN/Inf count, and the global norm.

    FILE may be several files, a directory, a sharded checkpoint's *.index.json, or - for
    standard input: one global norm is taken over all of them.  Exits with 4 after the report
    when the values hold NaN/Inf (unless --nonfinite zero or keep).
    """
    report = _inspect(files, options, max_norm=max_norm, eps=eps)
    _emit(report, output_format, view, human=_print_inspect)
    _exit_if_nonfinite(report)


@main.command()
@click.argument("files", nargs=-1, required=True, metavar="FILE...")
@_reports_errors()
@_measure_options()
def norm(files: tuple[str, ...], options: Options) -> None:
    """Print the global norm of FILE... (a number and a newline), for $(...).

    Exits with 4 when the files hold NaN/Inf (the norm printed is then nan or inf) unless
    --nonfinite zero or keep says how to count them; with 3 when there is no tensor to count.
    """
    report = _inspect(files, options, require_counted=True)
    click.echo(repr(report.global_norm))
    if report.beyond_float64:
        from .render.text import BEYOND_FLOAT64

        click.echo(f"gclip: note: the norm is {BEYOND_FLOAT64}", err=True)
    _exit_if_nonfinite(report)


@main.command()
@click.argument("files", nargs=-1, required=True, metavar="FILE...")
@_reports_errors(error_code=2)
@_max_norm_option(True, "The threshold the global norm must stay within.")
@_measure_options()
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def check(files: tuple[str, ...], max_norm: float, options: Options, as_json: bool) -> None:
    """Exit 0 when the global norm of FILE... is within --max-norm, 1 when it exceeds it, 4
    when the files hold NaN/Inf, 2 on any other error (no tensor to count is one).  Prints
    one summary line (or JSON)."""
    from .render.lines import check_line
    from .render.machine import as_json as json_of

    report = _inspect(files, options, max_norm=max_norm, require_counted=True)
    click.echo(json_of(report) if as_json else check_line(report))
    _exit_if_nonfinite(report)
    sys.exit(1 if report.clipped else 0)


def _exit_if_nonfinite(report: Report | History | LayerHistory | Diff) -> None:
    """The one rule for NaN/Inf: once the report is out, exit 4, unless a --nonfinite policy
    says how they were counted."""
    from .options import NonFinite

    if report.nonfinite and report.nonfinite_policy is NonFinite.ERROR:
        sys.exit(ExitCode.NONFINITE)


@dataclass(frozen=True)
class _ByLayer:
    """history --by-layer: how layers are told apart, and what a spike is."""

    depth: int | None
    spike: float


def _make_by_layer(by_layer: bool, depth: int | None, spike: float | None) -> _ByLayer | None:
    from .errors import UsageError

    if not by_layer:
        if depth is not None or spike is not None:
            raise UsageError(None, "--depth and --spike go with --by-layer")
        return None
    return _ByLayer(depth, 4.0 if spike is None else spike)


_by_layer_options = _gathered(
    "by_layer",
    _make_by_layer,
    click.option(
        "--by-layer",
        is_flag=True,
        help="The norm of each layer at each step (layers as inspect --by-layer has them), "
        "and where each first spikes.",
    ),
    click.option(
        "--depth",
        type=click.IntRange(min=1),
        metavar="N",
        help="With --by-layer: a layer is the first N name components.",
    ),
    click.option(
        "--spike",
        type=PositiveFiniteParam(),
        metavar="K",
        help="With --by-layer: a layer is anomalous at a step where its norm exceeds K times "
        "the median of its earlier steps (from its 3rd step on).  [default: 4]",
    ),
)


@main.command()
@click.argument("files", nargs=-1, required=True, metavar="FILE...")
@_reports_errors()
@click.option(
    "--percentile",
    type=click.FloatRange(0, 100),
    default=95.0,
    show_default=True,
    help="The percentile of the norms suggested as --max-norm.",
)
@_max_norm_option(False, "Also count the steps this threshold would clip.")
@click.option(
    "--as-given",
    is_flag=True,
    help="Keep the order of the command line (default: by step; see above).",
)
@click.option(
    "--plot",
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="PNG",
    help="Also draw the norms to this image (needs matplotlib: gclip[plot]).",
)
@_by_layer_options
@_measure_options()
@_report_format_options
def history(
    files: tuple[str, ...],
    percentile: float,
    max_norm: float | None,
    as_given: bool,
    plot: Path | None,
    by_layer: _ByLayer | None,
    options: Options,
    output_format: str,
) -> None:
    """The global norm of each step's dump, a sparkline, percentiles and a suggested
    --max-norm, to choose a threshold from the history of norms.

    Files are ordered by step: a global_step or step entry of the file's metadata
    (safetensors __metadata__, HDF5 root attribute), else a 0-d integer tensor so named, else
    the number after step/iter/it in the name (extension left out), else the name's last
    number. A file without a step, or two with one step, are usage errors (exit 2) unless
    --as-given. NaN/Inf values: the report, then exit 4, unless --nonfinite zero or keep.

    With --by-layer: each layer's norm at each step (a row per layer, its sparkline on a log
    scale), the steps where it spikes, and the run's first spike (--plot: a heatmap).
    """
    from . import history as chart
    from .api import history_of

    if plot is not None:
        from .output import refuse_if_input

        refuse_if_input(plot, [f for f in files if f != "-"], "--plot")
    if by_layer is not None:
        _refuse_global_options(max_norm)
        _layer_history(files, as_given, plot, by_layer, options, output_format)
        return
    with _local(files) as (paths, names), _byte_progress() as progress:
        found = history_of(
            paths,
            percentile=percentile,
            max_norm=max_norm,
            as_given=as_given,
            options=options,
            progress=progress,
        )
    found = found.shown_as(names)
    if plot is not None:
        chart.plot(found, plot)
    _emit(found, output_format, None, human=_print_history)
    _exit_if_nonfinite(found)


def _refuse_global_options(max_norm: float | None) -> None:
    """--max-norm and --percentile are about the global norm, which --by-layer does not show."""
    source = click.get_current_context().get_parameter_source("percentile")
    if max_norm is not None or source is click.core.ParameterSource.COMMANDLINE:
        raise click.UsageError("--max-norm and --percentile do not go with --by-layer")


def _layer_history(
    files: tuple[str, ...],
    as_given: bool,
    plot: Path | None,
    by_layer: _ByLayer,
    options: Options,
    output_format: str,
) -> None:
    from . import layer_history as chart
    from .api import layer_history_of

    with _local(files) as (paths, names), _byte_progress() as progress:
        found = layer_history_of(
            paths,
            spike=by_layer.spike,
            depth=by_layer.depth,
            as_given=as_given,
            options=options,
            progress=progress,
        )
    found = found.shown_as(names)
    if plot is not None:
        chart.plot(found, plot)
    _emit(found, output_format, None, human=_print_layer_history)
    _exit_if_nonfinite(found)


WATCH_EXIT_CODES_HELP = """\b
Exit codes:
  1    --exit-on-exceed: a step exceeded --max-norm
  2    usage error
  3    the folder cannot be listed
  130  interrupted (Ctrl-C), after the summary
"""


@dataclass(frozen=True)
class _Watching:
    """watch's own options: how often to look, the threshold and what it does, the layers."""

    interval: float
    max_norm: float | None
    exit_on_exceed: bool
    spike: float
    depth: int | None


_watching_options = _gathered(
    "watching",
    _Watching,
    click.option(
        "--interval",
        type=PositiveFiniteParam(),
        default=1.0,
        show_default=True,
        metavar="SECONDS",
        help="How often to look at the folder; a dump is read once it has not changed for "
        "that long.",
    ),
    _max_norm_option(False, "Flag the steps whose global norm exceeds C."),
    click.option(
        "--exit-on-exceed",
        is_flag=True,
        help="Exit 1 at the first step over --max-norm (so that a script can stop the job).",
    ),
    click.option(
        "--spike",
        type=PositiveFiniteParam(),
        default=4.0,
        show_default=True,
        metavar="K",
        help="A layer is anomalous at a step where its norm exceeds K times the median of its "
        "earlier steps (from its 3rd step on).",
    ),
    click.option(
        "--depth",
        type=click.IntRange(min=1),
        metavar="N",
        help="A layer is the first N name components (default: up to the first number).",
    ),
)


@main.command(epilog=WATCH_EXIT_CODES_HELP)
@click.argument("folder", metavar="DIR", type=click.Path(path_type=Path))
@_reports_errors()
@_watching_options
@_measure_options()
@click.option(
    "--format",
    "output_format",
    type=click.Choice(["table", "jsonl"]),
    default="table",
    show_default=True,
    help="A line per step for people, or a JSON record per step.",
)
def watch(folder: Path, watching: _Watching, options: Options, output_format: str) -> None:
    """Follow DIR, where a training job writes its dumps: each new dump, once complete, is
    measured and printed as a step (its global norm, the running percentiles, whether it
    exceeds --max-norm, the layers anomalous in it as history --by-layer finds them).

    Temporary names (.name, *.tmp, *.part, *~) are ignored until renamed; a dump that cannot
    be read (half-written, deleted or truncated while read) is reported on stderr and skipped,
    and read again if it changes. Ctrl-C prints a summary and exits 130.
    """
    from .streams import is_terminal
    from .watch import Run, refuse_unwatchable, watch

    run = Run(options, watching.max_norm, watching.spike, watching.depth)
    refuse_unwatchable(folder, run, watching.interval, watching.exit_on_exceed)  # no header
    live = output_format == "table" and is_terminal(sys.stdout)
    with _WatchOutput(run, str(folder), output_format == "jsonl", live) as output:
        try:
            summary = watch(
                folder,
                run,
                output.emit,
                interval=watching.interval,
                exit_on_exceed=watching.exit_on_exceed,
            )
        except (KeyboardInterrupt, Interrupted):
            output.finish(run.summary("interrupted"))
            raise
        except Terminated:
            output.finish(run.summary("terminated"))
            raise
        output.finish(summary)
    sys.exit(1)


class _WatchOutput:
    """Where watch's records go: a live table on a terminal, else a line or a JSON record
    each, then the summary; skipped dumps are also named on stderr."""

    def __init__(self, run: Any, folder: str, jsonl: bool, live: bool) -> None:
        self.run, self.jsonl = run, jsonl
        self.display = None
        if live:
            from .render.tables import WatchDisplay

            self.display = WatchDisplay(_console(False), folder)

    def __enter__(self) -> _WatchOutput:
        if self.display is not None:
            self.display.__enter__()
        elif not self.jsonl:
            from .render.lines import WATCH_HEADER

            click.echo(WATCH_HEADER)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.display is not None:
            self.display.__exit__(*exc)

    def emit(self, record: Any) -> None:
        from .render.lines import skipped_line, watch_line
        from .render.machine import json_line
        from .watch import Skipped

        skipped = isinstance(record, Skipped)
        if skipped:
            click.echo(skipped_line(record), err=True)
        if self.jsonl:
            click.echo(json_line(record.to_dict()))
        elif skipped:
            return
        elif self.display is not None:
            self.display.show(record, self.run.summary("watching"))
        else:
            click.echo(watch_line(record))

    def finish(self, summary: Any) -> None:
        from .render.lines import watch_summary
        from .render.machine import json_line

        if self.display is not None:
            self.display.finish(summary)
        else:
            click.echo(json_line(summary.to_dict()) if self.jsonl else watch_summary(summary))


DIFF_EXIT_CODES_HELP = """\b
Exit codes (as cmp and h5diff):
  0    the same tensors with the same values (within --rtol/--atol; tensors not
       compared are listed)
  1    the files differ: a tensor only in one, another shape, dtype or layout, a value
  2    usage error
  3    bad input (missing, unreadable, malformed or unsupported file)
  4    NaN/Inf among the values (after the report), unless --nonfinite zero or keep
"""


@main.command(epilog=DIFF_EXIT_CODES_HELP)
@click.argument("file_a", metavar="A")
@click.argument("file_b", metavar="B")
@_reports_errors()
@_gathered("options", _make_options, *_SELECTION_OPTIONS, _DIFF_NONFINITE)
@click.option(
    "--rtol",
    type=PositiveFiniteParam(allow_zero=True),
    default=0.0,
    show_default=True,
    help="Relative tolerance: values a of A and b of B match when |a - b| <= atol + rtol * |b| "
    "(as numpy.allclose; B is the reference).",
)
@click.option(
    "--atol",
    type=PositiveFiniteParam(allow_zero=True),
    default=0.0,
    show_default=True,
    help="Absolute tolerance (see --rtol); both 0: values must be equal.",
)
@_report_format_options
def diff(
    file_a: str, file_b: str, options: Options, rtol: float, atol: float, output_format: str
) -> None:
    """Whether A and B hold the same tensors with the same values, each file's own global L2
    norm, and per tensor the L2 norms side by side, B / A and the cosine similarity: after a
    rescale every cosine is 1 and every ratio the same factor.

    Tensor names are paired with . and / alike (safetensors keys, HDF5 paths). Floating-point
    values compare as numbers; other tensors (integers, booleans) by their bytes when they fit
    in --chunk-size, else they are listed as not compared.
    """
    from .api import diff_files

    with _local((file_a, file_b)) as ((path_a, path_b), names):
        compared = diff_files(path_a, path_b, rtol=rtol, atol=atol, options=options)
    compared = compared.shown_as(names)
    _emit(compared, output_format, None, human=_print_diff)
    _exit_if_nonfinite(compared)
    sys.exit(0 if compared.same else 1)


@dataclass(frozen=True)
class _Writing:
    """How a rewriting command writes and reports: the CLI's own options."""

    no_clobber: bool
    quiet: bool
    output_format: str
    out_dir: str | None
    scheduler: str | None


def _rewrite_options(jobs_help: str = "a large file is cut into N parts") -> Decorator:
    """What every rewriting command takes: IN... OUT or --out-dir, the measuring options (as
    ``options``) and how to write and report (as ``writing``)."""
    jobs_help += "; with --out-dir, N files at once."
    return _options(
        click.argument("paths", nargs=-1, required=True, metavar="IN [IN...] OUT|--out-dir DIR"),
        _reports_errors(),
        _measure_options(jobs_help),
        _gathered(
            "writing",
            _make_writing,
            click.option(
                "--out-dir",
                metavar="DIR",
                help="Write each of several inputs (files, a directory, an *.index.json) "
                "under its own name here (a folder, or a URL prefix such as "
                "s3://bucket/run/), all by one plan (one global norm).",
            ),
            click.option(
                "--scheduler",
                metavar="ADDRESS",
                help="With --out-dir: run on a Dask cluster (ADDRESS), or 'local[:N]' for N "
                "worker processes here. Needs gclip[dask].",
            ),
            click.option(
                "--no-clobber", is_flag=True, help="Fail rather than replace an existing OUT."
            ),
            click.option("--quiet", "-q", is_flag=True, help="No summary on stderr, only errors."),
            *_REPORT_FORMAT_DECORATORS,
        ),
    )


def _make_writing(
    out_dir: str | None,
    scheduler: str | None,
    no_clobber: bool,
    quiet: bool,
    output_format: str,
    as_json: bool,
) -> _Writing:
    if scheduler and out_dir is None:
        from .errors import UsageError

        raise UsageError(None, "--scheduler goes with --out-dir")
    return _Writing(no_clobber, quiet, _output_format(output_format, as_json), out_dir, scheduler)


@main.command()
@_max_norm_option(
    False,
    "Clip so that the global norm is at most this (with --group: the "
    "limit of the tensors no group matches).",
)
@click.option("--per-tensor", is_flag=True, help="Clip each tensor by its own norm instead.")
@click.option(
    "--group",
    "groups",
    multiple=True,
    type=GroupParam(),
    help="Clip the tensors matching GLOB by their own norm, at most C (repeatable; the "
    "first match wins).",
)
@_eps_option("Added to the norm in the factor max_norm / (norm + eps); 1e-6 reproduces PyTorch.")
@_rewrite_options()
def rescale(
    paths: tuple[str, ...],
    max_norm: float | None,
    per_tensor: bool,
    groups: tuple[tuple[str, float], ...],
    eps: float,
    options: Options,
    writing: _Writing,
) -> None:
    """Write IN to OUT with every gradient scaled by max_norm / global_norm, if that is < 1.

    OUT has IN's format; non-float (and --exclude'd) tensors and all other content are copied
    untouched. OUT appears only when complete; IN is never modified. Either may be - (standard
    input or output); the report then goes to stderr.

    \b
    Other strategies:
      --per-tensor              each tensor clipped by its own norm (Keras clipnorm)
      --group 'h.*=0.5' ...     each group by its own norm; the rest by --max-norm, if given
    Sharded checkpoints (every strategy, and clip-value and normalize too):
      gclip rescale ckpt/model.safetensors.index.json --out-dir clipped --max-norm 1 -j 2
    """
    from .api import rescale_strategy

    if max_norm is None and not groups:
        raise click.UsageError("give --max-norm, or --group GLOB=C")
    strategy = rescale_strategy(max_norm, per_tensor=per_tensor, groups=groups, eps=eps)
    _rewrite("rescale", paths, strategy, options, writing)


@main.command("clip-value")
@click.option(
    "--max-value", type=PositiveFiniteParam(), required=True, help="Clamp every value to [-V, V]."
)
@_rewrite_options()
def clip_value(
    paths: tuple[str, ...], max_value: float, options: Options, writing: _Writing
) -> None:
    """Write IN to OUT with every gradient value clamped to [-V, V] (clipping by value).

    The report counts the values clamped per tensor. Clipping by value changes the gradient's
    direction; rescale keeps it.
    """
    from .strategies import ClipValue

    _rewrite("clip-value", paths, ClipValue(max_value=max_value), options, writing)


@main.command()
@click.option(
    "--target-norm",
    type=PositiveFiniteParam(),
    required=True,
    help="The global norm OUT will have.",
)
@_eps_option("Added to the norm in the factor target_norm / (norm + eps).")
@_rewrite_options()
def normalize(
    paths: tuple[str, ...], target_norm: float, eps: float, options: Options, writing: _Writing
) -> None:
    """Write IN to OUT scaled to global norm R, up or down: R / (norm + eps).

    A zero gradient stays zero; a value that would overflow its dtype is refused.
    """
    from .strategies import Normalize

    _rewrite("normalize", paths, Normalize(target_norm=target_norm, eps=eps), options, writing)


def _rewrite(
    command: str, paths: tuple[str, ...], strategy: Strategy, options: Options, writing: _Writing
) -> None:
    """Run a rewriting command: IN OUT (either may be -), or IN... --out-dir DIR."""
    if writing.out_dir is None:
        if len(paths) != 2:
            raise click.UsageError("give IN and OUT, or several inputs with --out-dir DIR")
        _rewrite_one(command, *paths, strategy, options, writing)
    else:
        _rewrite_many(paths, strategy, options, writing)


def _rewrite_one(
    command: str,
    input_file: str,
    output_file: str,
    strategy: Strategy,
    options: Options,
    writing: _Writing,
) -> None:
    """IN to OUT (incl. -), then the report (to stderr unless it is the data)."""
    from .api import rewrite_file
    from .streams import STDIO, STDOUT_NAME

    _require_one_file(input_file, command)
    with (
        _local((input_file,)) as ((src,), names),
        _destination(output_file, input_file) as dst,
        _byte_progress(enabled=not writing.quiet) as progress,
    ):
        report = rewrite_file(
            src, dst, strategy, options=options, clobber=not writing.no_clobber, progress=progress
        )
        if output_file == STDIO:
            names[dst] = STDOUT_NAME
        report = report.shown_as(names)
    if writing.output_format == "table" and writing.quiet:
        return
    to_stderr = output_file == STDIO or writing.output_format == "table"
    _emit(report, writing.output_format, None, human=_print_rescale, to_stderr=to_stderr)


def _require_one_file(input_file: str, command: str) -> None:
    """IN of a one-file rewrite may not be a folder or an index (a sharded checkpoint)."""
    from .sources import INDEX_SUFFIX

    if Path(input_file).is_dir():
        what = "a folder"
    elif input_file.endswith(INDEX_SUFFIX):
        what = "a sharded checkpoint index"
    else:
        return
    raise click.UsageError(f"{input_file} is {what}: give --out-dir DIR to {command} its files")


def _rewrite_many(
    paths: tuple[str, ...], strategy: Strategy, options: Options, writing: _Writing
) -> None:
    """Rewrite several files into --out-dir by one plan; the report as for one file."""
    from .api import rewrite_files
    from .streams import refuse_stdout_onto

    if "-" in paths:
        raise click.UsageError("standard input (-) cannot be one of several shards")
    refuse_stdout_onto(paths)  # a report appended to an input would damage it
    with _shard_progress(enabled=not writing.quiet) as shards:
        report = rewrite_files(
            paths,
            writing.out_dir,
            strategy,
            options=options,
            clobber=not writing.no_clobber,
            scheduler=writing.scheduler,
            shards=shards,
        )
    _tell_not_read(report)
    if not (writing.output_format == "table" and writing.quiet):
        to_stderr = writing.output_format == "table"
        _emit(report, writing.output_format, None, human=_print_rescale, to_stderr=to_stderr)


@contextmanager
def _byte_progress(enabled: bool = True) -> Iterator[ProgressDisplay | None]:
    """The phase, its percentage, bytes done, throughput and time left on stderr, for work
    that takes more than about a second, when stderr is a terminal: the display to give the
    library as its progress (None: no display)."""
    from .streams import is_terminal

    if not (enabled and is_terminal(sys.stderr)):
        yield None
        return
    from .progress_display import ProgressDisplay

    with ProgressDisplay(_console(stderr=True), delay=_progress_delay()) as display:
        yield display


def _progress_delay() -> float:
    """Seconds of work before the progress display shows: GCLIP_PROGRESS_DELAY, for tests
    (0 shows it at once), else 1."""
    value = _float_or_none(os.environ.get("GCLIP_PROGRESS_DELAY", ""))
    return value if value is not None and value >= 0 else 1.0


@contextmanager
def _shard_progress(enabled: bool) -> Iterator[Callable[[str, int, int], None] | None]:
    """The phase, percentage, shards done of all and time left on stderr, when stderr is a
    terminal."""
    from .streams import is_terminal

    if not (enabled and is_terminal(sys.stderr)):
        yield None
        return
    from .progress_display import ProgressDisplay

    with ProgressDisplay(_console(stderr=True), unit="shards", delay=0.0) as display:
        yield display.shards


@contextmanager
def _destination(output_file: str, input_file: str) -> Iterator[str]:
    """Where to write OUT: as given (a file or a URL), or a temporary file copied to standard
    output once complete."""
    from .streams import STDIO, stdout_file

    if output_file != STDIO:
        yield output_file
        return
    with stdout_file([input_file]) as path:
        yield str(path)


def _inspect(
    files: tuple[str, ...],
    options: Options,
    *,
    max_norm: float | None = None,
    eps: float = 0.0,
    require_counted: bool = False,
) -> InspectReport:
    """inspect_files over *files* (``-`` spooled), standard input named as such; with
    *require_counted* no report without a tensor counted (a norm of nothing is no answer)."""
    from .api import inspect_files

    with _local(files) as (paths, names), _byte_progress() as progress:
        report = inspect_files(
            paths,
            max_norm=max_norm,
            eps=eps,
            options=options,
            require_counted=require_counted,
            progress=progress,
        )
    report = report.shown_as(names)
    _tell_not_read(report)
    return report


@contextmanager
def _local(files: tuple[str, ...]) -> Iterator[tuple[list[str], dict[str, str]]]:
    """Local paths for *files* (``-`` and pipes: spools of what they hold; URLs are left to
    the library), and the names to show instead of the spools'."""
    from .streams import STDIN_NAME, STDIO, local_inputs, refuse_stdout_onto

    refuse_stdout_onto(files)  # a report appended to an input would damage it
    with local_inputs(list(files)) as paths:
        names = {
            p: STDIN_NAME if f == STDIO else f for f, p in zip(files, paths, strict=True) if p != f
        }
        yield paths, names


def _tell_not_read(report: Report) -> None:
    """On stderr, what the inputs held that gclip did not read (or copied unread)."""
    from .render.text import printable

    for path, why in report.not_read:
        click.echo(f"gclip: not read: {printable(path)}: {why}", err=True)


def _emit(
    report: Report | History | LayerHistory | Diff,
    output_format: str,
    view: View | None,
    human: Callable[[Any, bool, View | None], None],
    to_stderr: bool = False,
) -> None:
    """The report for people (human(report, to_stderr, view)) or in a format for programs."""
    if output_format == "table":
        human(report, to_stderr, view)
        return
    from .render.machine import render

    click.echo(render(report, output_format, view), err=to_stderr)


def _console(stderr: bool) -> Console:
    """The console for tables (and progress) on stdout or stderr.

    Its width is the terminal's when that stream is a terminal; otherwise (a pipe, a file, CI)
    unlimited, whatever COLUMNS says, so that every row stays on one line for grep.  --color
    always colours a pipe but does not make it a terminal: its width stays unlimited.
    """
    from .render.fitted import UNLIMITED_WIDTH, TableConsole
    from .streams import is_terminal

    width = None if is_terminal(sys.stderr if stderr else sys.stdout) else UNLIMITED_WIDTH
    color = _settings().color
    if color == "always":
        return TableConsole(stderr=stderr, width=width, force_terminal=True, highlight=False)
    if color == "never":
        return TableConsole(
            stderr=stderr, width=width, no_color=True, color_system=None, highlight=False
        )
    # Rich honours NO_COLOR and TERM=dumb
    return TableConsole(stderr=stderr, width=width, highlight=False)


def _print_inspect(report: InspectReport, to_stderr: bool, view: View | None) -> None:
    from .render.tables import print_inspect
    from .views import PLAIN

    print_inspect(report, _console(to_stderr), view or PLAIN)


def _print_history(found: History, to_stderr: bool, view: View | None) -> None:
    from .render.tables import print_history

    print_history(found, _console(to_stderr))


def _print_layer_history(found: LayerHistory, to_stderr: bool, view: View | None) -> None:
    from .render.tables import print_layer_history

    print_layer_history(found, _console(to_stderr))


def _print_diff(compared: Diff, to_stderr: bool, view: View | None) -> None:
    from .render.tables import print_diff

    print_diff(compared, _console(to_stderr))


def _print_rescale(report: RewriteReport, to_stderr: bool, view: View | None) -> None:
    """Plain lines, then the table of groups if there is one (only it needs Rich, whose import
    costs start-up)."""
    from .render.lines import has_groups_table, rescale_summary

    click.echo(rescale_summary(report), err=to_stderr)
    if has_groups_table(report):
        from .render.tables import print_groups

        print_groups(report, _console(to_stderr))
