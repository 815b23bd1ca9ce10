"""How the run store encodes what it keeps: JSON fields and compressed numeric columns.

JSON fields (run ``config`` and ``summary``, event ``data``) accept numpy scalars and arrays, tuples,
paths and tensors; non-finite floats are stored as the strings ``"nan"``, ``"inf"`` and ``"-inf"``
(``float()`` reads them back); other objects are stored as ``str(obj)``.

Columns (a run's per-step series, a scalar series) are stored as *chunks*: each column a
zlib-compressed blob (bytes transposed by significance, optionally delta-coded first) described by a
small JSON header, so reads give back exactly the stored dtype, shape and bits.
"""

from __future__ import annotations

import json
import math
import os
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from lrviz.errors import StoreError

__all__ = ["decode_column", "dumps", "encode_column", "jsonable", "loads", "loss_stats", "pack", "unpack"]

_ZLEVEL = 6


# --------------------------------------------------------------------------- JSON


def jsonable(obj: Any, nonfinite: str = "text") -> Any:
    """``obj`` as plain JSON types (see the module docstring for the conversions).

    Non-finite floats become the strings ``"nan"``, ``"inf"``, ``"-inf"`` (``nonfinite="text"``:
    the store and the live protocol, which read them back with ``float()``) or ``None``
    (``nonfinite="null"``: files for other programs, e.g. ``run.json``).
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        if math.isfinite(obj):
            return obj
        if nonfinite == "null":
            return None
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, np.generic):
        return jsonable(obj.item(), nonfinite)
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v, nonfinite) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v, nonfinite) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted((jsonable(v, nonfinite) for v in obj), key=repr)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    tolist = getattr(obj, "tolist", None)  # numpy arrays, torch tensors
    if callable(tolist):
        try:
            return jsonable(tolist(), nonfinite)
        except Exception:  # noqa: BLE001 - fall back to the text form below
            pass
    return str(obj)


def dumps(obj: Any) -> str:
    return json.dumps(jsonable(obj), allow_nan=False, separators=(",", ":"))


def loads(text: str | None, what: str = "a JSON field") -> Any:
    """Decode a stored JSON field; damaged text is a StoreError (kind 'damaged') naming ``what``."""
    if not text:
        return {}
    try:
        return json.loads(text)
    except ValueError as exc:
        raise StoreError(f"{what} is damaged ({exc}); the rest of the store is readable", kind="damaged") from None


# --------------------------------------------------------------------------- column codec

_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def _shuffle(raw: np.ndarray, itemsize: int) -> bytes:
    """Bytes grouped by position within the item (all first bytes, then all second bytes...)."""
    return raw.view(np.uint8).reshape(-1, itemsize).T.tobytes()


def _unshuffle(buf: bytes, itemsize: int) -> np.ndarray:
    return np.ascontiguousarray(np.frombuffer(buf, np.uint8).reshape(itemsize, -1).T)


def encode_column(name: str, arr: np.ndarray) -> tuple[dict, bytes]:
    """The smallest of: shuffled bytes, or shuffled deltas of the bit patterns along the step axis."""
    a = np.ascontiguousarray(arr)
    if a.dtype.kind not in "biufc":
        raise StoreError(f"step column {name!r} has dtype {a.dtype}; only numeric columns can be stored")
    size = a.dtype.itemsize
    best = zlib.compress(_shuffle(a, size), _ZLEVEL)
    enc = "s"
    if size in _UINT and a.shape[0] > 1:
        u = a.view(_UINT[size])
        d = u.copy()
        np.subtract(u[1:], u[:-1], out=d[1:])  # wraps modulo 2**bits: exactly reversible
        packed = zlib.compress(_shuffle(d, size), _ZLEVEL)
        if len(packed) < len(best):
            best, enc = packed, "ds"
    meta = {"name": name, "dtype": a.dtype.str, "shape": list(a.shape), "enc": enc, "len": len(best)}
    return meta, best


def decode_column(meta: dict, payload: bytes) -> np.ndarray:
    dtype = np.dtype(meta["dtype"])
    shape = tuple(meta["shape"])
    raw = _unshuffle(zlib.decompress(payload), dtype.itemsize)
    if meta["enc"] == "ds":
        u = raw.view(_UINT[dtype.itemsize]).reshape(shape)
        u = np.cumsum(u, axis=0, dtype=u.dtype)
        return u.view(dtype).reshape(shape)
    if meta["enc"] != "s":
        raise StoreError(f"unknown column encoding {meta['enc']!r}; the store was written by a newer lrviz")
    return raw.view(dtype).reshape(shape)


def pack(n: int, columns: Mapping[str, np.ndarray]) -> tuple[str, bytes]:
    """Columns of ``n`` rows as one chunk: a JSON header and the encoded columns one after another."""
    metas: list[dict] = []
    payloads: list[bytes] = []
    for name, a in columns.items():
        meta, payload = encode_column(name, a)
        metas.append(meta)
        payloads.append(payload)
    return json.dumps({"n": n, "cols": metas}, separators=(",", ":")), b"".join(payloads)


def unpack(header: str, data: bytes, what: str, wanted: set[str] | None = None) -> dict[str, np.ndarray]:
    """The columns of a chunk (only those in ``wanted``, when given); a damaged chunk is a StoreError
    (kind 'damaged') that begins with ``what`` ("the steps 0..99 of run 3 in ... are damaged")."""
    cols: dict[str, np.ndarray] = {}
    offset = 0
    try:
        for meta in json.loads(header)["cols"]:
            length = meta["len"]
            if wanted is None or meta["name"] in wanted:
                cols[meta["name"]] = decode_column(meta, data[offset : offset + length])
            offset += length
    except (ValueError, KeyError, TypeError, zlib.error) as exc:
        raise StoreError(f"{what} ({type(exc).__name__}: {exc}); the run's other data is readable",
                         kind="damaged") from None
    return cols


def loss_stats(loss: np.ndarray | None) -> tuple[float | None, float | None]:
    """(lowest, last) finite value of a loss column, or None when it has none."""
    if loss is None:
        return None, None
    values = np.asarray(loss, dtype=np.float64).ravel()
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return None, None
    return float(finite.min()), float(finite[-1])
