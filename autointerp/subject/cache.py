"""The key/value-cache API of the installed transformers, in one place.

transformers renames this API between releases: up to 5.23 a forward pass takes and returns `past_key_values` and
older releases pass `cache_position`; 5.24 takes and returns `cache` (the old name warns, and goes in 5.40) and
drops `cache_position`. Everything that passes a cache to the model or reads a cached step's absolute position goes
through these functions, so the next rename is one edit here, and `cache_offset` finds the position through
whichever of those the installed release provides. Callers that rely on the positions check them with
`check_positions`, which fails loudly instead of steering the wrong tokens.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping
from typing import Any

import torch

# Names under which releases have passed the cache object to a model's forward, newest first.
CACHE_KWARGS: tuple[str, ...] = ("cache", "past_key_values", "layer_past")


class CacheAPIError(RuntimeError):
    """The installed transformers passes cached positions in a way this code does not read."""


def transformers_version() -> str:
    import transformers

    return str(transformers.__version__)


@functools.lru_cache(maxsize=64)
def _cache_kwarg_of(forward: Any) -> str:
    params = inspect.signature(forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwarg(model: torch.nn.Module) -> str:
    """The keyword this model's forward takes its cache under (`cache` from 5.24, `past_key_values` before)."""
    return _cache_kwarg_of(type(model).forward)


def with_cache(model: torch.nn.Module, cache: Any) -> dict[str, Any]:
    """Keyword arguments that hand `cache` (None: start a new one) to model's forward under its own name."""
    return {cache_kwarg(model): cache}


def output_cache(out: Any) -> Any:
    """The cache a forward pass returned (`out.cache` from 5.24, `out.past_key_values` before)."""
    cache = getattr(out, "cache", None) if "cache" in getattr(out, "keys", lambda: ())() else None
    if cache is None:
        cache = out.get("past_key_values") if isinstance(out, Mapping) else getattr(out, "past_key_values", None)
    return cache


def cache_length(cache: Any) -> int:
    """Number of positions held by a cache object (or a legacy tuple cache of [layers][k, v])."""
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    return int(cache[0][0].shape[-2])  # legacy tuple: [layers][k, v] of [batch, heads, seq, dim]


def cache_offset(kwargs: Mapping[str, Any]) -> int:
    """Absolute position of the first token of a forward pass, from the keyword arguments of the base model's
    forward: `cache_position` where the release passes it, else the length of the cache object handed in (under
    any known name, or any argument that is a cache object), else 0 (no cache: a fresh pass)."""
    pos = kwargs.get("cache_position")
    if isinstance(pos, torch.Tensor) and pos.numel():
        return int(pos.reshape(-1)[0])
    for name in CACHE_KWARGS:
        if kwargs.get(name) is not None:
            return cache_length(kwargs[name])
    for value in kwargs.values():  # a cache under a name not known here yet
        if hasattr(value, "get_seq_length"):
            return cache_length(value)
    return 0


def check_positions(seen: list[tuple[int, int]], expected: list[tuple[int, int]], what: str) -> None:
    """Raise CacheAPIError unless the forward passes an intervention hook saw, as (first position, length), start
    with `expected`. Called once per generation, after its first cached step."""
    got = seen[: len(expected)]
    if got != expected:
        raise CacheAPIError(
            f"{what}: the intervention hook saw forward passes at (first position, tokens) {got}, expected "
            f"{expected}. transformers {transformers_version()} passes cached positions in a way this version of "
            "autointerp does not read, so interventions would not be applied at the right tokens. Install the "
            "locked versions (requirements.lock, see the README) or a transformers release that pyproject.toml "
            "admits."
        )
