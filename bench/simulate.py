"""Simulator benchmark: records/s of the all-at-once simulator against re-encoding every record in full, forward
passes per record, and the size of its response-cache entries, on the local backend (in-process SmolLM2-135M-Instruct).

Measured side by side in one run, on the same records (real SOTU windows tokenized by SmolLM2, given to the
simulator as the subject model's decoded token strings) and the same explanations, without a response cache:
  reuse  LogprobSimulator() as the score stage runs it: the prefix (instructions, the prompt's four few-shot blocks
         and the explanation) is encoded once per feature (and the instructions and shots, which every feature
         shares, once in all: a later feature's prefix pass runs from its explanation's header on); each record's
         lines run over a copy of that key/value cache, up to its last slot, and the LM head runs at its slots only
  full   the simulator with none of that: prefix + record re-encoded in one pass per record, every row read (the
         LM head at every position, each row's top-k), as before slots and prefix reuse existed
Each feature (a distinct explanation, hence a distinct prefix) simulates the same records in both modes, record by
record with the modes alternating (and the first mode flipping), so that load from other processes on a shared
machine hits both alike. The reuse time includes the feature's prefix pass. Forward passes are counted with a hook
on the model: passes_per_record counts the passes over a record (the worse of the two modes); the prefix passes are
reported apart (one per feature in the reuse mode), with the tokens they ran (prefix_tokens_per_feature, against
prefix_tokens, the length of one prefix).
batched: the reuse mode with all of a feature's records in one call, as the score stage sends them: the local
backend runs up to batch_size records as the rows of one forward pass after the prefix's cache (right padding);
its time includes the feature's prefix pass too (from the shared instructions' cache, as in the score stage), and
rows_per_record counts how many pass rows read each record (1.000: every record read once). batch_speedup =
batched records/s over reuse records/s (one record per call). The batched call writes its responses into a response
cache in a fresh SQLite database: cache_bytes_per_logprob_entry is the mean stored size of an entry (key, request,
response and the other columns), full_row_bytes_per_entry what the same requests took when every prompt token's
row was cached as plain JSON (the full mode's results), and a rerun from that cache must make no call and give the
same predictions bit for bit (rerun_calls=0).
max_abs_diff is the largest difference between the two modes' predictions (0-10 scale).
torch runs on one thread by default: on a shared two-core machine, two threads wait on each other whenever another
process takes a core, and the same pass varied up to 5x between runs; one thread gives stable ratios.
Last line: passes_per_record=... prefix_passes_per_feature=... prefix_tokens_per_feature=... prefix_tokens=...
reuse_records_s=... full_records_s=... prefix_speedup=... batched_records_s=... batch_speedup=... rows_per_record=...
cache_bytes_per_logprob_entry=... full_row_bytes_per_entry=... rerun_calls=... max_abs_diff=...

    .venv/bin/python bench/simulate.py [--quick] [--record-len 63] [--threads 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

EXPLANATIONS = [
    "the word Union and references to the United States as one nation",
    "years and other numbers written with digits",
    "words about war, armies and the military",
    "end-of-sentence punctuation",
    "verbs of asking and requesting, as in 'I ask the Congress'",
    "words about money, taxes and the budget",
]


def _records(tok: Any, n: int, length: int) -> list[list[str]]:
    from autointerp.corpus import tokenize_corpus
    from autointerp.subject.tokens import token_strings

    corpus = tokenize_corpus(
        "sotu", tok, tokenizer_name="smollm2", bos_token_id=0, ctx_len=length + 1, max_tokens=(n + 8) * (length + 1)
    )
    # position 0 of a context is its BOS slot: a record is the tokens after it
    return [token_strings(tok, corpus.tokens[i, 1:].tolist()) for i in range(n)]


def _old_entry_bytes(sim: Any, explanation: str, record: list[str], full: Any) -> int:
    """What the response cache stored for one simulation request before read_at: the reuse request as plain JSON
    and every row of the record's lines (the full mode's rows after the prefix), plus ~120 bytes of key and
    columns."""
    from autointerp.llm.types import LogprobsRequest
    from autointerp.score.simulate import DIGITS

    prefix = sim.prefix(explanation)
    req = LogprobsRequest(sim.body(record).text, DIGITS, sim.top_logprobs, prefix=prefix)
    keep = [i for i, o in enumerate(full.offsets) if o >= len(prefix)]
    res = {"tokens": [full.tokens[i] for i in keep], "offsets": [full.offsets[i] for i in keep],
           "logprobs": [full.logprobs[i] for i in keep], "prompt_tokens": len(keep)}  # fmt: skip
    return len(json.dumps(res)) + len(json.dumps(req.payload())) + 120


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 features x 10 records (about 90 s)")
    ap.add_argument("--features", type=int, default=3)
    ap.add_argument("--records", type=int, default=30, help="test records per feature (collect makes 60)")
    ap.add_argument("--record-len", type=int, default=63, help="tokens per record (ctx_len 64 minus BOS)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (see the module docstring)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    n_features, n_records = (2, 10) if args.quick else (args.features, args.records)

    from autointerp.llm.base import BackendSpec, make_backend
    from autointerp.llm.client import LLMClient
    from autointerp.llm.local import LocalBackend
    from autointerp.llm.types import LogprobsRequest
    from autointerp.score.simulate import LogprobSimulator
    from autointerp.store import open_store
    from autointerp.store.llm_log import SqlResponseCache

    class Full(LogprobSimulator):
        """No prefix reuse and every row: the simulator before slots and shared prefixes."""

        def request(self, prefix: str, body: Any) -> LogprobsRequest:
            return dataclasses.replace(super().request(prefix, body), read_at=())

    backend = make_backend(BackendSpec(backend="local", model="smollm2-135m-instruct"))
    assert isinstance(backend, LocalBackend)
    tok, lm = backend._model()
    records = _records(tok, n_records, args.record_len)
    passes = {"record": 0, "prefix": 0, "rows": 0, "prefix_tokens": 0}

    def count(module: Any, a: tuple[Any, ...], kw: dict[str, Any]) -> None:  # noqa: ARG001
        # a prefix pass is the only one that asks for the last position's logits alone
        ids = a[0] if a else kw["input_ids"]
        is_prefix = kw.get("logits_to_keep") == 1
        passes["prefix" if is_prefix else "record"] += 1
        passes["rows"] += 0 if is_prefix else int(ids.shape[0])
        passes["prefix_tokens"] += int(ids.shape[1]) if is_prefix else 0

    class Capture(LLMClient):
        """Keeps the results of its last call (the full mode's every row: what the cache used to store)."""

        def logprobs_many(self, reqs: Any) -> list[Any]:
            self.last = super().logprobs_many(reqs)
            return self.last

    hook = lm.register_forward_pre_hook(count, with_kwargs=True)
    client = LLMClient(backend)  # no response cache: every record is computed
    full_client = Capture(backend)
    sims = {"reuse": LogprobSimulator(client), "full": Full(full_client, reuse_prefix=False)}
    prefix_tokens = len(tok.encode(sims["reuse"].prefix(EXPLANATIONS[0])))
    body_tokens = sum(len(tok.encode(sims["reuse"].body(r).text)) for r in records) / len(records)
    print(
        f"{n_features} features x {n_records} records of {args.record_len} tokens; simulator prompt: "
        f"prefix {prefix_tokens} tokens, record lines {body_tokens:.0f} tokens on average"
    )

    sims["full"].simulate("warm-up", records[:1])  # model load and first-call allocations, outside the timings
    seconds = {"reuse": 0.0, "full": 0.0}
    count_by_mode = {m: dict.fromkeys(passes, 0) for m in sims}
    batched_seconds, batched_rows = 0.0, 0
    max_diff = 0.0
    tmp = Path(tempfile.mkdtemp(prefix="bench-simulate-"))
    store = open_store(f"sqlite:///{tmp / 'cache.sqlite'}")
    cached = LogprobSimulator(LLMClient(backend, cache=SqlResponseCache(store)))
    full_row_bytes: list[int] = []
    batches: list[tuple[str, list[Any]]] = []
    for f in range(n_features):
        explanation = EXPLANATIONS[f % len(EXPLANATIONS)] + ("" if f < len(EXPLANATIONS) else f" ({f})")
        fsec = {"reuse": 0.0, "full": 0.0}
        for i, record in enumerate(records):
            # record by record, modes alternating, so that load from other processes hits both alike; the reuse
            # mode's first record of a feature pays that feature's prefix pass
            out: dict[str, Any] = {}
            for mode in ("reuse", "full") if i % 2 == 0 else ("full", "reuse"):
                passes.update(dict.fromkeys(passes, 0))
                t0 = time.perf_counter()
                (out[mode],) = sims[mode].simulate(explanation, [record])
                fsec[mode] += time.perf_counter() - t0
                for k in passes:
                    count_by_mode[mode][k] += passes[k]
            a, b = out["reuse"], out["full"]
            if not (isinstance(a, list) and isinstance(b, list)):
                raise SystemExit(f"simulation failed: {a if not isinstance(a, list) else b}")
            max_diff = max(max_diff, max(abs(x - y) for x, y in zip(a, b, strict=True)))
            full_row_bytes.append(_old_entry_bytes(sims["reuse"], explanation, record, full_client.last[0]))
        for m in sims:
            seconds[m] += fsec[m]
        # the batched call pays its feature's prefix pass as well (from the other features' shared instructions)
        backend._prefixes.pop(sims["reuse"].prefix(explanation), None)
        passes.update(dict.fromkeys(passes, 0))
        t0 = time.perf_counter()
        batch = cached.simulate(explanation, records)
        bsec = time.perf_counter() - t0
        batched_seconds += bsec
        batched_rows += passes["rows"]
        batches.append((explanation, batch))
        for x, ref in zip(batch, (sims["reuse"].simulate(explanation, [r])[0] for r in records), strict=True):
            if not (isinstance(x, list) and isinstance(ref, list)):
                raise SystemExit(f"simulation failed: {x if not isinstance(x, list) else ref}")
            max_diff = max(max_diff, max(abs(p - q) for p, q in zip(x, ref, strict=True)))
        print(
            f"feature {f}: reuse {n_records / fsec['reuse']:.2f} records/s, full {n_records / fsec['full']:.2f}, "
            f"batched {n_records / bsec:.2f}"
        )
    hook.remove()
    rerun = LLMClient(backend, cache=SqlResponseCache(store))
    for explanation, batch in batches:
        if LogprobSimulator(rerun).simulate(explanation, records) != batch:
            raise SystemExit("a rerun from the response cache gave other predictions")
    con = sqlite3.connect(tmp / "cache.sqlite")
    (entry_bytes,) = con.execute(
        "SELECT avg(length(key) + length(backend) + length(model) + length(request) + length(response) "
        "+ length(created_at)) FROM llm_cache"
    ).fetchone()
    con.close()
    shutil.rmtree(tmp, ignore_errors=True)

    total = n_features * n_records
    rate = {m: total / seconds[m] for m in sims}
    per_record = max(count_by_mode[m]["record"] / total for m in sims)
    prefix_per_feature = count_by_mode["reuse"]["prefix"] / n_features
    prefix_tokens_per_feature = count_by_mode["reuse"]["prefix_tokens"] / n_features
    batched_rate = total / batched_seconds
    print(f"reuse: {rate['reuse']:.2f} records/s   full: {rate['full']:.2f} records/s   batched: {batched_rate:.2f}")
    print(
        f"passes_per_record={per_record:.3f} prefix_passes_per_feature={prefix_per_feature:.2f} "
        f"prefix_tokens_per_feature={prefix_tokens_per_feature:.0f} prefix_tokens={prefix_tokens} "
        f"reuse_records_s={rate['reuse']:.2f} full_records_s={rate['full']:.2f} "
        f"prefix_speedup={rate['reuse'] / rate['full']:.2f} batched_records_s={batched_rate:.2f} "
        f"batch_speedup={batched_rate / rate['reuse']:.2f} rows_per_record={batched_rows / total:.3f} "
        f"cache_bytes_per_logprob_entry={entry_bytes:.0f} "
        f"full_row_bytes_per_entry={sum(full_row_bytes) / len(full_row_bytes):.0f} rerun_calls={rerun.calls} "
        f"max_abs_diff={max_diff:.1e}"
    )


if __name__ == "__main__":
    main()
