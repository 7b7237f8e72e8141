"""The command line: a thin typer layer over ``routelog.api`` and ``routelog.render``."""

from __future__ import annotations

import enum
import errno
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import IO, TYPE_CHECKING, Annotated, Any, Literal, NoReturn, Optional, cast

import typer
from typer._click import exceptions as click  # typer >= 0.26 carries its own click
from typer.core import TyperGroup

from routelog import __version__
from routelog.errors import ExitCode, RoutelogError, printable
from routelog.render import Color, Format

if TYPE_CHECKING:
    import polars as pl

    from routelog.api import Analysis, Run
    from routelog.cache import Cache
    from routelog.check import CheckResult
    from routelog.config import Config
    from routelog.executor import Executor
    from routelog.findings import Finding
    from routelog.options import Options

_BOUNDS = {"ge": "at least", "gt": "above", "le": "at most", "lt": "below"}
_KINDS = {"int_parsing": "a whole number", "float_parsing": "a number", "bool_parsing": "a bool"}


def _usage_line(exc: click.UsageError, command: str) -> str:
    """A click usage error as one line: the command, the option, what is wrong, where to look.

    ``routelog analyze: error: --jobs: must be at least 1 (got 0); see 'routelog analyze
    --help'``. click's own words are kept where they help (``possible options: --format``,
    ``did you mean 'analyze'?``); what the user typed is shown with control characters
    escaped.
    """
    detail = exc.format_message()
    param = getattr(exc, "param", None)
    bad_value = isinstance(exc, click.BadParameter) and not isinstance(exc, click.MissingParameter)
    if bad_value and param is not None:
        opts = [o for o in param.opts if o.startswith("--")] or param.opts
        name = max(opts, key=len) if param.param_type_name == "option" else None
        name = name or str(param.metavar or param.name).upper()
        detail = f"{name}: {_value_problem(exc)}"  # type: ignore[arg-type]
    detail = detail.strip().rstrip(".")
    detail = re.sub(r"\. Did you mean (.*\?)$", r" (did you mean \1)", detail)
    detail = detail.replace("(Possible options", "(possible options")
    if detail[1:2].islower():  # "Missing argument" -> "missing argument", not "PATH" -> "pATH"
        detail = detail[:1].lower() + detail[1:]
    return f"{command}: error: {printable(detail)}; see '{command} --help'"


def _command_path(group: TyperGroup, args: Sequence[str]) -> str:
    """``routelog cache clear``: the (sub)commands named at the start of ``args``."""
    path = ["routelog"]
    current: object = group
    for arg in args:
        commands = getattr(current, "commands", {})
        if arg not in commands:
            break
        path.append(arg)
        current = commands[arg]
    return " ".join(path)


def _value_problem(exc: click.BadParameter) -> str:
    """What is wrong with an option's value, in words: ``must be at least 1 (got 0)``.

    typer checks values with pydantic, whose structured error says which bound failed and
    what was given; anything else keeps typer's message.
    """
    errors = getattr(exc.__cause__, "errors", None)
    found: dict[str, Any] = errors()[0] if callable(errors) and errors() else {}
    message = str(found.get("msg", exc.message)).removeprefix("Value error, ")
    bounds = found.get("ctx") or {}
    words = next(
        (f"must be {_BOUNDS[b]} {bounds[b]}" for b in _BOUNDS if b in bounds),
        f"must be {_KINDS[found['type']]}" if found.get("type") in _KINDS else None,
    )
    if words is None:
        return message.replace("Input should be", "must be")
    return f"{words} (got {found['input']})" if "input" in found else words


class _Group(TyperGroup):
    """The ``routelog`` group: a usage error of any command is one line on stderr, exit 2.

    click prints a usage block and the error over four lines; scripts and CI logs read one
    line per error better, and ``--help`` still shows the usage. This is the one place that
    turns click's usage errors into text, for every command and the bare ``routelog``.
    """

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, windows_expand_args, **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, windows_expand_args, **extra)
        except click.UsageError as exc:
            given = sys.argv[1:] if args is None else list(args)
            typer.echo(_usage_line(exc, _command_path(self, given)), err=True)
            sys.exit(ExitCode.BAD_INPUT)
        except click.ClickException as exc:
            typer.echo(f"routelog: error: {printable(exc.format_message())}", err=True)
            sys.exit(exc.exit_code)
        except typer.Abort:
            typer.echo("routelog: aborted", err=True)
            sys.exit(ExitCode.INTERRUPTED)
        # click returns a command's own return value, or the code of the Exit it raised.
        sys.exit(code if isinstance(code, int) else ExitCode.OK)


app = typer.Typer(
    cls=_Group,
    name="routelog",
    help="Analyze the routing logs of Mixture-of-Experts models: entropy, load, collapse.",
    context_settings={"help_option_names": ["-h", "--help"]},
    # No arguments prints the help on stdout and exits 0 (see _root); click's no_args_is_help
    # would print it on stderr and exit 2, as for a usage error.
    no_args_is_help=False,
    invoke_without_command=True,
    pretty_exceptions_enable=False,
    # Plain click help: rendering it with rich would import rich just to print --help.
    rich_markup_mode=None,
)


def _checked_now(parse: Callable[[Any], object]) -> Callable[[Any], Any]:
    """A typer callback running ``parse`` on the value as the command line is read, so a
    bad value is the command's usage error (``routelog analyze: error: --steps: ...``)."""

    def callback(value: Any) -> Any:
        from routelog.errors import UsageError

        try:
            parse(value)
        except UsageError as exc:
            raise typer.BadParameter(str(exc).partition(": ")[2] or str(exc)) from None
        return value

    return callback


def _temperature(value: float | None) -> None:
    from routelog.options import check_temperature

    check_temperature(value)


def _jsd(value: float | None) -> None:
    from routelog.config import THRESHOLD_RANGES
    from routelog.errors import UsageError

    # as thresholds.shift_jsd in a configuration (both ends are set for it)
    lo, hi = cast("tuple[float, float]", THRESHOLD_RANGES["shift_jsd"])
    if value is not None and not lo <= value <= hi:  # NaN fails too
        raise UsageError(f"--shift-threshold: must be a JSD in [{lo:g}, {hi:g}] (got {value})")


def _layers(text: str | None) -> None:
    from routelog.options import parse_layers

    parse_layers(text)


