"""Format-independent checks and conversions of routing payloads.

Every ingestor turns its payload into a (T, E) float matrix and hands it here, so that the
rules (finite, non-negative, rows summing to 1, numerically stable softmax) live in one place.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from routelog import native
from routelog.errors import InputError, UsageError
from routelog.options import MAX_STEP

if TYPE_CHECKING:
    from routelog.options import Options

SUM_TOLERANCE = 1e-3
PAYLOAD_KINDS: dict[str, Literal["probs", "logits"]] = {
    "probs": "probs",
    "router_probs": "probs",
    "logits": "logits",
    "router_logits": "logits",
}
"""Names a probability or logit payload goes by (a column, a JSON key, a .pt dict key)."""
STEP_PATTERN = re.compile(
    r"(?:global_step|checkpoint|step|iter)[_\-]?(\d{1,1000})", re.IGNORECASE | re.ASCII
)

MAX_LOGIT = 1e150
"""Largest logit magnitude accepted: logsumexp squared (the z-loss) must stay finite in float64."""

Locate = Callable[[int], str]
"""Maps a row index within the matrix to a user-facing place such as ``f.parquet row 17``."""


def step_from_name(path: Path) -> int | None:
    """The training step in a file name, else in the nearest parent directory name.

    Examples
    --------
    >>> step_from_name(Path("run/step_000200.parquet"))
    200
    >>> step_from_name(Path("global_step300/router.jsonl"))
    300
    >>> step_from_name(Path("out/checkpoint-1500/router_logits.pt"))  # HF Trainer
    1500
    """
    for part in (path.name, *(p.name for p in path.parents)):
        matches = STEP_PATTERN.findall(part)
        if matches:
            step = int(matches[-1])
            if step > MAX_STEP:
                raise InputError(
                    f"{path}: the step {step} in the name {part!r} does not fit a 64-bit integer"
                )
            return step
    return None


@dataclass
class Probabilities:
    """Validated probabilities for the rows that were kept."""

    probs: np.ndarray  # (T, E) float32
    keep: np.ndarray  # (T_in,) bool: which input rows survived
    logit_lse: np.ndarray | None  # (T,) float64, when the input carried logits
    skipped: int


def to_probabilities(
    matrix: np.ndarray,
    kind: Literal["probs", "logits"],
    options: Options,
    locate: Locate,
) -> Probabilities:
    """Check a (T, E) payload and return routing probabilities.

    Probabilities must be finite, non-negative and sum to 1 within 1e-3; logits must be
    finite and go through a numerically stable softmax (or, with ``--score sigmoid``, a
    sigmoid normalised to sum 1), after division by ``--temperature``. A bad row raises
    ``InputError`` naming it, or is dropped and counted with ``--skip-bad-rows``.
    """
    values = np.asarray(matrix)
    if kind == "probs":
        if options.temperature is not None:
            raise UsageError("--temperature applies to logits, but this input holds probabilities")
        if options.score != "softmax":
            raise UsageError(
                "--score sigmoid applies to logits, but this input holds probabilities"
            )
        bad, problems = _bad_probability_rows(values)
        probs, lse = values, None
    else:
        probs, lse, bad, problems = _from_logits(values, options)
    keep = ~bad
    skipped = int(bad.sum())
    if skipped and not options.skip_bad_rows:
        row = int(np.flatnonzero(bad)[0])
        problem = next(name for name, mask in problems.items() if mask[row])
        raise InputError(f"{locate(row)}: {problem} (use --skip-bad-rows to drop such rows)")
    if skipped:
        probs = probs[keep]
        lse = None if lse is None else lse[keep]
    return Probabilities(np.ascontiguousarray(probs, dtype=np.float32), keep, lse, skipped)


def _logit_problems(temperature: float) -> tuple[str, str, str]:
    """What is wrong with a row of logits, by the code the softmax kernel gives it (1, 2,
    3); below a temperature of 1 the bound on the scaled logits is a smaller one on logits."""
    beyond = (
        f"logit beyond ±{MAX_LOGIT:g} (its z-loss would overflow float64)"
        if temperature >= 1.0
        else f"logit beyond ±{MAX_LOGIT * temperature:g} (±{MAX_LOGIT:g} divided by "
        f"--temperature {temperature:g}: its z-loss would overflow float64)"
    )
    return "non-finite logit (NaN or +inf)", "every logit is -inf", beyond


def _from_logits(
    values: np.ndarray, options: Options
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Softmax (or normalised sigmoid) probabilities in float32, the logsumexp of the logits
    after ``--temperature`` in float64, and which rows break which rule, in one compiled pass
    per row (``routelog/_native.c``; bad rows get zeros). float32 logits are read as they
    are; others in float64.

    ``-inf`` logits (masked or group-limited experts) get probability exactly 0, and so do
    logits more than 87.3 below their row's largest (e^-87.3 is float32's smallest normal);
    -DBL_MAX counts as -inf (JSONL's -Infinity, see jsonl.py). The exponentials are float32
    (within 2 ulp), summed in float64. The sigmoid scores are normalised in log space:
    log sigmoid(x) = -log(1 + e^-x), so logits of -50 (whose sigmoids are ~1e-22) keep their
    ratios instead of becoming 0/0.
    """
    single = values.dtype == np.float32  # read as it is, else in float64
    with np.errstate(invalid="ignore"):  # a NaN (of another byte order) is the kernel's to name
        logits = np.ascontiguousarray(values, dtype=np.float32 if single else np.float64)
    n_rows, width = logits.shape
    probs = np.zeros((n_rows, width), dtype=np.float32)
    lse = np.zeros(n_rows, dtype=np.float64)
    codes = np.zeros(n_rows, dtype=np.uint8)
    temperature = 1.0 if options.temperature is None else float(options.temperature)
    if n_rows and width:
        # scaled logits are held to the same bound: |x / T| <= MAX_LOGIT
        limit = MAX_LOGIT * min(temperature, 1.0)
        native.softmax(logits, width, temperature, limit, probs, lse, codes)
    problems = {
        name: codes == code for code, name in enumerate(_logit_problems(temperature), start=1)
    }
    bad = codes != 0
    if options.score == "sigmoid" and n_rows and width:
        with np.errstate(invalid="ignore", over="ignore"):
            scaled = logits.astype(np.float64, copy=False) / temperature
            scores = -np.logaddexp(0.0, -scaled)  # log sigmoid, exact for large |x|
        scores[bad] = 0.0  # refused rows: any finite values (zeroed below)
        native.softmax(scores, width, 1.0, np.inf, probs, np.empty(n_rows), np.empty_like(codes))
        probs[bad] = 0.0
    return probs, lse, bad, problems


