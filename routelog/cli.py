"""The command line: a thin typer layer over ``routelog.api`` and ``routelog.render``."""

from __future__ import annotations

import enum
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from routelog import __version__
from routelog.errors import ExitCode, RoutelogError, printable
from routelog.render import Format

if TYPE_CHECKING:
    import polars as pl

    from routelog.api import Analysis, Run
    from routelog.cache import Cache
    from routelog.check import CheckResult
    from routelog.config import Config
    from routelog.options import Options

app = typer.Typer(
    name="routelog",
    help="Analyze the routing logs of Mixture-of-Experts models: entropy, load, collapse.",
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain click help: rendering it with rich would import rich just to print --help.
    rich_markup_mode=None,
)

# Options shared by every command that reads runs.
TopK = Annotated[
    Optional[int],  # noqa: UP045 (typer reads the annotation at run time on Python 3.10)
    typer.Option(
        "--top-k", "-k", help="Experts each token is routed to (default: the data's k, else 1)."
    ),
]
Layers = Annotated[Optional[str], typer.Option(help="Layers to keep, e.g. 0,3-5.")]  # noqa: UP045
Steps = Annotated[str | None, typer.Option(help="Steps to keep, inclusive: 100:500, 100:, :500.")]
SkipBadRows = Annotated[
    bool, typer.Option("--skip-bad-rows", help="Drop and count bad rows instead of failing.")
]
Temperature = Annotated[
    Optional[float],  # noqa: UP045
    typer.Option(help="Divide logits by T before the softmax (what-if gate scaling)."),
]
Score = Annotated[
    str,
    typer.Option(
        "--score",
        help="How the router scores experts from logits: softmax, or sigmoid (DeepSeek-V3 style; "
        "scores normalised to sum 1).",
    ),
]
NumExperts = Annotated[
    Optional[int],  # noqa: UP045
    typer.Option(
        "--num-experts", help="Experts per layer E, for top-k ids without a num_experts column."
    ),
]
Debug = Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")]
FormatOpt = Annotated[Format, typer.Option("--format", "-f", help="Output format.")]
ConfigOpt = Annotated[
    Optional[Path],  # noqa: UP045
    typer.Option(
        "--config",
        help="Configuration file (default: routelog.toml or pyproject.toml, searched upwards).",
    ),
]
Output = Annotated[
    Optional[Path],  # noqa: UP045
    typer.Option("--output", "-o", help="Write to FILE instead of standard output."),
]