def _steps(text: str | None) -> None:
    from routelog.options import parse_steps

    parse_steps(text)


# Options shared by every command that reads runs.
TopK = Annotated[
    Optional[int],  # noqa: UP045 (typer reads the annotation at run time on Python 3.10)
    typer.Option(
        "--top-k",
        "-k",
        metavar="K",
        help="Experts each token is routed to (default: the data's k, else 1).",
    ),
]
Layers = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option(
        metavar="LAYERS", help="Layers to keep, e.g. 0,3-5.", callback=_checked_now(_layers)
    ),
]
Steps = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option(
        metavar="FROM:TO",
        help="Steps to keep, inclusive: 100:500, 100:, :500.",
        callback=_checked_now(_steps),
    ),
]
SkipBadRows = Annotated[
    bool, typer.Option("--skip-bad-rows", help="Drop and count bad rows instead of failing.")
]
Temperature = Annotated[
    Optional[float],  # noqa: UP045
    typer.Option(
        metavar="T",
        help="Divide logits by T before the softmax (what-if gate scaling).",
        callback=_checked_now(_temperature),
    ),
]


class ScoreFn(str, enum.Enum):
    """How the router turns logits into expert scores."""

    softmax = "softmax"
    sigmoid = "sigmoid"


Score = Annotated[
    ScoreFn,
    typer.Option(
        "--score",
        help="How the router scores experts from logits: softmax, or sigmoid (DeepSeek-V3 style; "
        "scores normalised to sum 1).",
    ),
]
NumExperts = Annotated[
    Optional[int],  # noqa: UP045
    typer.Option(
        "--num-experts",
        metavar="E",
        help="Experts per layer E, for top-k ids without a num_experts column.",
    ),
]
Debug = Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")]
FormatOpt = Annotated[Format, typer.Option("--format", "-f", help="Output format.")]
ColorOpt = Annotated[
    Color,
    typer.Option(
        "--color",
        help="Colour the text output: auto (on a terminal, unless NO_COLOR is set or "
        "FORCE_COLOR asks for it), always, never.",
    ),
]


class TableOrJson(str, enum.Enum):
    """The formats of the commands that describe rather than measure (inspect, config)."""

    table = "table"
    json = "json"


TableOrJsonOpt = Annotated[TableOrJson, typer.Option("--format", "-f", help="Output format.")]


class TableJsonOrCsv(str, enum.Enum):
    """The formats of ``experts`` (a heatmap, or its shares as data)."""

    table = "table"
    json = "json"
    csv = "csv"


TableJsonOrCsvOpt = Annotated[TableJsonOrCsv, typer.Option("--format", "-f", help="Output format.")]
ConfigOpt = Annotated[
    Optional[Path],  # noqa: UP045
    typer.Option(
        "--config",
        metavar="FILE",
        help="Configuration file (default: routelog.toml or pyproject.toml, searched upwards).",
    ),
]
Output = Annotated[
    Optional[Path],  # noqa: UP045
    typer.Option(
        "--output", "-o", metavar="FILE", help="Write to FILE instead of standard output."
    ),
]

Width = Annotated[
    Optional[int],  # noqa: UP045
    typer.Option(
        "--width", min=40, max=1000, metavar="COLUMNS", help="Width of the report in columns."
    ),
]
Jobs = Annotated[
    Optional[int],  # noqa: UP045
    typer.Option(
        "--jobs", "-j", metavar="N", help="Files read at once (default: one per core).", min=1
    ),
]
NoCache = Annotated[
    bool, typer.Option("--no-cache", help="Neither read nor write the per-file statistics cache.")
]
Scheduler = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option(
        "--scheduler",
        metavar="tcp://HOST:PORT|local:N",
        help="Read files on a Dask cluster: a scheduler address, or local:N worker processes "
        "(default: $DASK_SCHEDULER_ADDRESS, else the configuration's scheduler, else threads "
        "here). Needs routelog[dask].",
    ),
]
CacheDir = Annotated[
    Optional[Path],  # noqa: UP045
    typer.Option(
        "--cache-dir",
        metavar="DIR",
        help="Cache directory (default: $ROUTELOG_CACHE_DIR, else $XDG_CACHE_HOME/routelog, "
        "else ~/.cache/routelog).",
    ),
]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"routelog {__version__}")
        raise typer.Exit()


def _help_when_bare(ctx: typer.Context) -> None:
    """A group called without a command prints its help on stdout and exits 0."""
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())
        raise typer.Exit(ExitCode.OK)


