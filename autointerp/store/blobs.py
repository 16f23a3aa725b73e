"""Compact, portable array blobs: little-endian, fixed dtypes, so SQLite and PostgreSQL hold the same bytes."""

from __future__ import annotations

import numpy as np

_F16 = np.dtype("<f2")
_I32 = np.dtype("<i4")


def pack_f16(values: np.ndarray) -> bytes:
    return np.asarray(values, dtype=np.float32).astype(_F16).tobytes()


def unpack_f16(blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, dtype=_F16).astype(np.float32)


def pack_i32(values: np.ndarray) -> bytes:
    arr = np.asarray(values)
    if arr.size and (arr.min() < np.iinfo(np.int32).min or arr.max() > np.iinfo(np.int32).max):
        raise ValueError("token ids do not fit in int32")
    return arr.astype(_I32).tobytes()


def unpack_i32(blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, dtype=_I32).astype(np.int64)
