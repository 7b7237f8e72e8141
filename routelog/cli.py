"""The command line: a thin typer layer over ``routelog.api`` and ``routelog.render``."""

from __future__ import annotations

import enum
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer

from routelog import __version__
from routelog.errors import ExitCode, RoutelogError
from routelog.render import Format

app = typer.Typer(
    name="routelog",
    help="Analyze the routing logs of Mixture-of-Experts models: entropy, load, collapse.",
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
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
        typer.echo(f"routelog: error: {exc}", err=True)
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
            f"routelog: internal error: {type(exc).__name__}: {exc} "
            "(rerun with --debug and report it)",
            err=True,
        )
        raise typer.Exit(ExitCode.INTERNAL) from None


def _emit(output: Path | None, write: Callable[[object], None]) -> None:
    """Run ``write`` against stdout or the --output file."""
    if output is None:
        write(sys.stdout)
        return
    with output.open("w", encoding="utf-8") as stream:
        write(stream)


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
        typer.Option("--width", min=40, help="Width of the report in columns."),
    ] = None,
    debug: Debug = False,
) -> None:
    """Per-layer, per-step routing entropy and load of one or more runs, and a diagnosis.

    Example: routelog analyze sample_logs/collapse --top-k 2 --plot
    """
    with _errors(debug):
        from routelog import api
        from routelog.config import load_config
        from routelog.render import data, make_console, markdown, report
        from routelog.render.progress import FileProgress

        settings = load_config(config)
        options = api.make_options(
            top_k=top_k,
            layers=layers,
            steps=steps,
            skip_bad_rows=skip_bad_rows,
            temperature=temperature,
            score=score,
            num_experts=num_experts,
            default_top_k=settings.top_k,
            dead_fraction=settings.dead_fraction,
        )
        with FileProgress() as progress:
            result = api.analyze(paths, options=options, config=settings, progress=progress)

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
    fmt: FormatOpt = Format.table,
    output: Output = None,
    config: ConfigOpt = None,
    plot: Annotated[
        bool, typer.Option("--plot", help="Chart each run's token entropy, one chart per layer.")
    ] = False,
    width: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option("--width", min=40, help="Width of the report in columns."),
    ] = None,
    debug: Debug = False,
) -> None:
    """Routing of runs (or of one run's datasets) side by side, with deltas from the first.

    Example: routelog compare base=sample_logs/healthy sample_logs/collapse --top-k 2
    """
    with _errors(debug):
        from routelog import api
        from routelog import compare as core
        from routelog.config import load_config
        from routelog.errors import UsageError
        from routelog.render import compare as view
        from routelog.render import data, make_console

        settings = load_config(config)
        options = api.make_options(
            top_k=top_k,
            layers=layers,
            steps=steps,
            skip_bad_rows=skip_bad_rows,
            temperature=temperature,
            default_top_k=settings.top_k,
            dead_fraction=settings.dead_fraction,
        )
        if by is By.dataset:
            if len(paths) != 1:
                raise UsageError(f"--by dataset compares the datasets of one run, got {len(paths)}")
            (run,) = api.load_runs(paths, options)
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
            if base is not None:
                raise UsageError(
                    "--base names a dataset (with --by dataset); the first run is the baseline"
                )
            result = core.compare_runs(
                api.load_runs(paths, options), options, step=step, align=align.value
            )

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


def main() -> None:
    """Console-script entry point."""
    app()
