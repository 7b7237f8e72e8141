# Type stubs for the C extension routelog/_native.c (buffers: C-contiguous numpy arrays).
import numpy as np

def token_stats(
    probs: np.ndarray,
    n_experts: int,
    k: int,
    entropy: bool,
    entropies: np.ndarray,
    top1: np.ndarray,
    ids: np.ndarray,
    groups: np.ndarray | None,
    sums: np.ndarray | None,
    selected: np.ndarray | None,
    differs: np.ndarray | None,
    /,
) -> None: ...
def row_sums(values: np.ndarray, n_columns: int, sums: np.ndarray, /) -> float: ...
def softmax(
    logits: np.ndarray,
    n_columns: int,
    temperature: float,
    max_logit: float,
    probs: np.ndarray,
    lse: np.ndarray,
    problems: np.ndarray,
    /,
) -> None: ...
