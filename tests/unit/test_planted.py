"""Planted features: rules over decoded tokens, collected as the `planted` source by the real collector."""

from __future__ import annotations

from pathlib import Path

import torch

from autointerp.collect.planted import PLANTED, RULES, PlantedActivations


def test_rules_on_token_strings() -> None:
    vocab = [" 1862", " The", " Mexico", " not", ".", " war", " the", "?", " Army"]
    acts = PlantedActivations(lambda ids: [vocab[ids[0]]], len(vocab))
    table = acts(torch.arange(len(vocab))) > 0
    by_name = {r.name: j for j, r in enumerate(RULES)}
    assert table[0, by_name["digits"]] and not table[6, by_name["digits"]]
    assert table[1, by_name["capitalized"]] and not table[6, by_name["capitalized"]]
    assert table[2, by_name["places"]] and table[3, by_name["negation"]]
    assert table[4, by_name["sentence_end"]] and table[7, by_name["sentence_end"]]
    assert table[5, by_name["war"]] and table[8, by_name["war"]] and table[8, by_name["capitalized"]]
    values = acts(torch.arange(len(vocab)))
    assert float(values.max()) <= 1.5 and float(values[values > 0].min()) >= 0.5


def test_collector_records_planted_features(tmp_path: Path, small_corpus: Path, tiny_gpt2_dir: Path) -> None:
    from autointerp.collect.run import run_collect
    from autointerp.config import load_config
    from autointerp.store import open_store
    from autointerp.store.queries import feature_detail, list_features
    from autointerp.subject.files import load_tokenizer
    from autointerp.subject.tokens import token_strings

    cfg = load_config(
        None,
        {
            "db": f"sqlite:///{tmp_path}/p.sqlite",
            "model.name": str(tiny_gpt2_dir),
            "corpus.source": str(small_corpus),
            "corpus.ctx_len": 16,
            "corpus.max_tokens": 2000,
            "collect.sites": [],
            "collect.planted": True,
            "collect.top_k": 6,
        },
    )
    store = open_store(cfg.db)
    run_collect(cfg, store)
    feats = list_features(store, source=PLANTED, sort="index", limit=None)
    assert [f.index for f in feats] == list(range(len(RULES)))
    tok = load_tokenizer(str(tiny_gpt2_dir))
    digits = feature_detail(store, feats[0].id)
    assert digits.summary.status == "ok" and digits.records
    for rec in digits.records:
        strings = token_strings(tok, rec.token_ids)
        for s, a in zip(strings, rec.acts, strict=True):
            assert (a > 0) == any(ch.isdigit() for ch in s), (s, a)
