"""Explainer: golden prompt, normalization and marking (also on real SmolLM2 tokens), parser edge cases, the token
baseline, and the stage end to end on a collected database with a scripted backend (idempotence, cache, failures,
skips, train split only)."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from autointerp.config import ExplainConfig, load_config
from autointerp.explain.explainers import ExplanationParseError, LLMExplainer, TokenExplainer, parse_explanation
from autointerp.explain.run import build_explainer, run_explain
from autointerp.llm.client import MemoryCache, RetryPolicy
from autointerp.llm.fake import FakeBackend, fake_client
from autointerp.llm.types import ChatRequest, ChatResult, TransientLLMError
from autointerp.prompts import PromptError, load_prompt
from autointerp.records import Example, FeatureExamples, format_examples, marked, quantize, train_records
from autointerp.store import open_store
from autointerp.store.explanations import explanations_for
from autointerp.store.queries import select_features


def _fx() -> FeatureExamples:
    ex1 = Example(
        (" The", " state", " of", " the", " Union", " is", " strong", "."), (0, 0, 0, 0.5, 4.0, 0, 0, 0), "top", 4
    )
    ex2 = Example((" our", " nation", "'s", " café", "\n", "\n", "We"), (0, 3.1, 2.0, 0, 0, 0, 0), "top", 3.1)
    ex3 = Example((" a", " quiet", " Union", " hall"), (0, 0, 0.3, 0.31), "quantile", 0.31)
    return FeatureExamples(7, "m/blocks.1.mlp.post/neurons/7", 4.0, 0.01, (ex1, ex2, ex3))


def test_explain_prompt_golden(golden: Any) -> None:
    cfg = ExplainConfig()
    client = fake_client()
    req = LLMExplainer(cfg, client, load_prompt("explain")).request(_fx())
    rendered = "".join(f"<|{m.role}|>\n{m.content}\n" for m in req.messages)
    golden("explain_prompt.txt", rendered)
    assert req.max_tokens == cfg.max_tokens


def test_prompt_errors_name_the_prompt() -> None:
    with pytest.raises(PromptError, match="nope"):
        load_prompt("nope")
    with pytest.raises(PromptError, match="explain"):
        load_prompt("explain").render()  # $examples missing


def test_quantize_rule() -> None:
    # ceil(10 a / max), 0 for a <= 0, clipped to 10: any positive activation shows as at least 1.
    assert quantize([-1.0, 0.0, 0.001, 0.4, 0.41, 1.0, 2.0], 1.0) == [0, 0, 1, 4, 5, 10, 10]
    assert quantize([1.0, 2.0], 0.0) == [0, 0]


def test_marking_merges_spans_and_spells_out_newlines() -> None:
    fx = _fx()
    assert marked([0, 1.0, 0.5, 0.49, -2]) == [False, True, True, False, False]
    assert fx.examples[0].marked_text() == " The state of the <<Union>> is strong."
    assert fx.examples[1].marked_text() == " our <<nation's>> café\\n\\nWe"
    # low-quantile example: marks follow its own peak, the integers stay relative to the feature's max
    assert fx.examples[2].marked_values(fx.max_act) == [("Union", 1), ("hall", 1)]
    assert 'Activations: "nation" 8, "\'s" 5' in format_examples(fx)


def test_window_keeps_the_peak_and_what_precedes_it() -> None:
    ex = Example(tuple(f"t{i}" for i in range(40)), tuple(1.0 if i == 30 else 0.0 for i in range(40)), "top", 1.0)
    w = ex.window(8)
    assert len(w.tokens) == 8 and "t30" in w.tokens and w.tokens.index("t30") == 6
    assert ex.window(0) is ex and ex.window(100) is ex


def test_marking_on_real_smollm2_tokens(smol_tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    from autointerp.subject.tokens import token_strings

    tok = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    text = "The café\nserves 日本 tea\ttoday"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    strings = token_strings(tok, ids)
    assert "".join(strings) == text  # no Ġ / Ċ / byte artefacts, multi-byte characters whole
    acts = [0.0] * len(strings)
    cafe = next(i for i, s in enumerate(strings) if "caf" in s or "é" in s)
    acts[cafe] = 2.0
    line = Example(tuple(strings), tuple(acts), "top", 2.0).marked_text()
    assert "\n" not in line and "\\n" in line and "\\t" in line and "日本" in line
    assert line.count("<<") == 1 and "Ġ" not in line and "Ċ" not in line


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Explanation: years written as four-digit numbers.", "years written as four-digit numbers"),
        ("  explanation :  the word 'Union'\n\nMore text", "the word 'Union'"),
        ('Sure!\nExplanation: "nouns for citizens"', "nouns for citizens"),
        ("numbers in dates", "numbers in dates"),
        ("The marked tokens have in common that they are dates", "dates"),
    ],
)
def test_parser_accepts(raw: str, expected: str) -> None:
    assert parse_explanation(raw) == expected


@pytest.mark.parametrize(
    ("raw", "finish", "why"),
    [
        ("", "stop", "empty"),
        ("   \n  ", "stop", "empty"),
        ("Explanation:", "stop", "empty"),
        ("Explanation: ...", "stop", "invalid explanation"),
        ("Explanation: ?!? --", "stop", "no words"),
        ("Explanation: the tokens that appear befo", "length", "truncated"),
        ('Example 3: "Union" 8, "nation" 5', "stop", "example format"),
        ("Explanation: <<Union>>", "stop", "example format"),
        ("Explanation: " + "very " * 60 + "long", "stop", "200"),
    ],
)
def test_parser_refuses(raw: str, finish: str, why: str) -> None:
    with pytest.raises(ExplanationParseError, match=why):
        parse_explanation(raw, finish)


def test_train_records_use_train_split_only_and_spread_quantiles() -> None:
    class R:
        def __init__(self, role: str, split: str, rank: int, b: int | None = None) -> None:
            self.role, self.split, self.rank, self.bin = role, split, rank, b

    recs = [R("top", s, i) for i, s in enumerate(["train", "test"] * 5)]
    recs += [R("quantile", s, i, b) for b in range(3) for i, s in enumerate(["train", "test"] * 2)]
    recs += [R("random", "test", i) for i in range(3)]
    picked = train_records(recs, n_top=3, n_quantile=4)
    assert all(r.split == "train" for r in picked)
    assert [r.role for r in picked] == ["top"] * 3 + ["quantile"] * 4
    assert [r.bin for r in picked[3:]] == [2, 1, 0, 2]  # highest bin first, round robin


def test_token_baseline_names_the_enriched_token() -> None:
    exs = tuple(
        Example((" the", " great", " nation", " of", " the"), (0.1, 0.0, 5.0 - i, 0.0, 0.2), "top", 5.0 - i)
        for i in range(4)
    )
    fx = FeatureExamples(1, "k", 5.0, 0.01, exs)
    freq = {"the": 0.2, "great": 0.01, "nation": 0.001, "of": 0.1}
    out = TokenExplainer(ExplainConfig(), lambda _key: freq).explain([fx])[0]
    assert out.status == "ok" and out.text is not None
    assert out.text.startswith('the token "nation"') and '(after "great")' in out.text
    assert "the" not in out.text.replace("the token", "")  # frequent filler is not named


def test_features_with_too_few_examples_are_skipped_with_reason() -> None:
    fx = FeatureExamples(1, "k", 1.0, 0.0, (Example(("a",), (1.0,), "top", 1.0),))
    dead = FeatureExamples(2, "k2", 0.0, 0.0, ())
    client = fake_client()
    outs = LLMExplainer(ExplainConfig(min_examples=3), client, load_prompt("explain")).explain([fx, dead])
    assert [o.status for o in outs] == ["skipped", "skipped"]
    assert "only 1 activating" in (outs[0].error or "") and "dead" in (outs[1].error or "")
    assert client.calls == 0


# ---------------------------------------------------------------------------------------------------------------
# The stage on a collected database


def _cfg(db: str, **explain: Any) -> Any:
    over = {"db": db, "explain.limit": 6, "explain.min_examples": 1, "explain.features": "all"}
    over.update({f"explain.{k}": v for k, v in explain.items()})
    over["llm"] = {"fake": {"backend": "fake", "model": "scripted"}}
    over["explain.llm"] = "fake"
    return load_config(None, over)


def test_stage_writes_rows_and_a_rerun_is_free(collected_db: str) -> None:
    cfg = _cfg(collected_db)
    store = open_store(cfg.db)
    first = run_explain(cfg, store)
    # the fake's default answer names the first marked token: one call and one ok explanation per feature
    assert first.selected == 6 and first.counts == {"ok": 6} and first.llm_calls == 6
    again = run_explain(cfg, store)
    assert again.already_done == 6 and again.llm_calls == 0 and again.counts == {}
    # a fresh explainer over the same store: every request is answered from the database cache
    ex = build_explainer(cfg, store)
    con = sqlite3.connect(cfg.db.split("///", 1)[1])
    before = con.execute("select id, feature_id, text, status from explanation order by id").fetchall()
    con.execute("update explanation set status = 'failed'")  # force a redo of every row
    con.commit()
    redo = run_explain(cfg, store, explainer=ex)
    assert redo.llm_calls == 0 and redo.cache_hits == 6
    after = con.execute("select id, feature_id, text, status from explanation order by id").fetchall()
    assert after == before
    feats = select_features(store, "all", limit=6)
    expl = explanations_for(store, [f.id for f in feats if f.id is not None])
    row = next(e for es in expl.values() for e in es if e.status == "ok")
    assert row.model == "fake:scripted" and row.prompt == "explain" and len(row.prompt_hash) == 12


def test_explainer_sees_train_records_only(collected_db: str) -> None:
    cfg = _cfg(collected_db, window=0)
    store = open_store(cfg.db)
    seen: list[ChatRequest] = []

    def spy(req: ChatRequest) -> str:
        seen.append(req)
        return "Explanation: something"

    ex = build_explainer(cfg, store)
    assert isinstance(ex, LLMExplainer) and isinstance(ex.client.backend, FakeBackend)
    ex.client.backend.responder = spy
    run_explain(cfg, store, explainer=ex)
    con = sqlite3.connect(cfg.db.split("///", 1)[1])
    test_only = con.execute(
        "select f.id, c.tokens from record r join feature f on f.id = r.feature_id "
        "join context c on c.id = r.context_id where r.split = 'test' and r.role != 'random' and r.max_act > 0"
    ).fetchall()
    train = con.execute(
        "select count(*) from record r join record t on r.feature_id = t.feature_id and r.context_id = t.context_id "
        "where r.split = 'train' and t.split = 'test'"
    ).fetchone()[0]
    assert train == 0  # the two splits are disjoint in the database
    assert seen and test_only
    n_examples = [m.content.count("Example ") for r in seen for m in r.messages[-1:]]
    assert all(n <= cfg.explain.n_top + cfg.explain.n_quantile for n in n_examples)


def test_failures_are_stored_as_failures_with_raw_text(collected_db: str) -> None:
    cfg = _cfg(collected_db)
    store = open_store(cfg.db)
    answers = iter(
        [
            "",
            ChatResult("Explanation: the tokens that appear right befo", "length", 10, 48),
            TransientLLMError("503"),
        ]
    )

    def script(req: ChatRequest) -> Any:
        return next(answers, "Explanation: fine")

    ex = build_explainer(cfg, store)
    assert isinstance(ex, LLMExplainer) and isinstance(ex.client.backend, FakeBackend)
    ex.client.backend.responder = script
    ex.client.retry = RetryPolicy(attempts=1)
    ex.client.max_batch = 1
    run_explain(cfg, store, explainer=ex)
    con = sqlite3.connect(cfg.db.split("///", 1)[1])
    rows = con.execute("select status, text, error, raw from explanation order by id").fetchall()
    failed = [r for r in rows if r[0] == "failed"]
    assert len(failed) == 3 and all(r[1] is None for r in failed)
    errors = " | ".join(r[2] for r in failed)
    assert "empty answer" in errors and "truncated" in errors and "LLM call failed" in errors
    assert any(r[3] and "befo" in r[3] for r in failed)  # the raw answer is kept
    assert "Explanation could not be parsed" not in str(rows)
    # failed rows are retried by the next run: the failed call now succeeds; the unusable answers come back from
    # the cache (same request, same answer) and stay failures, still one row per feature
    calls = ex.client.calls
    run_explain(cfg, store, explainer=ex)
    assert ex.client.calls == calls + 1
    statuses = [r[0] for r in con.execute("select status from explanation").fetchall()]
    assert statuses.count("failed") == 2 and len(statuses) == len(rows)


def test_token_baseline_stage(collected_db: str) -> None:
    cfg = _cfg(collected_db, explainer="tokens")
    store = open_store(cfg.db)
    res = run_explain(cfg, store)
    assert res.llm_calls == 0 and res.counts == {"ok": 6}
    con = sqlite3.connect(cfg.db.split("///", 1)[1])
    texts = [r[0] for r in con.execute("select text from explanation where status = 'ok'")]
    assert len(texts) == 6 and all(
        re.fullmatch(r'the tokens? "[^"]+"((, | and )"[^"]+")*( \(after "[^"]+"\))?', t) for t in texts
    )


def test_memory_cache_survives_between_clients() -> None:
    cache = MemoryCache()
    a = fake_client(cache=cache)
    a.chat_many([ChatRequest(messages=())])
    b = fake_client(cache=cache)
    b.chat_many([ChatRequest(messages=())])
    assert b.calls == 0
