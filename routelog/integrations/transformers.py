"""``RoutelogCallback``: record routing from a HuggingFace ``Trainer`` run.

>>> from routelog.integrations.transformers import RoutelogCallback     # doctest: +SKIP
>>> trainer = Trainer(model=model, args=args, train_dataset=train,      # doctest: +SKIP
...                   callbacks=[RoutelogCallback("runs/exp1/routing", every=100)])

Needs ``pip install 'routelog[transformers]'``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from routelog.extras import require

_TrainerCallback: Any = require("transformers", "transformers").TrainerCallback


class RoutelogCallback(_TrainerCallback):  # type: ignore[misc]
    """Record the model's routers every ``every`` optimizer steps of a ``Trainer`` run.

    The recorder starts at ``on_train_begin`` (on every rank: each writes its own files),
    marks each optimizer step at ``on_step_begin`` (``state.global_step``: steps done so far)
    and writes everything at ``on_train_end``. With ``probe`` (a dict of tensors, e.g. one
    tokenized batch), each recorded step routes that batch instead of the training batch.
    Other keyword arguments go to :class:`routelog.record.Recorder`.
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        every: int = 100,
        max_tokens: int = 4096,
        probe: Any = None,
        **recorder_options: Any,
    ) -> None:
        self.directory = Path(directory)
        self.every = every
        self.max_tokens = max_tokens
        self.probe = probe
        self.options = recorder_options
        self.recorder: Any = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        from routelog.record import Recorder

        model = kwargs.get("model")
        if model is None:
            from routelog.errors import RecordError

            raise RecordError("RoutelogCallback: the Trainer passed no model to on_train_begin")
        self.recorder = Recorder(
            model,
            self.directory,
            every=self.every,
            max_tokens=self.max_tokens,
            probe=self.probe,
            **self.options,
        )

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.recorder is not None:
            self.recorder.step(int(state.global_step))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.recorder is not None:
            self.recorder.close()
            self.recorder = None