@app.callback()
def _root(
    ctx: typer.Context,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """Analyze the routing logs of Mixture-of-Experts models: entropy, load, collapse.

    Example: routelog demo
    """
    _help_when_bare(ctx)


@contextmanager
def _errors(debug: bool) -> Iterator[None]:
    """Turn routelog errors into one line on stderr and an exit code (tracebacks with --debug)."""
    debug = debug or bool(os.environ.get("ROUTELOG_DEBUG"))
    try:
        yield
        # Output still buffered is written here, so that a closed pipe is seen by this handler.
        sys.stdout.flush()
    except BrokenPipeError:
        _pipe_closed()
    except RoutelogError as exc:
        if debug:
            raise
        typer.echo(f"routelog: error: {printable(str(exc))}", err=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        typer.echo("routelog: interrupted", err=True)
        raise typer.Exit(ExitCode.INTERRUPTED) from None
    except (typer.Exit, typer.Abort):
        raise
    except Exception as exc:
        if debug:
            raise
        if _out_of_memory(exc):
            typer.echo(f"routelog: error: out of memory{_memory_limit()}", err=True)
            raise typer.Exit(ExitCode.OUT_OF_MEMORY) from None
        typer.echo(
            f"routelog: internal error: {type(exc).__name__}: {printable(str(exc))} "
            "(rerun with --debug and report it)",
            err=True,
        )
        raise typer.Exit(ExitCode.INTERNAL) from None


def _say(line: str) -> None:
    """One line on stderr (what was written, why watch stopped), names in it escaped."""
    typer.echo(printable(line), err=True)


def _say_reading(analysis: Analysis) -> None:
    """For commands whose report is a file (plot, export): what reading left out, and an
    assumed k, one line each on stderr, as the text reports say them."""
    from routelog.options import ASSUMED_K_TEXT
    from routelog.render.report import data_notes

    for run in analysis.runs:
        assumed = [ASSUMED_K_TEXT] if run.top_k_assumed else []
        for note in [*assumed, *data_notes(run.summary())]:
            _say(f"{run.name}: {note}")


def _pipe_closed() -> NoReturn:
    """The reader of stdout went away (``routelog analyze RUN | head -1``): stop quietly.

    stdout is pointed at /dev/null so that the interpreter's final flush of what is still
    buffered cannot fail again ("Exception ignored ... BrokenPipeError"), and the exit code
    is the shell's for a process killed by SIGPIPE, never 1 (a failed check).
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a real file (a test runner's buffer)
        pass
    finally:
        os.close(devnull)
    raise typer.Exit(ExitCode.BROKEN_PIPE)


def _into_place(output: Path, write: Callable[[Any], object], *, binary: bool = False) -> None:
    """Run ``write`` on a stream to ``output``: a file is written beside its final name (a
    link's target) and renamed into place when complete, so an interrupted or failed report
    leaves the previous file, or none, never half of one; a device or a pipe
    (``/dev/stdout``, ``>(...)``) is written as it is. OSError goes to the caller."""
    mode, encoding = ("wb", None) if binary else ("w", "utf-8")
    if output.exists() and not output.is_file():
        with output.open(mode, encoding=encoding) as stream:
            write(stream)
        return
    target = output.resolve()
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        with partial.open(mode, encoding=encoding) as stream:
            write(stream)
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)


def _emit(output: Path | None, write: Callable[[object], None]) -> None:
    """Run ``write`` against stdout or the --output file (checked by ``_check_output``),
    which is written whole or not at all (:func:`_into_place`)."""
    if output is None:
        write(sys.stdout)
        return
    try:
        _into_place(output, write)
    except OSError as exc:
        from routelog.errors import UsageError

        if exc.errno == errno.EPIPE:  # -o /dev/stdout | head
            _pipe_closed()
        raise UsageError(f"{output}: cannot write the report: {exc.strerror or exc}") from None


def _check_output(
    output: Path | None, inputs: list[str], option: str = "--output", *, folder: bool = False
) -> None:
    """Refuse, before anything is read, an ``option`` (a file, or a ``folder`` to write
    files in) that would overwrite a log or land inside a run being read: every command
    that writes calls it on every path it will write to."""
    from routelog.api import RunSpec
    from routelog.errors import UsageError
    from routelog.storage import Remote, local_path

    if output is None:
        return
    output = local_path(str(output))  # a link loop is refused
    if not folder and output.is_dir():
        raise UsageError(f"{output}: {option} names a directory; give a file name")
    if not folder and not output.parent.is_dir():
        raise UsageError(f"{output}: {option} folder {output.parent} does not exist")
    target = output.resolve()
    for text in inputs:
        location = RunSpec.parse(text).path
        if isinstance(location, Remote):  # an object in a bucket: no local file to overwrite
            continue
        run = location.resolve()
        if target == run or run in target.parents:
            raise UsageError(
                f"{output}: {option} would write into the input {text}; "
                "routelog never modifies the logs it reads"
            )


def _arrow_memory_pool() -> None:
    """Read with pyarrow's jemalloc pool when pyarrow has one and the environment does not
    choose (``ARROW_DEFAULT_MEMORY_POOL``): it hands the memory of decoded row groups back
    sooner than the default mimalloc pool (bench (d), the peak RSS growth for 4x the data:
    31% with mimalloc, 20% with jemalloc, at the same speed). Under an address-space limit
    (``ulimit -v``) the system allocator instead: jemalloc and mimalloc reserve address space
    in large pieces per thread, and under a 2 GiB limit with 32 threads every one of 5 runs
    aborted, hung or failed to start a thread (16 threads: 4 of 5; the system pool: none).
    The CLI's process only: the Python API leaves the pool of the process it runs in alone."""
    if os.environ.get("ARROW_DEFAULT_MEMORY_POOL"):
        return
    if _address_space_limit() is not None:
        # Through the environment: Arrow's C++ code allocates from the pool it reads there
        # (set_memory_pool changes pyarrow's only), and local Dask workers inherit it.
        os.environ["ARROW_DEFAULT_MEMORY_POOL"] = "system"
        return
    import pyarrow as pa

    if "jemalloc" in pa.supported_memory_backends():  # not in every pyarrow build
        pa.set_memory_pool(pa.jemalloc_memory_pool())


def _out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says memory ran out: a MemoryError, an OSError with ENOMEM, or a library
    that could not be mapped into the address space (a lazy import under ``ulimit -v``)."""
    if isinstance(exc, MemoryError):
        return True
    if isinstance(exc, OSError) and exc.errno == errno.ENOMEM:
        return True
    return isinstance(exc, ImportError) and "failed to map segment" in str(exc)


def _memory_limit() -> str:
    """What follows "out of memory": the address-space limit, if there is one."""
    limit = _address_space_limit()
    if limit is None:
        return ""
    size = f"{limit / 2**30:.1f} GiB" if limit >= 2**30 else f"{limit // 2**20} MiB"
    return f": the address space is limited to {size} (ulimit -v)"


def _address_space_limit() -> int | None:
    """The limit on this process's address space in bytes (``ulimit -v``), or None."""
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    return None if limit == resource.RLIM_INFINITY else limit


@dataclass(frozen=True)
class _Reading:
    """The input flags that analyze, compare and check share, as one value."""

    config: Path | None = None
    top_k: int | None = None
    layers: str | None = None
    steps: str | None = None
    skip_bad_rows: bool = False
    temperature: float | None = None
    score: ScoreFn = ScoreFn.softmax
    num_experts: int | None = None
    jobs: int | None = None
    no_cache: bool = False
    cache_dir: Path | None = None
    scheduler: str | None = None

    @classmethod
    def of(cls, flags: dict[str, Any]) -> _Reading:
        """The reading flags among a command's parameters (``locals()``), by name; a flag the
        command does not take keeps its default."""
        return cls(**{f.name: flags[f.name] for f in fields(cls) if f.name in flags})

    def prepare(self, paths: Sequence[str] = ()) -> tuple[Config, Options, Cache | None]:
        """The configuration, the reading options built from it and the flags, the cache
        (refused inside one of the runs ``paths``: it would write there)."""
        from routelog import api
        from routelog.cache import Cache
        from routelog.config import load_config

        _arrow_memory_pool()
        settings = load_config(self.config)
        options = api.options_from(
            settings,
            top_k=self.top_k,
            layers=self.layers,
            steps=self.steps,
            skip_bad_rows=self.skip_bad_rows,
            temperature=self.temperature,
            score=self.score.value,
            num_experts=self.num_experts,
        )
        cache = None if self.no_cache else Cache.at(self.cache_dir)
        if cache is not None:
            _check_output(cache.directory, list(paths), "--cache-dir", folder=True)
        return settings, options, cache

    def runs(self, paths: list[str]) -> tuple[Config, Options, list[Run]]:
        """Read ``paths`` as runs, with a progress bar on stderr."""
        from routelog import api
        from routelog.render.progress import FileProgress

        settings, options, cache = self.prepare(paths)
        with self.executor(settings) as executor, FileProgress() as progress:
            runs = api.load_runs(paths, options, progress, cache=cache, executor=executor)
        return settings, options, runs

    def executor(self, settings: Config) -> AbstractContextManager[Executor]:
        """Where files are read: a Dask cluster, or threads here."""
        from routelog import api
        from routelog.executor import open_executor, scheduler_from

        jobs = self.jobs if self.jobs is not None else api.default_jobs()
        return open_executor(scheduler_from(self.scheduler, settings.scheduler), jobs)

    def analysis(self, paths: list[str]) -> Analysis:
        """Analyze ``paths``: metrics and findings, with a progress bar on stderr."""
        from routelog import api
        from routelog.render.progress import FileProgress

        settings, options, cache = self.prepare(paths)
        with self.executor(settings) as executor, FileProgress() as progress:
            return api.analyze(
                paths,
                options=options,
                config=settings,
                progress=progress,
                cache=cache,
                executor=executor,
            )


@app.command()
def analyze(
    paths: Annotated[
        list[str],
        typer.Argument(metavar="PATH", help="Runs: log files or directories, PATH or NAME=PATH."),
    ],
    top_k: TopK = None,
    layers: Layers = None,
    steps: Steps = None,
    skip_bad_rows: SkipBadRows = False,
    temperature: Temperature = None,
    score: Score = ScoreFn.softmax,
    num_experts: NumExperts = None,
    fmt: FormatOpt = Format.table,
    output: Output = None,
    config: ConfigOpt = None,
    plot: Annotated[
        bool, typer.Option("--plot", help="Chart token and load entropy over steps.")
    ] = False,
    values: Annotated[
        bool,
        typer.Option(
            "--values",
            help="Print each heatmap cell's share (mass P_i with probabilities, else load f_i).",
        ),
    ] = False,
    width: Width = None,
    jobs: Jobs = None,
    no_cache: NoCache = False,
    cache_dir: CacheDir = None,
    scheduler: Scheduler = None,
    color: ColorOpt = Color.auto,
    debug: Debug = False,
) -> None:
    """Per-layer, per-step routing entropy and load of one or more runs, and a diagnosis.

    Example: routelog analyze runs/mixtral --top-k 2 --plot
    """
    with _errors(debug):
        _check_output(output, paths)
        result = _Reading.of(locals()).analysis(paths)

        _emit(
            output,
            _analysis_writer(result, fmt, width=width, color=color, plot=plot, values=values),
        )


def _analysis_writer(
    result: Analysis,
    fmt: Format,
    *,
    width: int | None,
    color: Color = Color.auto,
    plot: bool = False,
    values: bool = False,
) -> Callable[[object], None]:
    """Write an analysis in ``fmt`` to a stream (``analyze``, and ``watch``'s final report)."""
    from routelog.render import data, make_console, markdown, report

    def write(stream: object) -> None:
        if fmt is Format.json:
            stream.write(data.to_json(report.analysis_document(result)))  # type: ignore[attr-defined]
        elif fmt is Format.csv:
            stream.write(report.metrics_csv(result))  # type: ignore[attr-defined]
        elif fmt is Format.markdown:
            stream.write(markdown.analysis_markdown(result))  # type: ignore[attr-defined]
        elif fmt is Format.html:
            from routelog.render.html import analysis_html

            stream.write(analysis_html(result))  # type: ignore[attr-defined]
        else:
            console = make_console(stream, width=width, color=color)  # type: ignore[arg-type]
            report.print_report(result, console, plot=plot, values=values)

    return write


class FailOn(str, enum.Enum):
    """The finding severity at which ``watch`` stops."""

    warn = "warn"
    fail = "fail"


@app.command()
def watch(
    paths: Annotated[
        list[str],
        typer.Argument(help="Runs being written: directories or files, PATH or NAME=PATH."),
    ],
    interval: Annotated[
        float, typer.Option("--interval", min=0.1, help="Seconds between two looks at the runs.")
    ] = 10.0,
    fail_on: Annotated[
        Optional[FailOn],  # noqa: UP045
        typer.Option(
            "--fail-on", help="Exit 1 at the first finding this severe (warn: any finding)."
        ),
    ] = None,
    top_k: TopK = None,
    layers: Layers = None,
    steps: Steps = None,
    skip_bad_rows: SkipBadRows = False,
    temperature: Temperature = None,
    score: Score = ScoreFn.softmax,
    num_experts: NumExperts = None,
    fmt: Annotated[
        Format, typer.Option("--format", "-f", help="Format of the final report.")
    ] = Format.table,
    output: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option("--output", "-o", help="Write the final report to FILE."),
    ] = None,
    config: ConfigOpt = None,
    width: Width = None,
    jobs: Jobs = None,
    no_cache: NoCache = False,
    cache_dir: CacheDir = None,
    scheduler: Scheduler = None,
    color: ColorOpt = Color.auto,
    debug: Debug = False,
) -> None:
    """Follow runs while they are written: re-analyse as step files appear or grow.

    On a terminal the report is redrawn in place; otherwise each new finding is printed
    once, as one line, with a status line per new step. Files still being written are left
    for a later look. Ctrl-C stops with the final report (exit 0); --fail-on stops with
    exit 1 at the first such finding.

    Example: routelog watch runs/exp1 --interval 30 --fail-on fail
    """
    with _errors(debug):
        import time

        from routelog.api import RunSpec
        from routelog.check import require_known_k
        from routelog.render import make_console
        from routelog.render import watch as view
        from routelog.watch import Watcher

        _check_output(output, paths)
        reading = _Reading.of(locals())
        settings, options, cache = reading.prepare(paths)
        console = make_console(sys.stdout, width=width, color=color)
        display: view.Display = (
            view.LiveDisplay(console, interval)
            if console.is_terminal and not console.is_dumb_terminal
            else view.LineDisplay(console)
        )
        code = ExitCode.OK
        watcher: Watcher | None = None
        try:
            with reading.executor(settings) as executor, display:
                watcher = Watcher(
                    [RunSpec.parse(p) for p in paths], options, settings, cache, executor
                )
                while True:
                    round_ = watcher.poll()
                    if fail_on is not None and round_.analysis is not None:
                        require_known_k(round_.analysis)  # --fail-on is a gate, as check is
                    display.show(round_)
                    hit = _first_at(round_.new_findings, fail_on)
                    if hit is not None and fail_on is not None:
                        _say(view.fail_line(hit, fail_on.value))
                        code = ExitCode.CHECK_FAILED
                        break
                    time.sleep(interval)
        except KeyboardInterrupt:
            pass
        _final_report(watcher.final() if watcher is not None else None, fmt, output, width, color)
        raise typer.Exit(code)


def _first_at(findings: list[Finding], level: FailOn | None) -> Finding | None:
    """The first finding at least as severe as ``level`` (none without a level)."""
    from routelog.watch import at_least

    if level is None:
        return None
    return next((f for f in findings if at_least(f, level.value)), None)


def _final_report(
    result: Analysis | None, fmt: Format, output: Path | None, width: int | None, color: Color
) -> None:
    """``watch``'s last analysis, written like ``analyze`` writes it."""
    if result is None:
        _say("routelog: watch: no complete log file was seen")
        return
    _emit(output, _analysis_writer(result, fmt, width=width, color=color))


@app.command()
def experts(
    path: Annotated[
        str, typer.Argument(help="The run: a log file or directory, PATH or NAME=PATH.")
    ],
    layer: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(
            "--layer", "-l", help="The layer to draw (default: the one with most dead experts)."
        ),
    ] = None,
    sort: Annotated[
        Literal["death", "final", "expert"],
        typer.Option(help="Row order: death (dead first, earliest first), final share, or id."),
    ] = "death",
    rows: Annotated[
        int,
        typer.Option(
            min=2, help="Experts shown at most: the lowest and highest, the rest counted."
        ),
    ] = 40,
    share: Annotated[
        Literal["load", "mass"],
        typer.Option(help="load: count share f_i; mass: probability mass P_i (needs probs)."),
    ] = "load",
    top_k: TopK = None,
    layers: Layers = None,
    steps: Steps = None,
    skip_bad_rows: SkipBadRows = False,
    temperature: Temperature = None,
    score: Score = ScoreFn.softmax,
    num_experts: NumExperts = None,
    fmt: TableJsonOrCsvOpt = TableJsonOrCsv.table,
    output: Output = None,
    config: ConfigOpt = None,
    width: Width = None,
    jobs: Jobs = None,
    no_cache: NoCache = False,
    cache_dir: CacheDir = None,
    scheduler: Scheduler = None,
    color: ColorOpt = Color.auto,
    debug: Debug = False,
) -> None:
    """Each expert of one layer over steps: which experts die, and when.

    A heatmap with one row per expert and one column per step; JSON gives every layer's
    per-expert, per-step shares (one layer with --layer).

    Example: routelog experts sample_logs/collapse --top-k 2 --layer 3
    """
    with _errors(debug):
        from routelog.errors import UsageError
        from routelog.experts import shares_frame
        from routelog.render import data, make_console
        from routelog.render import experts as view
        from routelog.render.report import data_notes

        _check_output(output, [path])
        result = _Reading.of(locals()).analysis([path])
        history = result.expert_histories()
        metric = "load_share" if share == "load" else "mass_share"
        if metric == "mass_share" and all(h.mass is None for h in history):
            raise UsageError(
                f"{path}: --share mass needs router probabilities; these logs hold "
                "counts or selected ids only (use --share load)"
            )
        present = [h.layer for h in history]
        if layer is not None:
            if layer not in present:
                raise UsageError(
                    f"{path}: no layer {layer}; the run has layers {', '.join(map(str, present))}"
                )
            history = [h for h in history if h.layer == layer]
        dead_fraction = result.options.dead_fraction

        def write(stream: object) -> None:
            if fmt is TableJsonOrCsv.json:
                document = view.experts_document(
                    history, dead_fraction=dead_fraction, metric=metric
                )
                stream.write(data.to_json(document))  # type: ignore[attr-defined]
            elif fmt is TableJsonOrCsv.csv:
                stream.write(data.to_csv(shares_frame(history)))  # type: ignore[attr-defined]
            else:
                chosen, why = view.pick_layer(history) if layer is None else (history[0], "")
                console = make_console(stream, width=width, color=color)  # type: ignore[arg-type]
                view.print_experts(
                    chosen,
                    console,
                    dead_fraction=dead_fraction,
                    sort=sort,
                    rows=rows,
                    metric=metric,
                    why=why,
                    notes=data_notes(result.runs[0].summary()),
                )

        _emit(output, write)


@app.command()
def plot(
    path: Annotated[
        str, typer.Argument(help="The run: a log file or directory, PATH or NAME=PATH.")
    ],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="The figure: FILE.png, FILE.svg or FILE.pdf.")
    ],
    kind: Annotated[
        Literal["both", "entropy", "experts"],
        typer.Option(
            help="both: per layer, entropy and expert load side by side; entropy or experts: "
            "a grid of that panel."
        ),
    ] = "both",
    per_layer: Annotated[
        bool,
        typer.Option("--per-layer", help="One file per layer: FILE_layer03.png, ..."),
    ] = False,
    dpi: Annotated[int, typer.Option(min=50, max=1200, help="Resolution of PNG output.")] = 200,
    top_k: TopK = None,
    layers: Layers = None,
    steps: Steps = None,
    skip_bad_rows: SkipBadRows = False,
    temperature: Temperature = None,
    score: Score = ScoreFn.softmax,
    num_experts: NumExperts = None,
    config: ConfigOpt = None,
    jobs: Jobs = None,
    no_cache: NoCache = False,
    cache_dir: CacheDir = None,
    scheduler: Scheduler = None,
    debug: Debug = False,
) -> None:
    """Figures for a paper or a slide: entropy over steps and expert load, per layer
    (matplotlib: pip install 'routelog[plot]').

    Example: routelog plot sample_logs/collapse --top-k 2 -o collapse.pdf
    """
    with _errors(debug):
        from routelog.render import figures

        figures.figure_format(output)
        _check_output(output, [path])
        figures.matplotlib_figure()  # a missing extra fails before the run is read
        result = _Reading.of(locals()).analysis([path])
        if per_layer:
            written = []
            for layer in sorted(set(result.metrics["layer"].to_list())):
                target = figures.per_layer_path(output, layer)
                figures.save(figures.draw(result, kind=kind, layers=[layer]), target, dpi=dpi)
                written.append(target)
            names = [str(written[0]), *(p.name for p in written[1:])]
            listed = ", ".join(names) if len(names) <= 3 else f"{names[0]} ... {names[-1]}"
            _say(f"wrote {len(written)} figure{'s' if len(written) > 1 else ''}: {listed}")
        else:
            figures.save(figures.draw(result, kind=kind), output, dpi=dpi)
            _say(f"wrote {output}")
        _say_reading(result)


