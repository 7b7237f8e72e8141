"""The ``inspect`` output: what ingestion detected in each file, one row per file."""

from __future__ import annotations

import re
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from routelog import __version__
from routelog.render.text import fmt
from routelog.storage import is_url

if TYPE_CHECKING:
    from rich.console import Console

    from routelog.ingest import FileInfo


def file_record(info: FileInfo) -> dict[str, Any]:
    """One file's entry in ``inspect --format json``."""
    record = asdict(info)
    steps = record.pop("steps")
    summary = {"first": steps[0] if steps else None, "last": steps[-1] if steps else None}
    order = ["path", "format", "layout", "payload", "steps", "layers", "n_experts", "top_k"]
    record["steps"] = {**summary, "count": len(steps)}
    return {key: record[key] for key in order} | {k: v for k, v in record.items() if k not in order}


def inspect_document(
    infos: list[FileInfo], ks: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """The JSON document of ``inspect --format json``: the files, and per path given the k
    that analysis would use for files stating none (``top_k_source``, ``top_k_assumed``)."""
    return {
        "routelog_version": __version__,
        "files": [file_record(i) for i in infos],
        "paths": ks or [],
    }


def span(values: list[int]) -> str:
    """A sorted list of integers, compactly: ``0–200 (3)``; ``0–3`` when it has no gaps.

    Examples
    --------
    >>> span([0, 100, 200]), span([0, 1, 2, 3]), span([7]), span([])
    ('0–200 (3)', '0–3', '7', '–')
    """
    if not values:
        return "–"
    if len(values) == 1:
        return str(values[0])
    if values[-1] - values[0] + 1 == len(values):
        return f"{values[0]}–{values[-1]}"
    return f"{values[0]}–{values[-1]} ({len(values)})"


def _shown_base(base: str) -> str:
    """The common directory, relative to the current directory when it lies below it."""
    path = Path(base)
    try:
        relative = path.relative_to(Path.cwd())
    except ValueError:
        return base
    return str(relative) if str(relative) != "." else "."


def print_inspect(
    infos: list[FileInfo], console: Console, ks: list[dict[str, Any]] | None = None
) -> None:
    """One aligned row per file; per path, the k analysis would use where files state none
    (yellow when assumed); warnings listed under the table."""
    import os.path

    from rich.markup import escape

    from routelog.render.report import k_markup
    from routelog.render.text import Column, grid

    paths = [info.path for info in infos]
    if any(is_url(p) for p in paths):  # objects in a bucket: cut the URLs' common prefix
        folders = [p.split("/")[:-1] for p in paths]
        common = next(
            (i for i, parts in enumerate(zip(*folders, strict=False)) if len(set(parts)) > 1),
            min(map(len, folders)),
        )
        base = "/".join(folders[0][:common])
        relative = len(paths) > 1 and common >= 3  # scheme, "", bucket
        shown = [p[len(base) + 1 :] if relative else p for p in paths]
    else:
        absolute = [Path(p).absolute() for p in paths]  # not resolved: links kept as given
        base = os.path.commonpath([a.parent for a in absolute]) if paths else ""
        relative = len(paths) > 1 and base != os.sep
        shown = [
            str(a.relative_to(base)) if relative else p
            for a, p in zip(absolute, paths, strict=True)
        ]
    columns = [
        Column("file", key=True),
        Column("format"),
        Column("layout", wrap=True),
        Column("payload"),
        *(Column(name, "right") for name in ("steps", "layers", "E", "k", "rows")),
        *(Column(name, "right") for name in ("masked", "skipped")),
    ]
    rows = [
        [
            name,
            info.format,
            _unbroken_shapes(info.layout),
            info.payload,
            span(info.steps),
            span(info.layers),
            fmt(info.n_experts),
            fmt(info.top_k),
            fmt(info.rows),
            fmt(info.masked_rows),
            fmt(info.skipped_rows),
        ]
        for info, name in zip(infos, shown, strict=True)
    ]
    lines, _ = grid(columns, rows, width=console.width, gap=1)
    for line in lines:
        console.print(line, soft_wrap=True)
    if relative:
        shown_base = base if is_url(base) else _shown_base(base)
        console.print(f"files under {shown_base}", markup=False)
    for entry in ks or []:
        if entry["needed"]:
            where = escape(entry["path"])
            console.print(f"{where}: files without their own k: {k_markup(entry)}")
    for line in recorded_lines(infos, console.width):
        console.print(line, soft_wrap=True)
    for info in infos:
        for warning in info.warnings:
            console.print(f"{info.path}: {warning}", style="yellow", markup=False)


def _count(value: object) -> int | None:
    """An integer the metadata states, or None (the metadata is the file's, not trusted)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _recorded_layers(meta: dict[str, Any]) -> dict[str, dict[str, Any]]:
    layers = meta.get("layers")
    if not isinstance(layers, dict):
        return {}
    return {str(k): v for k, v in layers.items() if isinstance(v, dict)}


def recorded_lines(infos: list[FileInfo], width: int) -> list[Any]:
    """What ``routelog.record`` wrote in its files' metadata, for the files that carry it:
    per kind of recording (payload, score function, ranks) one line, then per layer the
    router module and class, E, k and the tokens not recorded (summed over the files:
    beyond ``max_tokens`` at each recorded step)."""
    from rich.text import Text

    from routelog.render.text import Column, grid

    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for info in infos:
        meta = info.recorded
        if not meta:
            continue
        world = _count(meta.get("world_size"))
        key = (
            str(meta.get("payload", "?")),
            str(meta.get("score", "?")),
            f"{world} ranks" if world and world > 1 else "one rank",
        )
        groups.setdefault(key, []).append(meta)
    lines: list[Any] = []
    for (payload, score, ranks), metas in groups.items():
        files = "file" if len(metas) == 1 else "files"
        lines.append(Text(""))
        lines.append(
            Text.assemble(
                ("recorded by routelog.record", "bold"),
                f": {len(metas)} {files}, {payload} (score {score}), {ranks}",
            )
        )
        layers: dict[str, dict[str, Any]] = {}
        for meta in metas:
            for layer, stated in _recorded_layers(meta).items():
                row = layers.setdefault(layer, {**stated, "tokens_not_recorded": 0})
                skipped = _count(stated.get("tokens_not_recorded"))
                row["tokens_not_recorded"] = (
                    row["tokens_not_recorded"] + skipped
                    if skipped is not None and row["tokens_not_recorded"] is not None
                    else None
                )
        columns = [
            Column("layer", "right", key=True),
            Column("router", wrap=True),
            Column("class"),
            Column("E", "right"),
            Column("k", "right"),
            Column("tokens not recorded", "right"),
        ]
        rows = [
            [
                layer,
                str(row.get("router", "?")),
                str(row.get("class", "?")),
                fmt(_count(row.get("num_experts"))),
                fmt(_count(row.get("top_k"))),
                fmt(row["tokens_not_recorded"]),
            ]
            for layer, row in sorted(layers.items(), key=lambda item: (len(item[0]), item[0]))
        ]
        table, _ = grid(columns, rows, width=width, gap=2)
        lines.extend(table)
    return lines


def _unbroken_shapes(text: str) -> str:
    """``[1024, 8]`` as ``[1024,8]``: a wrapped layout never splits a shape over two lines.

    Examples
    --------
    >>> _unbroken_shapes("tuple of 4 layer tensors [1024, 8]")
    'tuple of 4 layer tensors [1024,8]'
    """
    return re.sub(r"\[[^\]]*\]", lambda shape: shape.group(0).replace(", ", ","), text)
