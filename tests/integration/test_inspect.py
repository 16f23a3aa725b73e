"""`autointerp inspect` on the real SmolLM2: what it reads on a context equals what the collector recorded there
(`features show`), for neurons and for an SAE's latents; long texts go in windows; bad input is clear."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from autointerp.query.inspect import activations, collected_sources, inspect_ids, inspect_text
from autointerp.store import open_store
from autointerp.store.queries import feature_detail, list_features
from autointerp.store.search import QueryError

pytestmark = pytest.mark.slow
SITE_N, SITE_R = "blocks.3.mlp.post", "blocks.3.resid.post"
SPEECH = (
    "The state of the Union is strong. We will build roads, schools and hospitals in every State.\n\n"
    "In 1862 the Congress passed 37 acts; in 1863 it passed 41. Our nation's tax on imports was cut.\n"
    "Fellow-Citizens of the Senate and House of Representatives: peace, commerce and honest friendship.\n"
)


@pytest.fixture(scope="module")
def smol_db(tmp_path_factory: pytest.TempPathFactory, smol_subject: Any) -> str:
    import torch

    from autointerp.collect.run import run_collect
    from autointerp.config import RunConfig
    from autointerp.subject.sae import SAE, SAEConfig, save_sae

    root = tmp_path_factory.mktemp("inspect")
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"doc{i}.txt").write_text(SPEECH * (4 + i), encoding="utf-8")
    g = torch.Generator().manual_seed(0)
    d, n = smol_subject.d_model, 64
    sae = SAE(SAEConfig(d_in=d, d_sae=n, architecture="topk", k=4, site=SITE_R),
              W_enc=torch.randn(d, n, generator=g) / math.sqrt(d), b_enc=torch.zeros(n),
              W_dec=torch.randn(n, d, generator=g) / math.sqrt(n), b_dec=torch.zeros(d))  # fmt: skip
    cfg = RunConfig.model_validate(
        {
            "db": f"sqlite:///{root}/db.sqlite",
            "corpus": {"source": str(corpus), "ctx_len": 24, "max_tokens": 2400},
            "collect": {"sites": [SITE_N], "saes": [{"path": str(save_sae(sae, root / "sae"))}], "batch_size": 16,
                        "top_k": 4, "n_quantiles": 2, "per_quantile": 2, "n_random": 2},
        }
    )  # fmt: skip
    run_collect(cfg, open_store(cfg.db), subject=smol_subject)
    return cfg.db


def test_activations_equal_the_recorded_ones(smol_db: str, smol_subject: Any) -> None:
    store = open_store(smol_db)
    sources = collected_sources(store, smol_subject, smol_subject.name)
    assert {(s.site, s.source == "neurons") for s in sources} == {(SITE_N, True), (SITE_R, False)}
    checked = 0
    for src in sources:
        for f in list_features(store, site=src.site, source=src.source, sort="max", limit=3):
            detail = feature_detail(store, f.id)
            for rec in [r for r in detail.records if r.role == "top"][:2]:
                with store.engine.connect() as conn:
                    blob = conn.exec_driver_sql(
                        f"SELECT tokens FROM context WHERE idx = {rec.context_idx}"  # noqa: S608
                    ).scalar_one()
                ids = np.frombuffer(blob, dtype="<i4").tolist()[1:]  # the context after its BOS
                acts = activations(smol_subject, sources, ids, window=64)[sources.index(src)][:, f.index]
                recorded = np.asarray(rec.acts)
                assert len(recorded) < len(ids)  # the collector skipped the first position(s)
                np.testing.assert_allclose(acts[-len(recorded) :], recorded, rtol=2e-3, atol=2e-3 * max(f.max, 1e-6))
                # and inspect shows it at its peak with activation relative to the feature's max
                res = inspect_ids(store, smol_subject, sources, ids, top=5, skip=len(ids) - len(recorded))
                peak = len(ids) - len(recorded) + int(np.argmax(recorded))
                shown = {g.feature: g for g in res.tokens[peak].features}
                if rec.rank == 0:  # the feature's max is its top record's peak: nothing exceeds 1 there
                    assert f.id in shown and shown[f.id].relative == pytest.approx(1.0, rel=1e-3)
                    assert all(g.relative <= 1.0 + 1e-3 for g in shown.values())
                checked += 1
    assert checked >= 8


def test_text_in_windows_and_the_cli(smol_db: str, smol_subject: Any, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    store = open_store(smol_db)
    text = "The senate passed the tax bill. " * 4
    one = inspect_text(store, text, subject=smol_subject, top=3)
    assert one.n_windows == 1 and one.skipped == 1 and one.tokens[0].features == []
    assert all(len(t.features) <= 3 for t in one.tokens) and any(t.features for t in one.tokens)
    assert "".join(t.token for t in one.tokens) == text
    ids = smol_subject.tokenizer(text, add_special_tokens=False)["input_ids"]
    cut = inspect_ids(store, smol_subject, collected_sources(store, smol_subject, one.model), ids, window=10, skip=1)
    assert cut.n_windows == math.ceil(len(ids) / 10) and [t.window for t in cut.tokens][9:11] == [0, 1]
    assert cut.tokens[10].features == [] and cut.tokens[11].features  # each window starts again
    only = inspect_text(store, text, subject=smol_subject, sites=[SITE_N])
    assert only.sources == [f"{SITE_N}/neurons"]
    with pytest.raises(QueryError, match="no features collected at site 'blocks.9.mlp.post'"):
        inspect_text(store, text, subject=smol_subject, sites=["blocks.9.mlp.post"])
    with pytest.raises(QueryError, match="empty text"):
        inspect_text(store, "  ", subject=smol_subject)

    from autointerp.cli import main

    def cli(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["autointerp", "inspect", *args, "--db", smol_db])
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = int(exc.code or 0)
        got = capsys.readouterr()
        return code, got.out, got.err

    code, out, _err = cli(text, "--json", "--top", "2")
    got = json.loads(out)
    assert code == 0 and got["n_tokens"] == len(ids) and got["tokens"][3]["features"][0].keys() >= {
        "feature", "site", "source", "index", "activation", "relative", "explanation",
    }  # fmt: skip
    code, out, _err = cli(text)
    assert code == 0 and "one window" in out and "x max" in out
    code, _out, err = cli(text, "--sites", "blocks.9.mlp.post")
    assert code == 2 and "no feature has site 'blocks.9.mlp.post' (--sites)" in err  # checked before the model loads


def test_a_database_without_features(tmp_path: Path, smol_subject: Any) -> None:
    store = open_store(f"sqlite:///{tmp_path}/empty.sqlite")
    with pytest.raises(QueryError, match="no features yet"):
        inspect_text(store, "text", subject=smol_subject)