@app.command()
def export(
    path: Annotated[
        str, typer.Argument(help="The run: a log file or directory, PATH or NAME=PATH.")
    ],
    tensorboard: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option("--tensorboard", metavar="DIR", help="Write TensorBoard event files to DIR."),
    ] = None,
    wandb: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            "--wandb",
            metavar="PROJECT[/RUN_ID]",
            help="Log to this W&B project (resuming run RUN_ID: the metrics join that run).",
        ),
    ] = None,
    top_k: TopK = None,
    layers: Layers = None,
    steps: Steps = None,
    skip_bad_rows: SkipBadRows = False,
    temperature: Temperature = None,
    score: Score = ScoreFn.softmax,
    num_experts: NumExperts = None,
    config: ConfigOpt = None,
    jobs: Jobs = None,
    no_cache: NoCache = False,
    cache_dir: CacheDir = None,
    scheduler: Scheduler = None,
    debug: Debug = False,
) -> None:
    """Routing metrics and findings to TensorBoard or W&B, next to the loss curve: every
    metric per layer at its step; only steps not exported before (run it after each round).

    Example: routelog export sample_logs/collapse --top-k 2 --tensorboard runs/exp1
    """
    with _errors(debug):
        from routelog.errors import UsageError
        from routelog.extras import require

        if tensorboard is None and wandb is None:
            raise UsageError("nothing to export to: give --tensorboard DIR and/or --wandb PROJECT")
        _check_output(tensorboard, [path], "--tensorboard", folder=True)
        # a missing extra fails before the run is read
        if tensorboard is not None:
            require("tensorboard", "tensorboard", "routelog export --tensorboard")
        if wandb is not None:
            from routelog.export import wandb as to_wandb

            to_wandb.parse_target(wandb)
            require("wandb", "wandb", "routelog export --wandb")
        result = _Reading.of(locals()).analysis([path])
        run = result.runs[0].name
        if tensorboard is not None:
            from routelog.export import tensorboard as to_tensorboard

            done = to_tensorboard.export(tensorboard, run, result.metrics, result.findings)
            _say(f"tensorboard {tensorboard}: {done.describe()}")
        if wandb is not None:
            from routelog.export import wandb as to_wandb

            done = to_wandb.export(wandb, run, result.metrics, result.findings)
            _say(f"wandb {wandb} (run {done.where}): {done.describe()}")
        _say_reading(result)


