"""Record routing from a live PyTorch model: the mirror of :mod:`routelog.ingest`.

``routelog.Recorder`` hooks a model's router modules (found through the adapter table in
:mod:`routelog.record.adapters`) and writes one Parquet file per recorded step, in the
per-token layout ingest reads. Needs torch (``pip install 'routelog[torch]'``); importing
this package does not import torch, creating a ``Recorder`` does.
"""

from __future__ import annotations

from routelog.record.adapters import ADAPTERS, NAMED, Adapter, find_routers
from routelog.record.recorder import Recorder

__all__ = ["ADAPTERS", "NAMED", "Adapter", "Recorder", "find_routers"]
