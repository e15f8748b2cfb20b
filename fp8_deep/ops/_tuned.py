"""Per-card tables of measured tile configurations, written by the tuning scripts (``bench/tune_grouped_gemm.py``).

A table is ``fp8_deep/configs/<op>/<card>.json``: ``{"op": ..., "card": ..., "entries": [{"E": .., "N": .., "K": ..,
"rows": .., "config": "KEY=VALUE,..."}, ...]}`` (plus what the tuner records about each measurement). ``card`` is
``torch.cuda.get_device_name()`` with spaces and slashes made ``_`` (an H200 of any form factor is ``NVIDIA_H200``).

Lookup: among the entries of the same ``(N, K)``, the one nearest in ``log2(rows)`` (then in ``log2(E)``), if it is
within ``MAX_LOG2_ROWS`` of the call's rows; otherwise (or no entry of that ``(N, K)`` on this card) None, and the
launcher keeps its built-in heuristic. The tuner writes only configs whose output it checked bit for bit against the
heuristic's at its grid points, and the launcher refuses an entry whose config changes the numerics (``ACC_K``,
``UPCAST``): a table is meant to change speed, not results. ``FP8_DEEP_TUNED=0`` ignores every table (read per call:
A/B runs in one process).
"""
from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path
from typing import Optional

import torch

__all__ = ["TABLE_DIR", "TUNED_ENV", "card_key", "load_table", "lookup", "tuned_config"]

TABLE_DIR = Path(__file__).resolve().parent.parent / "configs"
TUNED_ENV = "FP8_DEEP_TUNED"
MAX_LOG2_ROWS = 1.0  # an entry tuned at twice or half the rows still applies; farther, the heuristic decides


def card_key(name: str) -> str:
    """A device name as the tables are keyed: ``"NVIDIA H100 80GB HBM3"`` -> ``"NVIDIA_H100_80GB_HBM3"``; every
    H200 (``NVIDIA H200``, ``NVIDIA H200 NVL``, ...) -> ``"NVIDIA_H200"`` (one memory system, one table)."""
    key = "_".join(name.replace("/", " ").split())
    return "NVIDIA_H200" if key.startswith("NVIDIA_H200") else key


@functools.lru_cache(maxsize=64)
def load_table(op: str, card: str) -> Optional[dict]:
    """The parsed table of ``op`` for ``card``, or None when there is none. A table that does not parse raises
    (a checked-in file is part of the package: a broken one must not be silently ignored)."""
    path = TABLE_DIR / op / f"{card}.json"
    if not path.is_file():
        return None
    try:
        table = json.loads(path.read_text())
        entries = table["entries"]
        for e in entries:
            for k in ("E", "N", "K", "rows"):
                if not (isinstance(e[k], int) and e[k] > 0):
                    raise ValueError(f"entry {e}: {k} must be a positive int")
            if not isinstance(e["config"], str):
                raise ValueError(f"entry {e}: config must be a 'KEY=VALUE,...' string")
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"tuned table {path} is malformed ({exc}); regenerate it with the tuning script or delete "
                         f"it") from None
    table["_index"] = _index(table)
    return table


def lookup(table: Optional[dict], *, E: int, N: int, K: int, rows: int) -> Optional[str]:
    """The config string of the entry of the same ``(N, K)`` nearest in ``log2(rows)``, then ``log2(E)``; None if
    the table has no entry of that ``(N, K)`` within ``MAX_LOG2_ROWS`` of ``rows``."""
    if not table:
        return None
    return _nearest(_index(table), E, N, K, rows)


def _index(table: dict) -> dict:
    """``{(N, K): [(log2 rows, log2 E, config), ...]}`` (``load_table`` builds it once per file)."""
    idx = table.get("_index")
    if idx is None:
        idx = {}
        for e in table["entries"]:
            idx.setdefault((e["N"], e["K"]), []).append((math.log2(e["rows"]), math.log2(e["E"]), e["config"]))
    return idx


def _nearest(idx: dict, E: int, N: int, K: int, rows: int) -> Optional[str]:
    cands = idx.get((N, K))
    if not cands:
        return None
    lr, le = math.log2(max(1, rows)), math.log2(max(1, E))
    d, cfg = min(((abs(r - lr), abs(e - le)), c) for r, e, c in cands)
    return cfg if d[0] <= MAX_LOG2_ROWS else None


@functools.lru_cache(maxsize=16)
def _card_of(index: int) -> str:
    return card_key(torch.cuda.get_device_name(index))


def tuned_config(op: str, device: torch.device, *, E: int, N: int, K: int, rows: int) -> Optional[str]:
    """The tuned config string for these sizes on ``device``'s card (CUDA only), or None (no table, no entry of
    this ``(N, K)``, ``FP8_DEEP_TUNED=0``)."""
    if device.type != "cuda" or os.environ.get(TUNED_ENV, "1") == "0":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _lookup_cached(op, _card_of(index), E, N, K, rows)


@functools.lru_cache(maxsize=4096)
def _lookup_cached(op: str, card: str, E: int, N: int, K: int, rows: int) -> Optional[str]:
    return lookup(load_table(op, card), E=E, N=N, K=K, rows=rows)