@app.command()
def demo(
    path: Annotated[
        bool, typer.Option("--path", help="Print the sample's directory instead of analyzing it.")
    ] = False,
    width: Width = None,
    debug: Debug = False,
) -> None:
    """Analyze the small collapsing run shipped with routelog (8 experts, top-2; layers 2 and 3
    collapse at step 500). --path prints its directory, to try the other commands on it.

    Example: routelog check "$(routelog demo --path)" --top-k 2
    """
    from routelog.samples import SAMPLE_TOP_K, sample_path

    if path:
        typer.echo(str(sample_path()))
        return
    analyze([str(sample_path())], top_k=SAMPLE_TOP_K, width=width, debug=debug)


@app.command()
def inspect(
    paths: Annotated[
        list[str], typer.Argument(metavar="PATH", help="Log files or run directories.")
    ],
    skip_bad_rows: SkipBadRows = False,
    num_experts: NumExperts = None,
    top_k: TopK = None,
    config: ConfigOpt = None,
    fmt: TableOrJsonOpt = TableOrJson.table,
    output: Output = None,
    color: ColorOpt = Color.auto,
    debug: Debug = False,
) -> None:
    """What routelog detects in each log file, without computing metrics.

    Per file: format, layout, payload kind, steps, layers, E, k, rows, masked and skipped rows.

    Example: routelog inspect runs/mixtral --format json
    """
    with _errors(debug):
        _check_output(output, paths)
        from routelog import api
        from routelog.render import data, make_console
        from routelog.render import inspect as render_inspect

        _, options, _ = _Reading.of(locals()).prepare()
        infos = api.inspect(paths, options=options)
        ks = api.inspect_k(paths, infos, options)

        def write(stream: object) -> None:
            if fmt is TableOrJson.json:
                document = render_inspect.inspect_document(infos, ks)
                stream.write(data.to_json(document))  # type: ignore[attr-defined]
            else:
                console = make_console(stream, color=color)  # type: ignore[arg-type]
                render_inspect.print_inspect(infos, console, ks)

        _emit(output, write)