def _bad_probability_rows(values: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Which rows break which rule. Valid data, the common case, costs one pass for the row
    sums and the smallest value; the per-rule masks are only built when something is wrong."""
    with np.errstate(invalid="ignore", over="ignore"):
        sums, lowest = _row_sums(values)
        off = np.abs(sums - 1.0) > SUM_TOLERANCE / 2
        if off.any():
            off[off] = np.abs(values[off].sum(axis=1, dtype=np.float64) - 1.0) > SUM_TOLERANCE
    if lowest >= 0 and np.isfinite(sums).all() and not off.any():
        fine = np.zeros(len(values), dtype=bool)
        return fine, {}
    return _classify_rows(values)


def _row_sums(values: np.ndarray) -> tuple[np.ndarray, float]:
    """Row sums for the tolerance check, and the smallest value (NaN rows show in their sums).

    float32 rows up to FLOAT32_SUM_WIDTH columns are summed in float32 in one compiled pass
    that also finds the minimum (``routelog/_native.c``): a sum of E non-negative terms adding
    up to about 1 is then off by at most E x 2^-24 < 2.5e-4, under half the tolerance; rows
    beyond half of it are summed again in float64. Other rows are summed in float64."""
    if values.dtype == np.float32 and 0 < values.shape[1] <= FLOAT32_SUM_WIDTH:
        rows = np.ascontiguousarray(values)
        sums = np.empty(len(rows), dtype=np.float32)
        lowest = native.row_sums(rows, rows.shape[1], sums)
        return sums, lowest
    wide: np.ndarray = np.einsum("ij->i", values, dtype=np.float64)
    return wide, float(values.min()) if values.size else 0.0


FLOAT32_SUM_WIDTH = 4096
"""Rows up to this wide are summed in float32 for the check (see :func:`_row_sums`)."""


def _classify_rows(values: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    finite = np.isfinite(values).all(axis=1)
    negative = (values < 0).any(axis=1) & finite
    with np.errstate(invalid="ignore", over="ignore"):
        sums = values.sum(axis=1, dtype=np.float64)
    off = (np.abs(sums - 1.0) > SUM_TOLERANCE) & finite & ~negative
    problems = {
        "NaN or infinite probability": ~finite,
        "negative probability": negative,
        "probabilities do not sum to 1 (within 1e-3)": off,
    }
    return ~finite | negative | off, problems


def looks_like_probabilities(matrix: np.ndarray) -> bool:
    """True when every row is non-negative and sums to 1 within 1e-3 (softmax already applied)."""
    values = np.asarray(matrix)
    if values.size == 0 or not np.isfinite(values).all() or (values < 0).any():
        return False
    return bool((np.abs(values.sum(axis=1, dtype=np.float64) - 1.0) <= SUM_TOLERANCE).all())


def bad_ids(ids: np.ndarray, n_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row of a [T, k] matrix of selected expert ids: whether an id lies outside
    [0, E) (a fill value such as -1), and whether an id is repeated within the row.

    The one check of selected ids held as numpy arrays (.pt selections, Megatron traces,
    routed-expert arrays); table layouts check theirs with ``table.checked_ids``.

    Examples
    --------
    >>> outside, repeated = bad_ids(np.array([[0, 1], [1, 8], [3, 3]]), 8)
    >>> outside.tolist(), repeated.tolist()
    ([False, True, False], [False, False, True])
    """
    outside = np.asarray(((ids < 0) | (ids >= n_experts)).any(axis=1))
    ordered = np.sort(ids, axis=1)
    repeated = np.asarray((ordered[:, 1:] == ordered[:, :-1]).any(axis=1))
    return outside, repeated
