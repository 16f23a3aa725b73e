"""The verify stage's model part on the real SmolLM2: a neuron steered to the target KL, its forward passes
accounted, its activation figures pooled over the prompts, the baselines computed once per run."""

from __future__ import annotations

from typing import Any

import pytest

from autointerp.config import load_config
from autointerp.intervene.identity import identity
from autointerp.intervene.measure import Measurer
from autointerp.prompts import load_prompt
from autointerp.store import open_store
from autointerp.store.tables import Feature


@pytest.mark.slow
def test_measure_on_smollm2_neuron(smol_subject: Any) -> None:
    """The model part on the real SmolLM2: calibrated to the target KL, forward passes accounted, the activation
    figures are the pooled means of the per-prompt figures, and baselines are computed once per run."""
    cfg = load_config(None, {"db": "sqlite://", "intervene.n_prompts": 2, "intervene.max_new_tokens": 8})
    store = open_store(cfg.db)
    m = Measurer(cfg, store)
    m._subjects[smol_subject.name] = smol_subject
    ident = identity(cfg, "fake:judge", load_prompt("judge"))
    key = f"{smol_subject.name}/blocks.12.mlp.post/neurons/"
    f = Feature(id=1, key=key + "7", model_id=smol_subject.name, site="blocks.12.mlp.post", source="neurons",
                index=7, corpus_id="c", max_act=2.0)  # fmt: skip
    row = m.measure(f, ident)
    assert row.status == "ok" and row.converged and abs((row.kl or 0) - 0.5) <= 0.05
    assert len(row.samples) == 2 and len(row.promoted) == len(row.suppressed) == 10
    n_tok = sum(s["baseline_tokens"] + s["steered_tokens"] for s in row.samples)
    assert row.n_generated == n_tok
    calib = len(row.config["trace"]) + 1
    # the prompts generate as the rows of one batch: one pass per step of the longest continuation, for the
    # baselines and for the steered texts, then one activation read
    steps = max(s["baseline_tokens"] for s in row.samples) + max(s["steered_tokens"] for s in row.samples)
    assert row.n_forward == calib + steps + 1
    toks = [(s["act_baseline"], s["baseline_tokens"]) for s in row.samples]
    pooled = sum(a * n for a, n in toks) / sum(n for _a, n in toks)
    assert row.act_baseline == pytest.approx(pooled, rel=1e-5)
    assert row.act_increase == pytest.approx(((row.act_steered or 0) - pooled) / 2.0, rel=1e-5)
    f2 = Feature(id=2, key=key + "8", model_id=smol_subject.name, site="blocks.12.mlp.post", source="neurons",
                 index=8, corpus_id="c", max_act=2.0)  # fmt: skip
    row2 = m.measure(f2, ident)
    assert row2.n_generated == sum(s["steered_tokens"] for s in row2.samples)  # baselines shared
    assert [s["baseline"] for s in row2.samples] == [s["baseline"] for s in row.samples]