@app.command("config")
def config_command(
    config: ConfigOpt = None,
    fmt: TableOrJsonOpt = TableOrJson.table,
    color: ColorOpt = Color.auto,
    debug: Debug = False,
) -> None:
    """Print the effective configuration and where each value came from.

    Example: routelog config --config routelog.toml --format json
    """
    with _errors(debug):
        from routelog.config import load_config
        from routelog.render import data, make_console
        from routelog.render.settings import config_document, print_config

        settings = load_config(config)
        if fmt is TableOrJson.json:
            sys.stdout.write(data.to_json(config_document(settings)))
        else:
            print_config(settings, make_console(sys.stdout, color=color))


class By(str, enum.Enum):
    """What ``compare`` puts side by side."""

    run = "run"
    dataset = "dataset"


class AlignOpt(str, enum.Enum):
    """How ``compare`` pairs steps."""

    exact = "exact"
    nearest = "nearest"


@app.command()
def compare(
    paths: Annotated[
        list[str],
        typer.Argument(
            metavar="PATH",
            help="Runs, the baseline first (PATH or NAME=PATH); one with --by dataset.",
        ),
    ],
    by: Annotated[By, typer.Option(help="Compare runs, or the datasets of one run.")] = By.run,
    base: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            metavar="DATASET",
            help="With --by dataset: the baseline dataset (default: the first).",
        ),
    ] = None,
    step: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(
            metavar="STEP",
            help="Compare at this step (default: the latest step every run logged).",
        ),
    ] = None,
    align: Annotated[
        AlignOpt,
        typer.Option(help="nearest: pair with each run's latest logged step at or before."),
    ] = AlignOpt.exact,
    shift_threshold: Annotated[
        Optional[float],  # noqa: UP045
        typer.Option(
            metavar="JSD",
            help="With --by dataset: JSD above which a layer has shifted (default: "
            "thresholds.shift_jsd of the configuration, 0.1).",
            callback=_checked_now(_jsd),
        ),
    ] = None,
    top_k: TopK = None,
    layers: Layers = None,
    steps: Steps = None,
    skip_bad_rows: SkipBadRows = False,
    temperature: Temperature = None,
    score: Score = ScoreFn.softmax,
    num_experts: NumExperts = None,
    jobs: Jobs = None,
    no_cache: NoCache = False,
    cache_dir: CacheDir = None,
    scheduler: Scheduler = None,
    fmt: FormatOpt = Format.table,
    output: Output = None,
    config: ConfigOpt = None,
    plot: Annotated[
        bool, typer.Option("--plot", help="Chart each run's token entropy, one chart per layer.")
    ] = False,
    width: Width = None,
    color: ColorOpt = Color.auto,
    debug: Debug = False,
) -> None:
    """Routing of runs (or of one run's datasets) side by side, with deltas from the first.

    Example: routelog compare base=runs/healthy runs/mixtral --top-k 2
    """
    with _errors(debug):
        _check_output(output, paths)
        from routelog.compare import compare_datasets, compare_runs
        from routelog.errors import UsageError
        from routelog.render import compare as view
        from routelog.render import data, make_console

        if by is By.dataset and len(paths) != 1:
            raise UsageError(f"--by dataset compares the datasets of one run, got {len(paths)}")
        if by is By.run and base is not None:
            raise UsageError(
                "--base names a dataset (with --by dataset); the first run is the baseline"
            )
        settings, options, runs = _Reading.of(locals()).runs(paths)
        if by is By.dataset:
            (run,) = runs
            result = compare_datasets(
                run,
                options,
                base=base,
                step=step,
                align=align.value,
                threshold=(
                    shift_threshold
                    if shift_threshold is not None
                    else settings.thresholds.shift_jsd
                ),
            )
        else:
            result = compare_runs(runs, options, step=step, align=align.value)

        def write(stream: object) -> None:
            if fmt is Format.json:
                stream.write(data.to_json(view.comparison_document(result)))  # type: ignore[attr-defined]
            elif fmt is Format.csv:
                stream.write(view.comparison_csv(result))  # type: ignore[attr-defined]
            elif fmt is Format.markdown:
                stream.write(view.to_markdown(result))  # type: ignore[attr-defined]
            elif fmt is Format.html:
                from routelog.render.html import comparison_html

                page = comparison_html(result, settings, options.dead_fraction)
                stream.write(page)  # type: ignore[attr-defined]
            else:
                console = make_console(stream, width=width, color=color)  # type: ignore[arg-type]
                view.print_comparison(result, console, plot=plot)

        _emit(output, write)


