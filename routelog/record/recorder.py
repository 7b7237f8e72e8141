"""The Recorder: forward hooks on a model's routers -> one Parquet file per recorded step."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from routelog.errors import InputError, RecordError
from routelog.extras import require
from routelog.record.adapters import Router, RouterSpec, find_routers
from routelog.record.writer import LayerRecord, OnFull, StepRecord, Writer


class Recorder:
    """Record what a model's routers do, into files every routelog command reads.

    >>> rec = Recorder(model, "runs/exp1", every=100, max_tokens=4096)  # doctest: +SKIP
    >>> for step, batch in enumerate(loader):                           # doctest: +SKIP
    ...     rec.step(step)          # before the step's forward(s)
    ...     model(**batch).loss.backward(); optimizer.step()
    >>> rec.close()                                                     # doctest: +SKIP

    Parameters
    ----------
    model
        A torch module with router modules (see :mod:`routelog.record.adapters`).
    directory
        The run directory; created if missing. Files: ``step_000200.parquet`` (under
        ``torch.distributed`` with several ranks: ``step_000200.rank3.parquet``).
    every
        ``step(s)`` records step s when ``s % every == 0``.
    max_tokens
        Tokens recorded per layer and step at most (the first ones; the rest are counted in
        the file's metadata as ``tokens_not_recorded``).
    probe
        A fixed batch (a dict of tensors, or a tensor of input ids): when given, a recorded
        step runs the model on it under ``torch.no_grad()`` (in eval mode) at ``step(s)``
        instead of recording the training forwards, so the same tokens are routed at every
        recorded step (what ``flip_rate``, ``saturation`` and ``compare`` need).
    routers
        ``{module-name glob: "logits" | "probs" | ... | Adapter}`` for routers the adapter
        table does not know (older transformers, custom models).
    top_k, score
        k and the score function when neither the router output nor the model config says.
    on_full, queue_size
        Steps wait in a queue of ``queue_size`` for the writer thread; when it is full,
        ``"block"`` (default) waits, ``"drop"`` drops the step and counts it in ``dropped``.
    check_config
        Compare the routers found with the model's config (``model.config``): the MoE layers
        and E must agree (default True).
    """

    def __init__(
        self,
        model: Any,
        directory: str | Path,
        *,
        every: int = 100,
        max_tokens: int = 4096,
        probe: Any = None,
        routers: Mapping[str, RouterSpec] | None = None,
        top_k: int | None = None,
        score: str | None = None,
        on_full: OnFull = "block",
        queue_size: int = 4,
        check_config: bool = True,
    ) -> None:
        self._torch = require("torch", "torch")
        if every < 1:
            raise RecordError(f"every must be at least 1, not {every}")
        if max_tokens < 1:
            raise RecordError(f"max_tokens must be at least 1, not {max_tokens}")
        if score not in (None, "softmax", "sigmoid"):
            raise RecordError(f"score must be 'softmax' or 'sigmoid', not {score!r}")
        self.model = model
        self.directory = Path(directory)
        self.every = every
        self.max_tokens = max_tokens
        self.probe_batch = probe
        self.routers = find_routers(model, routers)
        holds = {r.adapter.holds for r in self.routers}
        scores = {r.adapter.score for r in self.routers}
        if len(holds) > 1 or len(scores) > 1:
            raise RecordError("the routers of one model must all return logits or all probs")
        self.holds = holds.pop()
        self.score = score or scores.pop()
        self.config = _model_config(model)
        self.top_k = top_k if top_k is not None else self.config.get("top_k")
        self.num_experts: int | None = self.config.get("num_experts")
        if check_config:
            _check_layers(self.routers, self.config, model)
        self.rank, self.world_size = _distributed(self._torch)
        self.directory.mkdir(parents=True, exist_ok=True)
        _save_config(model, self.directory)
        self.silent_layers = 0
        """Router calls expected in a recorded step that did not happen (a layer that stopped
        firing), summed over steps; each occurrence also warns."""
        self._recording: int | None = None
        self._chunks: dict[int, list[tuple[Any, Any, np.ndarray | None, int]]] = {}
        self._taken: dict[int, int] = {}
        self._skipped: dict[int, int] = {}
        self._mask: Any = None
        self._pending_events: list[Any] = []
        self._writer = Writer(self.directory, self.holds, size=queue_size, on_full=on_full)
        self._handles: list[Any] = []
        """The hooks, attached only while a step is recorded: the other steps run the model
        exactly as without a recorder (no hook call, no Python work in the forward)."""
        self._closed = False

    # -- public API ----------------------------------------------------------------------

    @property
    def layers(self) -> list[int]:
        """The layers whose routers are hooked."""
        return [r.layer for r in self.routers]

    @property
    def dropped(self) -> int:
        """Steps dropped because the write queue was full (``on_full="drop"``)."""
        return self._writer.dropped

    @property
    def written(self) -> list[Path]:
        """Files written so far."""
        return list(self._writer.written)

    def step(self, global_step: int) -> None:
        """Call once per optimizer step, before its forward(s).

        Finishes the previous recorded step (its file is queued for writing). When
        ``global_step % every == 0`` this step is recorded: with a ``probe``, by running the
        probe now; otherwise the forwards until the next ``step()``/``close()`` are recorded.
        """
        self._guard()
        self._finish()
        if global_step % self.every:
            return
        if self.probe_batch is not None:
            self.probe(self.probe_batch, step=global_step)
            return
        self._start(global_step)

    @contextmanager
    def capture(self, step: int) -> Iterator[Recorder]:
        """Record the forwards inside the block as ``step`` (whatever ``every`` says)."""
        self._guard()
        self._finish()
        self._start(step)
        try:
            yield self
        except BaseException:
            self._discard()
            self.close()
            raise
        self._finish()

    def probe(self, batch: Any, *, step: int | None = None) -> Any:
        """Run ``batch`` through the model under ``torch.no_grad()`` in eval mode, recorded as
        ``step`` (default: the step being recorded, else an error); returns the output."""
        self._guard()
        if step is None:
            if self._recording is None:
                raise RecordError("probe() needs step= outside a recorded step")
            step = self._recording
        self._finish()
        self._start(step)
        training = bool(getattr(self.model, "training", False))
        try:
            self.model.eval()
            with self._torch.no_grad():
                output = self._call(batch)
        except BaseException:
            self._discard()
            self.close()
            raise
        finally:
            self.model.train(training)
        self._finish()
        return output

    def close(self) -> None:
        """Finish the current step, write every queued file, remove the hooks."""
        if self._closed:
            return
        self._closed = True
        try:
            self._finish()
        finally:
            self._detach()
            self._writer.close()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if error is not None:
            self._discard()
        self.close()

    # -- internals ----------------------------------------------------------------------

    def _guard(self) -> None:
        if self._closed:
            raise RecordError("this Recorder is closed")

    def _call(self, batch: Any) -> Any:
        """The model on ``batch``, its tensors moved to the model's device first."""
        parameter = next(iter(self.model.parameters()), None)
        device = parameter.device if parameter is not None else None

        def move(value: Any) -> Any:
            return value.to(device) if device is not None and hasattr(value, "to") else value

        if isinstance(batch, Mapping):
            return self.model(**{key: move(value) for key, value in batch.items()})
        return self.model(move(batch))

    def _start(self, step: int) -> None:
        self._recording = step
        self._chunks = {r.layer: [] for r in self.routers}
        self._taken = dict.fromkeys(self.layers, 0)
        self._skipped = dict.fromkeys(self.layers, 0)
        self._handles = [r.module.register_forward_hook(self._hook(r)) for r in self.routers]
        self._handles.append(
            self.model.register_forward_pre_hook(self._see_inputs, with_kwargs=True)
        )

    def _discard(self) -> None:
        self._recording = None
        self._chunks = {}
        self._mask = None
        self._detach()

    def _detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _see_inputs(self, module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        """Keep the padding mask of the forward about to run (``attention_mask`` [B, S])."""
        mask = kwargs.get("attention_mask")
        self._mask = mask.detach().reshape(-1).to("cpu") != 0 if mask is not None else None

    def _hook(self, router: Router) -> Any:
        def hook(module: Any, args: Any, output: Any) -> None:
            try:
                values, ids = router.adapter.read(module, output)
                self._take(router, values, ids)
            except Exception:  # a bad reading stops recording: hooks off, step not written
                self._discard()
                self.close()
                raise

        return hook

    def _take(self, router: Router, values: Any, ids: Any) -> None:
        """Copy up to the layer's remaining budget of tokens off the device, no token loop."""
        torch = self._torch
        layer = router.layer
        width = values.shape[-1]
        values = values.reshape(-1, width)
        expected = self.num_experts
        if expected is not None and width != expected:
            raise RecordError(
                f"layer {layer} router {router.name!r} ({router.kind}) output has {width} "
                f"experts, but the model config says E = {expected}"
            )
        if ids is None:
            if self.top_k is None:
                raise RecordError(
                    f"layer {layer}: {router.kind} does not return the selected experts and "
                    "the model config states no k: pass Recorder(..., top_k=k)"
                )
            ids = values.topk(min(int(self.top_k), width), dim=-1).indices
        ids = ids.reshape(values.shape[0], -1)
        n_tokens = values.shape[0]
        start = self._taken[layer]
        keep = min(n_tokens, self.max_tokens - start)
        if keep <= 0:
            self._skipped[layer] += n_tokens
            return
        self._skipped[layer] += n_tokens - keep
        mask = None
        if self._mask is not None and self._mask.numel() == n_tokens:
            mask = self._mask[:keep].numpy().copy()
        if values.is_cuda:
            host_values = torch.empty((keep, width), dtype=torch.float32, pin_memory=True)
            host_ids = torch.empty((keep, ids.shape[1]), dtype=torch.int32, pin_memory=True)
            host_values.copy_(values[:keep].detach(), non_blocking=True)
            host_ids.copy_(ids[:keep].detach(), non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending_events.append(event)
        else:
            host_values = values[:keep].detach().to(torch.float32, copy=True)
            host_ids = ids[:keep].detach().to(torch.int32, copy=True)
        self._chunks[layer].append((host_values, host_ids, mask, start))
        self._taken[layer] = start + keep

    def _finish(self) -> None:
        """Hand the step being recorded to the writer (after its device copies are done)."""
        step = self._recording
        if step is None:
            return
        for event in self._pending_events:
            event.synchronize()
        self._pending_events.clear()
        layers: list[LayerRecord] = []
        silent = [layer for layer, chunks in self._chunks.items() if not chunks]
        for layer, chunks in self._chunks.items():
            if not chunks:
                continue
            masks = [m for _, _, m, _ in chunks if m is not None]
            layers.append(
                LayerRecord(
                    layer=layer,
                    values=np.concatenate([v.numpy() for v, _, _, _ in chunks]),
                    ids=np.concatenate([i.numpy() for _, i, _, _ in chunks]),
                    tokens=np.arange(self._taken[layer], dtype=np.int64),
                    mask=np.concatenate(masks) if len(masks) == len(chunks) else None,
                )
            )
        meta = self._meta(layers)
        self._discard()
        if silent and layers:
            self.silent_layers += len(silent)
            warnings.warn(
                f"routelog: step {step}: the routers of layer(s) "
                f"{', '.join(map(str, silent))} did not run (no tokens recorded for them)",
                RuntimeWarning,
                stacklevel=3,
            )
        if not layers:
            return
        record = StepRecord(step, self.rank, self.world_size, layers, meta)
        self._writer.submit(record)

    def _meta(self, layers: list[LayerRecord]) -> dict[str, Any]:
        routers = {r.layer: r for r in self.routers}
        return {
            "score": self.score,
            "rank": self.rank,
            "world_size": self.world_size,
            "layers": {
                str(record.layer): {
                    "router": routers[record.layer].name,
                    "class": routers[record.layer].kind,
                    "num_experts": int(record.values.shape[1]),
                    "top_k": int(record.ids.shape[1]),
                    "tokens_not_recorded": self._skipped.get(record.layer, 0),
                }
                for record in layers
            },
        }


def _model_config(model: Any) -> dict[str, Any]:
    """E, k and the MoE layers from ``model.config`` (empty when the model has none)."""
    from routelog.modelconfig import model_config_from

    config = getattr(model, "config", None)
    to_dict = getattr(config, "to_dict", None)
    if to_dict is None:
        return {}
    document = to_dict()
    try:
        parsed = model_config_from(document, Path(f"{type(model).__name__}.config"))
    except InputError as exc:
        raise RecordError(f"cannot read the model config: {exc}") from exc
    return {
        "num_experts": parsed.num_experts,
        "top_k": parsed.top_k,
        "num_layers": parsed.num_layers,
        "moe_layers": parsed.moe_layers,
    }


def _save_config(model: Any, directory: Path) -> None:
    """Write the model's ``config.json`` into the run (k, E and the MoE layers for readers),
    unless one is there already."""
    write = getattr(getattr(model, "config", None), "to_json_file", None)
    target = directory / "config.json"
    if write is not None and not target.exists():
        write(target)


def _check_layers(routers: list[Router], config: dict[str, Any], model: Any) -> None:
    """The layers with a router must be the MoE layers the config describes."""
    num_layers = config.get("num_layers")
    if num_layers is None:
        return
    moe = config.get("moe_layers")
    expected = set(range(num_layers)) if moe is None else set(moe)
    found = {r.layer for r in routers}
    if found == expected:
        return
    missing = sorted(expected - found)
    extra = sorted(found - expected)
    parts = []
    if missing:
        parts.append(f"no router found for MoE layer(s) {', '.join(map(str, missing))}")
    if extra:
        parts.append(f"routers in layer(s) {', '.join(map(str, extra))}, which it says are dense")
    raise RecordError(
        f"{type(model).__name__}: the config describes {len(expected)} MoE layers but "
        f"{len(found)} routers were found: {'; '.join(parts)} "
        "(pass check_config=False to record anyway)"
    )


def _distributed(torch: Any) -> tuple[int, int]:
    dist = getattr(torch, "distributed", None)
    if dist is not None and dist.is_available() and dist.is_initialized():
        return int(dist.get_rank()), int(dist.get_world_size())
    return 0, 1