Jobs = Annotated[
    Optional[int],  # noqa: UP045
    typer.Option("--jobs", "-j", help="Files read at once (default: one per core).", min=1),
]
NoCache = Annotated[
    bool, typer.Option("--no-cache", help="Neither read nor write the per-file statistics cache.")
]
CacheDir = Annotated[
    Optional[Path],  # noqa: UP045
    typer.Option(
        "--cache-dir",
        help="Cache directory (default: $ROUTELOG_CACHE_DIR, else $XDG_CACHE_HOME/routelog, "
        "else ~/.cache/routelog).",
    ),
]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"routelog {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """Analyze the routing logs of Mixture-of-Experts models: entropy, load, collapse."""


@contextmanager
def _errors(debug: bool) -> Iterator[None]:
    """Turn routelog errors into one line on stderr and an exit code (tracebacks with --debug)."""
    debug = debug or bool(os.environ.get("ROUTELOG_DEBUG"))
    try:
        yield
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
        typer.echo(
            f"routelog: internal error: {type(exc).__name__}: {printable(str(exc))} "
            "(rerun with --debug and report it)",
            err=True,
        )
        raise typer.Exit(ExitCode.INTERNAL) from None


def _emit(output: Path | None, write: Callable[[object], None]) -> None:
    """Run ``write`` against stdout or the --output file (checked by ``_check_output``)."""
    if output is None:
        write(sys.stdout)
        return
    try:
        with output.open("w", encoding="utf-8") as stream:
            write(stream)
    except OSError as exc:
        from routelog.errors import UsageError

        raise UsageError(f"{output}: cannot write the report: {exc.strerror or exc}") from None


def _check_output(output: Path | None, inputs: list[str]) -> None:
    """Refuse an --output that would overwrite a log, or land inside a run being read."""
    from routelog.api import RunSpec
    from routelog.errors import UsageError

    if output is None:
        return
    if output.is_dir():
        raise UsageError(f"{output}: --output names a directory; give a file name")
    if not output.parent.is_dir():
        raise UsageError(f"{output}: --output folder {output.parent} does not exist")
    target = output.resolve()
    for text in inputs:
        run = RunSpec.parse(text).path.resolve()
        if target == run or run in target.parents:
            raise UsageError(
                f"{output}: --output would write into the input {text}; "
                "routelog never modifies the logs it reads"
            )


@dataclass(frozen=True)
class _Reading:
    """The input flags that analyze, compare and check share, as one value."""

    config: Path | None = None
    top_k: int | None = None
    layers: str | None = None
    steps: str | None = None
    skip_bad_rows: bool = False
    temperature: float | None = None
    score: str = "softmax"
    num_experts: int | None = None
    jobs: int | None = None
    no_cache: bool = False
    cache_dir: Path | None = None

    def prepare(self) -> tuple[Config, Options, Cache | None]:
        """The configuration, the reading options built from it and the flags, the cache."""
        from routelog import api
        from routelog.cache import Cache
        from routelog.config import load_config

        settings = load_config(self.config)
        options = api.make_options(
            top_k=self.top_k,
            layers=self.layers,
            steps=self.steps,
            skip_bad_rows=self.skip_bad_rows,
            temperature=self.temperature,
            score=self.score,
            num_experts=self.num_experts,
            default_top_k=settings.top_k,
            dead_fraction=settings.dead_fraction,
        )
        return settings, options, None if self.no_cache else Cache.at(self.cache_dir)

    def runs(self, paths: list[str]) -> tuple[Config, Options, list[Run]]:
        """Read ``paths`` as runs, with a progress bar on stderr."""
        from routelog import api
        from routelog.render.progress import FileProgress

        settings, options, cache = self.prepare()
        with FileProgress() as progress:
            runs = api.load_runs(paths, options, progress, jobs=self.jobs, cache=cache)
        return settings, options, runs

    def analysis(self, paths: list[str]) -> Analysis:
        """Analyze ``paths``: metrics and findings, with a progress bar on stderr."""
        from routelog import api
        from routelog.render.progress import FileProgress

        settings, options, cache = self.prepare()
        with FileProgress() as progress:
            return api.analyze(
                paths,
                options=options,
                config=settings,
                progress=progress,
                jobs=self.jobs,
                cache=cache,
            )


@app.command()
def analyze(
    paths: Annotated[
        list[str], typer.Argument(help="Runs: log files or directories, PATH or NAME=PATH.")
    ],
    top_k: TopK = None,
    layers: Layers = None,
    steps: Steps = None,
    skip_bad_rows: SkipBadRows = False,
    temperature: Temperature = None,
    score: Score = "softmax",
    num_experts: NumExperts = None,
    fmt: FormatOpt = Format.table,
    output: Output = None,
    config: ConfigOpt = None,
    plot: Annotated[
        bool, typer.Option("--plot", help="Chart token and load entropy over steps.")
    ] = False,
    values: Annotated[
        bool, typer.Option("--values", help="Print load shares in the heatmap.")
    ] = False,
    width: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option("--width", min=40, max=1000, help="Width of the report in columns."),
    ] = None,
    jobs: Jobs = None,
    no_cache: NoCache = False,
    cache_dir: CacheDir = None,
    debug: Debug = False,
) -> None:
    """Per-layer, per-step routing entropy and load of one or more runs, and a diagnosis.

    Example: routelog analyze sample_logs/collapse --top-k 2 --plot
    """
    with _errors(debug):
        _check_output(output, paths)
        from routelog.render import data, make_console, markdown, report

        result = _Reading(
            config,
            top_k,
            layers,
            steps,
            skip_bad_rows,
            temperature,
            score,
            num_experts,
            jobs,
            no_cache,
            cache_dir,
        ).analysis(paths)

        def write(stream: object) -> None:
            if fmt is Format.json:
                stream.write(data.to_json(report.analysis_document(result)))  # type: ignore[attr-defined]
            elif fmt is Format.csv:
                stream.write(data.to_csv(result.metrics))  # type: ignore[attr-defined]
            elif fmt is Format.markdown:
                stream.write(markdown.analysis_markdown(result))  # type: ignore[attr-defined]
            else:
                console = make_console(stream, width=width)  # type: ignore[arg-type]
                report.print_report(result, console, plot=plot, values=values)

        _emit(output, write)


@app.command()
def inspect(
    paths: Annotated[list[str], typer.Argument(help="Log files or run directories.")],
    skip_bad_rows: SkipBadRows = False,
    num_experts: NumExperts = None,
    fmt: FormatOpt = Format.table,
    output: Output = None,
    debug: Debug = False,
) -> None:
    """What routelog detects in each log file, without computing metrics.

    Per file: format, layout, payload kind, steps, layers, E, k, rows, masked and skipped rows.

    Example: routelog inspect sample_logs/healthy --format json
    """
    with _errors(debug):
        _check_output(output, paths)
        from routelog import api
        from routelog.errors import UsageError
        from routelog.render import data, make_console
        from routelog.render import inspect as render_inspect

        if fmt not in (Format.table, Format.json):
            raise UsageError(f"inspect writes --format table or json, not {fmt.value}")
        options = api.make_options(skip_bad_rows=skip_bad_rows, num_experts=num_experts)
        infos = api.inspect(paths, options=options)

        def write(stream: object) -> None:
            if fmt is Format.json:
                document = render_inspect.inspect_document(infos)
                stream.write(data.to_json(document))  # type: ignore[attr-defined]
            else:
                render_inspect.print_inspect(infos, make_console(stream))  # type: ignore[arg-type]

        _emit(output, write)


@app.command("config")
def config_command(
    config: ConfigOpt = None,
    fmt: FormatOpt = Format.table,
    debug: Debug = False,
) -> None:
    """Print the effective configuration and where each value came from.

    Example: routelog config --config routelog.toml --format json
    """
    with _errors(debug):
        from routelog.config import load_config
        from routelog.errors import UsageError
        from routelog.render import data, make_console
        from routelog.render.settings import config_document, print_config

        settings = load_config(config)
        if fmt is Format.json:
            sys.stdout.write(data.to_json(config_document(settings)))
        elif fmt is Format.table:
            print_config(settings, make_console(sys.stdout))
        else:
            raise UsageError(f"routelog config: --format must be table or json, not {fmt.value}")


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
        typer.Argument(help="Runs, the baseline first (PATH or NAME=PATH); one with --by dataset."),
    ],
    by: Annotated[By, typer.Option(help="Compare runs, or the datasets of one run.")] = By.run,
    base: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="With --by dataset: the baseline dataset (default: the first)."),
    ] = None,
    step: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(help="Compare at this step (default: the latest step every run logged)."),
    ] = None,
    align: Annotated[
        AlignOpt,
        typer.Option(help="nearest: pair with each run's latest logged step at or before."),
    ] = AlignOpt.exact,
    shift_threshold: Annotated[
        Optional[float],  # noqa: UP045
        typer.Option(
            help="With --by dataset: JSD above which a layer has shifted (default: "
            "thresholds.shift_jsd of the configuration, 0.1)."
        ),
    ] = None,
    top_k: TopK = None,
    layers: Layers = None,
    steps: Steps = None,
    skip_bad_rows: SkipBadRows = False,
    temperature: Temperature = None,
    score: Score = "softmax",
    num_experts: NumExperts = None,
    jobs: Jobs = None,
    no_cache: NoCache = False,
    cache_dir: CacheDir = None,
    fmt: FormatOpt = Format.table,
    output: Output = None,
    config: ConfigOpt = None,
    plot: Annotated[
        bool, typer.Option("--plot", help="Chart each run's token entropy, one chart per layer.")
    ] = False,
    width: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option("--width", min=40, max=1000, help="Width of the report in columns."),
    ] = None,
    debug: Debug = False,
) -> None:
    """Routing of runs (or of one run's datasets) side by side, with deltas from the first.

    Example: routelog compare base=sample_logs/healthy sample_logs/collapse --top-k 2
    """
    with _errors(debug):
        _check_output(output, paths)
        from routelog import compare as core
        from routelog.errors import UsageError
        from routelog.render import compare as view
        from routelog.render import data, make_console

        if by is By.dataset and len(paths) != 1:
            raise UsageError(f"--by dataset compares the datasets of one run, got {len(paths)}")
        if by is By.run and base is not None:
            raise UsageError(
                "--base names a dataset (with --by dataset); the first run is the baseline"
            )
        settings, options, runs = _Reading(
            config,
            top_k,
            layers,
            steps,
            skip_bad_rows,
            temperature,
            score,
            num_experts,
            jobs,
            no_cache,
            cache_dir,
        ).runs(paths)
        if by is By.dataset:
            (run,) = runs
            result = core.compare_datasets(
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
            result = core.compare_runs(runs, options, step=step, align=align.value)

        def write(stream: object) -> None:
            if fmt is Format.json:
                stream.write(data.to_json(view.comparison_document(result)))  # type: ignore[attr-defined]
            elif fmt is Format.csv:
                stream.write(data.to_csv(result.table))  # type: ignore[attr-defined]
            elif fmt is Format.markdown:
                stream.write(view.to_markdown(result))  # type: ignore[attr-defined]
            else:
                console = make_console(stream, width=width)  # type: ignore[arg-type]
                view.print_comparison(result, console, plot=plot)

        _emit(output, write)


@app.command()
def check(
    paths: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Argument(help="Runs to check: log files or directories, PATH or NAME=PATH."),
    ] = None,
    config: ConfigOpt = None,
    baseline: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="A known-good run for the max_regression rules."),
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
        typer.Option("--min", help="METRIC=VALUE: fail a layer below VALUE (repeatable)."),
    ] = None,
    maximum: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option("--max", help="METRIC=VALUE: fail a layer above VALUE (repeatable)."),
    ] = None,
    max_regression: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option(
            "--max-regression",
            help="METRIC=TOL: fail a layer whose METRIC moved towards collapse by more than "
            "TOL from --baseline (repeatable).",
        ),
    ] = None,
    window: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(help="Check each metric's mean over the last N logged steps."),
    ] = None,
    strict: Annotated[
        bool, typer.Option("--strict", help="Also fail on findings no longer active.")
    ] = False,
    junit: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option("--junit", help="Write a JUnit XML report to FILE."),
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
    score: Score = "softmax",
    num_experts: NumExperts = None,
    jobs: Jobs = None,
    no_cache: NoCache = False,
    cache_dir: CacheDir = None,
    fmt: FormatOpt = Format.table,
    debug: Debug = False,
) -> None:
    """Gate CI on routing health: exit 0 when every rule passes, 1 when one fails, 2 on bad
    input or configuration. Rules: fail findings, thresholds, regression from a baseline.

    Example: routelog check sample_logs/collapse --top-k 2 --min token_entropy_norm=0.2
    """
    with _errors(debug):
        from routelog.check import check as run_check
        from routelog.errors import UsageError
        from routelog.render import check as render_check
        from routelog.render import data, make_console

        if window is not None and window < 1:
            raise UsageError(f"--window must be at least 1, got {window}")
        read = _Reading(
            config,
            top_k,
            layers,
            steps,
            skip_bad_rows,
            temperature,
            score,
            num_experts,
            jobs,
            no_cache,
            cache_dir,
        ).analysis
        if suggest is not None:
            if paths:
                raise UsageError("--suggest reads the healthy run only: give no PATH with it")
            _print_suggestion(read([suggest]), window)
            return
        if not paths:
            raise UsageError("no run given: routelog check PATH... (or --suggest BASELINE)")
        if github and fmt is not Format.table:
            raise UsageError("--github writes annotations to stdout: use it with --format table")
        analysis = read(paths)
        settings = analysis.config.check.with_flags(
            minimum=minimum, maximum=maximum, max_regression=max_regression
        )
        base = read([baseline]) if baseline is not None else None
        if base is None and settings.max_regression:
            raise UsageError("max_regression needs a baseline run: pass --baseline PATH")
        result = run_check(
            analysis, settings, baseline=base, align=align.value, window=window, strict=strict
        )

        if fmt is Format.json:
            sys.stdout.write(data.to_json(render_check.check_document(result)))
        elif fmt is Format.csv:
            sys.stdout.write(data.to_csv(_rule_frame(result)))
        elif fmt is Format.markdown:
            sys.stdout.write(render_check.markdown_summary(result))
        else:
            render_check.print_check(result, make_console(sys.stdout))
        if junit is not None:
            _check_output(junit, [*paths, *([baseline] if baseline is not None else [])])
            _write(junit, render_check.junit_xml(result), "--junit")
        if github:
            sys.stdout.write(render_check.github_annotations(result))
            summary = os.environ.get("GITHUB_STEP_SUMMARY")
            if summary:
                text = render_check.markdown_summary(result).encode()
                _write(Path(summary), text, "GITHUB_STEP_SUMMARY", append=True)
        if not result.passed:
            raise typer.Exit(ExitCode.CHECK_FAILED)


def _print_suggestion(analysis: Analysis, window: int | None) -> None:
    from routelog.check import suggest
    from routelog.render.check import suggestion_toml

    run = analysis.runs[0]
    sys.stdout.write(
        suggestion_toml(
            suggest(analysis.metrics, window),
            run=run.name,
            step=int(analysis.metrics["step"].max()),  # type: ignore[arg-type]
            top_k=sorted(set(run.stats["top_k"].drop_nulls().to_list())),
            window=window,
        )
    )


def _rule_frame(result: CheckResult) -> pl.DataFrame:
    import polars as pl

    rules = [r.to_dict() for r in result.rules]
    schema = {"value": pl.Float64, "threshold": pl.Float64}
    return pl.DataFrame(rules, schema_overrides=schema, infer_schema_length=None)


def _write(path: Path, content: bytes, what: str, *, append: bool = False) -> None:
    """Write (or append to) a report file; ``what`` names it in the error."""
    from routelog.errors import UsageError

    try:
        with path.open("ab" if append else "wb") as stream:
            stream.write(content)
    except OSError as exc:
        raise UsageError(f"{path}: cannot write the {what} file: {exc.strerror}") from None


cache_app = typer.Typer(
    help="Inspect or empty the per-file statistics cache.\n\nExample: routelog cache clear",
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(cache_app, name="cache")


@cache_app.command("info")
def cache_info(cache_dir: CacheDir = None, debug: Debug = False) -> None:
    """Where the cache is, how many entries it holds and their size.

    Example: routelog cache info
    """
    with _errors(debug):
        from routelog.cache import Cache

        usage = Cache.at(cache_dir).usage()
        typer.echo(f"directory  {usage.directory}")
        typer.echo(f"entries    {usage.entries}")
        typer.echo(f"size       {usage.bytes / 1e6:.1f} MB")


@cache_app.command("clear")
def cache_clear(cache_dir: CacheDir = None, debug: Debug = False) -> None:
    """Remove every cache entry (files routelog did not write are left alone).

    Example: routelog cache clear --cache-dir /tmp/routelog-cache
    """
    with _errors(debug):
        from routelog.cache import Cache

        cache = Cache.at(cache_dir)
        removed = cache.clear()
        typer.echo(f"removed {removed} cache entries from {cache.directory}")


def main() -> None:
    """Console-script entry point."""
    app()