@app.command()
def check(
    paths: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Argument(
            metavar="PATH",
            help="Runs to check: log files or directories, PATH or NAME=PATH.",
        ),
    ] = None,
    config: ConfigOpt = None,
    baseline: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(metavar="PATH", help="A known-good run for the max_regression rules."),
    ] = None,
    align: Annotated[
        AlignOpt,
        typer.Option(
            help="With --baseline: nearest pairs the baseline's latest step with each run's "
            "latest step at or before it (default: the latest step both logged)."
        ),
    ] = AlignOpt.exact,
    minimum: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option(
            "--min",
            metavar="METRIC=VALUE",
            help="METRIC=VALUE: fail a layer below VALUE (repeatable).",
        ),
    ] = None,
    maximum: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option(
            "--max",
            metavar="METRIC=VALUE",
            help="METRIC=VALUE: fail a layer above VALUE (repeatable).",
        ),
    ] = None,
    max_regression: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option(
            "--max-regression",
            metavar="METRIC=TOL",
            help="METRIC=TOL: fail a layer whose METRIC moved towards collapse by more than "
            "TOL from --baseline (repeatable).",
        ),
    ] = None,
    window: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(
            min=1, metavar="N", help="Check each metric's mean over the last N logged steps."
        ),
    ] = None,
    strict: Annotated[
        bool, typer.Option("--strict", help="Also fail on findings no longer active.")
    ] = False,
    junit: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option("--junit", metavar="FILE", help="Write a JUnit XML report to FILE."),
    ] = None,
    github: Annotated[
        bool,
        typer.Option(
            "--github",
            help="GitHub Actions annotations on stdout, and a summary to $GITHUB_STEP_SUMMARY.",
        ),
    ] = False,
    suggest: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            "--suggest",
            metavar="BASELINE",
            help="Print thresholds a margin outside this healthy run's values, as TOML.",
        ),
    ] = None,
    top_k: TopK = None,
    layers: Layers = None,
    steps: Steps = None,
    skip_bad_rows: SkipBadRows = False,
    temperature: Temperature = None,
    score: Score = ScoreFn.softmax,
    num_experts: NumExperts = None,
    jobs: Jobs = None,
    no_cache: NoCache = False,
    cache_dir: CacheDir = None,
    scheduler: Scheduler = None,
    fmt: FormatOpt = Format.table,
    color: ColorOpt = Color.auto,
    output: Output = None,
    debug: Debug = False,
) -> None:
    """Gate CI on routing health: exit 0 when every rule passes, 1 when one fails, 2 on bad
    input or configuration. Rules: fail findings, thresholds, regression from a baseline.

    Example: routelog check runs/mixtral --top-k 2 --min token_entropy_norm=0.2
    """
    with _errors(debug):
        from routelog.check import check as run_check
        from routelog.errors import UsageError
        from routelog.render import check as render_check
        from routelog.render import data, make_console

        read = _Reading.of(locals()).analysis
        if suggest is not None:
            if paths:
                raise UsageError("--suggest reads the healthy run only: give no PATH with it")
            _check_output(output, [suggest])
            suggestion = _suggestion(read([suggest]), window)
            _emit(output, lambda stream: stream.write(suggestion))  # type: ignore[attr-defined]
            return
        if not paths:
            raise UsageError("no run given: routelog check PATH... (or --suggest BASELINE)")
        if github and fmt is not Format.table and output is None:
            raise UsageError(
                "--github writes annotations to stdout: use it with --format table or -o FILE"
            )
        if max_regression and baseline is None:
            raise UsageError("--max-regression needs a baseline run: pass --baseline PATH")
        inputs = [*paths, *([baseline] if baseline is not None else [])]
        _check_output(output, inputs)
        _check_output(junit, inputs, "--junit")
        if github and os.environ.get("GITHUB_STEP_SUMMARY"):
            _check_output(Path(os.environ["GITHUB_STEP_SUMMARY"]), inputs, "GITHUB_STEP_SUMMARY")
        analysis = read(paths)
        settings = analysis.config.check.with_flags(
            minimum=minimum, maximum=maximum, max_regression=max_regression
        )
        base = read([baseline]) if baseline is not None else None
        result = run_check(
            analysis, settings, baseline=base, align=align.value, window=window, strict=strict
        )

        def write(stream: object) -> None:
            out: IO[str] = stream  # type: ignore[assignment]
            if fmt is Format.json:
                out.write(data.to_json(render_check.check_document(result)))
            elif fmt is Format.csv:
                out.write(data.to_csv(_rule_frame(result)))
            elif fmt is Format.markdown:
                out.write(render_check.markdown_summary(result))
            elif fmt is Format.html:
                from routelog.render.html import check_html

                out.write(check_html(result, analysis))
            else:
                render_check.print_check(result, make_console(out, color=color))

        _emit(output, write)
        if junit is not None:
            _write(junit, render_check.junit_xml(result), "--junit")
        if github:
            sys.stdout.write(render_check.github_annotations(result))
            summary = os.environ.get("GITHUB_STEP_SUMMARY")
            if summary:
                text = render_check.markdown_summary(result).encode()
                _write(Path(summary), text, "GITHUB_STEP_SUMMARY", append=True)
        if not result.passed:
            raise typer.Exit(ExitCode.CHECK_FAILED)


