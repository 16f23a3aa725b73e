"""Planted-feature benchmark: do scorers prefer the true explanation, and do explainers find the rule?

Six synthetic features with a known rule (digits, capitalized words, place names, negations, sentence ends, war
words; autointerp/collect/planted.py) are computed over the real corpus and collected as the `planted` source by
the real collector, so the real pipeline runs on them:
  explainers  truth (the rule's own description), tokens (the LLM-free baseline), llm (the local SmolLM2)
  scorers     embedding (all-MiniLM-L6-v2), simulation (the local SmolLM2, all at once from logprobs)
For every explainer, each feature is scored with its own explanation and with the explanations the same explainer
gave the other features (mismatched). Reported per explainer and scorer:
  auroc     how often a true explanation outranks a mismatched one (AUROC over all true vs mismatched scores)
  true/mis  mean score of true vs mismatched explanations
and per explainer, `match`: the fraction of features whose explanation is closest (all-MiniLM-L6-v2 cosine) to its
own rule's description among the six.
Last line: auroc_embedding=... auroc_tokens=... auroc_llm=... (the embedding scorer's AUROC for the truth, tokens
and llm explainers) and the simulation scorer's, auroc_sim_truth=... auroc_sim_tokens=... auroc_sim_llm=...

    .venv/bin/python bench/planted.py [--quick]
"""

from __future__ import annotations

import argparse
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from sqlmodel import select

from autointerp.collect.planted import PLANTED, RULES
from autointerp.collect.run import run_collect
from autointerp.config import load_config
from autointerp.explain.run import run_explain
from autointerp.metrics import auroc
from autointerp.score.run import run_score
from autointerp.store import open_store
from autointerp.store.explanations import write_explanations
from autointerp.store.tables import Explanation, Feature, Score

EXPLAINERS = ("truth", "tokens", "llm")


def _explanations(store: Any, feats: list[Feature]) -> dict[str, dict[int, str]]:
    """explainer -> feature id -> text (truth from the rules, tokens and llm from the explain stage)."""
    out: dict[str, dict[int, str]] = {"truth": {}, "tokens": {}, "llm": {}}
    for f in feats:
        assert f.id is not None
        out["truth"][f.id] = RULES[f.index].description
    with store.session() as s:
        for e in s.exec(select(Explanation).where(Explanation.status == "ok")).all():
            if e.explainer in ("tokens", "llm"):
                out[e.explainer][e.feature_id] = e.text or ""
    return out


def _plant_pairs(store: Any, feats: list[Feature], texts: dict[str, dict[int, str]]) -> None:
    """Rows for every (feature, explanation of feature j by explainer E): explainer 'pair:E:j'."""
    rows = []
    for f in feats:
        for name, by_feature in texts.items():
            for g in feats:
                if g.id in by_feature and f.id is not None:
                    rows.append(
                        Explanation(
                            feature_id=f.id,
                            explainer=f"pair:{name}:{g.index}",
                            model="",
                            prompt="",
                            prompt_hash="",
                            config_hash="",
                            status="ok",
                            text=by_feature[g.id],
                        )
                    )
    write_explanations(store, rows)


def _table(store: Any, feats: list[Feature]) -> dict[tuple[str, str], dict[str, float]]:
    index_of = {f.id: f.index for f in feats}
    with store.session() as s:
        pairs = s.exec(select(Score, Explanation).join(Explanation, Explanation.id == Score.explanation_id)).all()
    got: dict[tuple[str, str], tuple[list[float], list[bool]]] = {}
    for sc, ex in pairs:
        if not ex.explainer.startswith("pair:") or sc.value is None:
            continue
        _, name, j = ex.explainer.split(":")
        vals, labels = got.setdefault((name, sc.method), ([], []))
        vals.append(sc.value)
        labels.append(int(j) == index_of[sc.feature_id])
    out = {}
    for key, (vals, labels) in got.items():
        v, lab = np.array(vals), np.array(labels)
        res = auroc(v, lab, n_boot=200) if lab.any() and (~lab).any() else None
        out[key] = {
            "auroc": float("nan") if res is None or res.value is None else res.value,
            "true": float(v[lab].mean()) if lab.any() else float("nan"),
            "mis": float(v[~lab].mean()) if (~lab).any() else float("nan"),
        }
    return out


def _match(texts: dict[str, dict[int, str]], feats: list[Feature]) -> dict[str, float]:
    from autointerp.score.embed import Embedder

    emb = Embedder()
    rules = emb.encode([r.description for r in RULES])
    out = {}
    for name, by_feature in texts.items():
        hits = [
            int(np.argmax(rules @ emb.encode([by_feature[f.id]])[0])) == f.index for f in feats if f.id in by_feature
        ]
        out[name] = float(np.mean(hits)) if hits else float("nan")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--quick", action="store_true", help="smaller corpus, fewer test records, no LLM explainer, no simulation"
    )
    ap.add_argument("--keep", type=Path, help="write the database into this new folder and keep it (to inspect)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-planted-") as tmp:
        if args.keep:
            args.keep.mkdir(parents=True)
        db = (args.keep or Path(tmp)) / "planted.sqlite"
        over: dict[str, Any] = {
            "db": f"sqlite:///{db}",
            "corpus.max_tokens": 30_000 if args.quick else 150_000,
            "collect.sites": [],
            "collect.planted": True,
            "explain.features": PLANTED,
            "explain.limit": None,
            "score.features": PLANTED,
            "score.max_per_role": 4,
        }
        cfg = load_config(None, over)
        store = open_store(cfg.db)
        run_collect(cfg, store)
        run_explain(cfg.model_copy(update={"explain": cfg.explain.model_copy(update={"explainer": "tokens"})}), store)
        if not args.quick:
            run_explain(cfg, store)
        with store.session() as s:
            feats = list(s.exec(select(Feature).where(Feature.source == PLANTED).order_by(Feature.index)).all())
        texts = _explanations(store, feats)
        if args.quick:
            texts.pop("llm")
        _plant_pairs(store, feats, texts)
        # only the planted pairs are scored: the explain stage's own rows are the same texts
        methods = ["embedding"] if args.quick else ["embedding", "simulation"]
        cfg = cfg.model_copy(update={"score": cfg.score.model_copy(update={"methods": methods})})
        con = sqlite3.connect(db)
        con.execute("update explanation set status = 'kept' where explainer not like 'pair:%'")
        con.commit()
        con.close()
        run_score(cfg, store)
        table = _table(store, feats)
        match = _match(texts, feats)
    print(f"planted features: {', '.join(r.name for r in RULES)} ({time.perf_counter() - t0:.0f}s)")
    print(f"{'explainer':<10} {'scorer':<11} {'auroc':>6} {'true':>7} {'mis':>7}   match")
    for name in EXPLAINERS:
        for method in ("embedding", "simulation"):
            row = table.get((name, method))
            if row:
                print(
                    f"{name:<10} {method:<11} {row['auroc']:6.2f} {row['true']:7.3f} {row['mis']:7.3f}"
                    f"   {match.get(name, float('nan')):.2f}"
                )

    def a(name: str, method: str) -> str:
        row = table.get((name, method))
        return "nan" if row is None else f"{row['auroc']:.3f}"

    print(
        f"auroc_embedding={a('truth', 'embedding')} auroc_tokens={a('tokens', 'embedding')} "
        f"auroc_llm={a('llm', 'embedding')} auroc_sim_truth={a('truth', 'simulation')} "
        f"auroc_sim_tokens={a('tokens', 'simulation')} auroc_sim_llm={a('llm', 'simulation')}"
    )


if __name__ == "__main__":
    main()
