"""The cache API of the installed transformers: where a cached step's absolute position is read from, and the guard
that makes an unreadable position a loud error instead of steering that silently stops after the prompt."""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch

import autointerp.intervene.hooks as iv_mod
from autointerp.intervene.hooks import Intervention, Neuron, intervene
from autointerp.intervene.steer import generate, generate_many
from autointerp.subject.cache import (
    CacheAPIError,
    cache_kwarg,
    cache_length,
    cache_offset,
    check_positions,
    output_cache,
    transformers_version,
    with_cache,
)
from autointerp.subject.sites import base_model


class _FakeCache:
    def __init__(self, n: int) -> None:
        self.n = n

    def get_seq_length(self) -> int:
        return self.n


def test_offset_from_every_form_a_release_has_used() -> None:
    legacy = ((torch.zeros(1, 2, 5, 4), torch.zeros(1, 2, 5, 4)),)
    assert cache_offset({}) == 0
    assert cache_offset({"cache": None, "past_key_values": None}) == 0
    assert cache_offset({"cache_position": torch.arange(7, 9), "past_key_values": _FakeCache(3)}) == 7
    assert cache_offset({"cache": _FakeCache(11)}) == 11
    assert cache_offset({"past_key_values": _FakeCache(4)}) == 4
    assert cache_offset({"past_key_values": legacy}) == 5
    assert cache_offset({"kv_state": _FakeCache(6)}) == 6  # a cache under a name not known yet is still found
    assert cache_length(None) == 0


def test_check_positions_names_the_transformers_version() -> None:
    check_positions([(0, 5), (5, 1), (6, 1)], [(0, 5), (5, 1)], "generate")
    version = re.escape(transformers_version())
    with pytest.raises(CacheAPIError, match=rf"expected \[\(0, 5\), \(5, 1\)\]\. transformers {version} "):
        check_positions([(0, 5), (0, 1)], [(0, 5), (5, 1)], "generate")


def test_the_installed_release_round_trips_its_cache(tiny_subject: Any) -> None:
    model = tiny_subject.model
    ids = torch.tensor([[tiny_subject.bos_token_id, 5, 6, 7]])
    seen: list[int] = []
    handle = base_model(model).register_forward_pre_hook(
        lambda _m, _a, kw: seen.append(cache_offset(kw)), with_kwargs=True
    )
    try:
        with torch.inference_mode():
            first = model(input_ids=ids, **with_cache(model, None), use_cache=True)
            cache = output_cache(first)
            assert cache_length(cache) == 4
            model(input_ids=ids[:, -1:], **with_cache(model, cache), use_cache=True)
    finally:
        handle.remove()
    assert seen == [0, 4]
    assert cache_kwarg(model) in ("cache", "past_key_values")


def test_hook_sees_the_positions_generation_feeds(tiny_subject: Any) -> None:
    neuron = Neuron("blocks.1.mlp.post", 3, 128)
    with intervene(tiny_subject, Intervention.clamp(neuron, 1.0)) as passes:
        gen = generate(tiny_subject, "The state of the Union", max_new_tokens=3)
    n = len(gen.prompt_ids)
    assert passes.seen == [(0, n), (n, 1), (n + 1, 1)]


@pytest.mark.parametrize("many", [False, True])
def test_unreadable_cache_position_is_an_error_not_a_silent_wrong_steer(
    tiny_subject: Any, monkeypatch: pytest.MonkeyPatch, many: bool
) -> None:
    # What transformers 5.24 did to the old code: the hook reads position 0 for every cached step.
    monkeypatch.setattr(iv_mod, "cache_offset", lambda _kwargs: 0)
    ivs = [Intervention.clamp(Neuron("blocks.1.mlp.post", 3, 128), 1.0)]
    with pytest.raises(CacheAPIError, match=rf"transformers {re.escape(transformers_version())} "):
        if many:
            generate_many(tiny_subject, ["Hello there", "The state of the Union"], ivs, max_new_tokens=4)
        else:
            generate(tiny_subject, "The state of the Union", ivs, max_new_tokens=4)
    # without an intervention positions do not matter, and one step has no cached position to check
    assert len(generate(tiny_subject, "The state of the Union", max_new_tokens=4).token_ids) == 4
    assert len(generate(tiny_subject, "The state of the Union", ivs, max_new_tokens=1).token_ids) == 1