def _suggestion(analysis: Analysis, window: int | None) -> str:
    from routelog.check import require_known_k, suggest
    from routelog.render.check import suggestion_toml

    require_known_k(analysis)  # count-based thresholds measured at an assumed k mislead
    run = analysis.runs[0]
    return suggestion_toml(
        suggest(analysis.metrics, window),
        run=run.name,
        step=int(analysis.metrics["step"].max()),  # type: ignore[arg-type]
        top_k=sorted(set(run.stats["top_k"].drop_nulls().to_list())),
        window=window,
    )


def _rule_frame(result: CheckResult) -> pl.DataFrame:
    """One CSV row per rule and layer."""
    import polars as pl

    schema = {"value": pl.Float64, "threshold": pl.Float64}
    rules = [r.to_dict() for r in result.rules]
    return pl.DataFrame(rules, schema_overrides=schema, infer_schema_length=None)


def _write(path: Path, content: bytes, what: str, *, append: bool = False) -> None:
    """Write (:func:`_into_place`) or append to a report file; ``what`` names it in errors."""
    from routelog.errors import UsageError

    try:
        if append:
            with path.open("ab") as stream:
                stream.write(content)
        else:
            _into_place(path, lambda stream: stream.write(content), binary=True)
    except OSError as exc:
        raise UsageError(f"{path}: cannot write the {what} file: {exc.strerror}") from None


cache_app = typer.Typer(
    help="Inspect or empty the per-file statistics cache.\n\nExample: routelog cache clear",
    invoke_without_command=True,
    rich_markup_mode=None,
)
app.add_typer(cache_app, name="cache")


@cache_app.callback()
def _cache_root(ctx: typer.Context) -> None:
    _help_when_bare(ctx)


@cache_app.command("info")
def cache_info(
    cache_dir: CacheDir = None, color: ColorOpt = Color.auto, debug: Debug = False
) -> None:
    """Where the cache is, how many entries it holds and their size.

    Example: routelog cache info
    """
    with _errors(debug):
        from rich.text import Text

        from routelog.cache import Cache
        from routelog.render import make_console

        usage = Cache.at(cache_dir).usage()
        console = make_console(sys.stdout, color=color)
        for key, value in (
            ("directory", printable(str(usage.directory))),
            ("entries", f"{usage.entries:,}"),
            ("size", f"{usage.bytes / 1e6:.1f} MB"),
        ):
            console.print(Text.assemble((f"{key:<9}", "bold"), "  ", value), soft_wrap=True)


@cache_app.command("clear")
def cache_clear(
    cache_dir: CacheDir = None, color: ColorOpt = Color.auto, debug: Debug = False
) -> None:
    """Remove every cache entry (files routelog did not write are left alone).

    Example: routelog cache clear --cache-dir /tmp/routelog-cache
    """
    with _errors(debug):
        from routelog.cache import Cache
        from routelog.render import make_console
        from routelog.render.text import plural

        cache = Cache.at(cache_dir)
        removed = cache.clear()
        make_console(sys.stdout, color=color).print(
            f"removed {plural(removed, 'cache entry', 'cache entries')} from {cache.directory}",
            markup=False,
            soft_wrap=True,
        )


def main() -> None:
    """Console-script entry point."""
    app()
