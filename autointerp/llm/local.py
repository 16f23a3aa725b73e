"""A Hugging Face causal LM run in-process with transformers (CPU or GPU): the default explainer and simulator.

Chat requests are batched (left padding, one `generate` per group of requests that share generation settings);
prompt log-probabilities come from one forward pass over the prompt. A request's shared `prefix` is encoded once
and its key/value cache kept (a small LRU per backend), so each request runs the model over its own tokens only.
The model is loaded once per process.
"""

from __future__ import annotations

import asyncio
import copy
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

from autointerp.llm.base import Backend, BackendSpec, only, register
from autointerp.llm.types import (
    Capabilities,
    ChatRequest,
    ChatResult,
    LLMError,
    LogprobsRequest,
    LogprobsResult,
    PermanentLLMError,
    UnsupportedError,
    read_rows,
)

# One model per process serves every client; torch ops on it are serialized by this lock.
_LOCK = threading.Lock()
# Batched requests run in several threads: the first ones would load the model concurrently, and transformers'
# loading (lazy imports, meta-device initialization) is not thread-safe. One load at a time.
_LOAD_LOCK = threading.Lock()


@lru_cache(maxsize=2)
def _load(model: str, device: str) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from autointerp.subject.files import ModelLoadError, materialize, resolve
    from autointerp.subject.model import pick_device

    try:
        directory = materialize(resolve(model))
        tok = AutoTokenizer.from_pretrained(directory)
        lm = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    except (ModelLoadError, OSError, ValueError) as exc:
        raise PermanentLLMError(f"local LLM {model!r} cannot be loaded: {exc}", backend="local", model=model) from exc
    lm.to(pick_device(device))  # type: ignore[arg-type]
    lm.eval()
    lm.requires_grad_(False)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # generation continues from the right edge of every row
    return tok, lm


@register
class LocalBackend(Backend):
    kind = "local"

    # Shared prompt prefixes whose key/value cache is kept (each holds layers x prefix tokens x KV width floats).
    prefix_slots = 8
    # Fewest tokens a new prefix must share with a kept one for its cache to be copied rather than recomputed.
    min_shared = 16
    shared_chat = True  # greedy chat requests over their shared prefix's cache (llm/decode.py)

    def __init__(self, spec: BackendSpec) -> None:
        super().__init__(spec)
        self.max_batch = max(1, spec.batch_size)
        self._prefixes: OrderedDict[str, tuple[list[int], Any]] = OrderedDict()

    def _model(self) -> tuple[Any, Any]:
        with _LOAD_LOCK:
            return _load(self.model, self.spec.device)

    async def chat(self, req: ChatRequest) -> ChatResult:
        return only(await self.chat_batch([req]))

    async def chat_batch(self, reqs: Sequence[ChatRequest]) -> list[ChatResult | LLMError]:
        return await asyncio.to_thread(self._chat_sync, list(reqs))

    def _chat_sync(self, reqs: list[ChatRequest]) -> list[ChatResult | LLMError]:
        out: list[ChatResult | LLMError] = [PermanentLLMError("not run")] * len(reqs)
        groups: dict[tuple[float, int], list[int]] = {}
        for i, r in enumerate(reqs):
            groups.setdefault((r.temperature, r.seed), []).append(i)
        for (temperature, seed), idx in groups.items():
            for i, res in zip(idx, self._generate([reqs[i] for i in idx], temperature, seed), strict=True):
                out[i] = res
        return out

    def _generate(self, reqs: list[ChatRequest], temperature: float, seed: int) -> list[ChatResult]:
        import torch

        tok, lm = self._model()
        texts = [
            tok.apply_chat_template(
                [{"role": m.role, "content": m.content} for m in r.messages], tokenize=False, add_generation_prompt=True
            )
            for r in reqs
        ]
        extra = getattr(lm.generation_config, "eos_token_id", None)
        eos = {tok.eos_token_id} | set(extra if isinstance(extra, list) else [extra])
        if temperature <= 0 and self.shared_chat:
            rows = [list(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
            n = min(min(_common(rows[0], r) for r in rows), min(len(r) for r in rows) - 1)
            if n >= self.min_shared:
                return self._generate_shared(tok, lm, reqs, rows, n, eos)
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(lm.device)
        max_new = max(r.max_tokens for r in reqs)
        with _LOCK, torch.inference_mode():
            torch.manual_seed(seed)
            gen = lm.generate(
                **enc,
                max_new_tokens=max_new,
                do_sample=temperature > 0,
                temperature=temperature if temperature > 0 else None,
                top_p=None,
                top_k=None,
                pad_token_id=tok.pad_token_id,
            )
        new = gen[:, enc["input_ids"].shape[1] :].tolist()
        results = []
        for r, row, mask in zip(reqs, new, enc["attention_mask"].tolist(), strict=True):
            ids = row[: r.max_tokens]
            finish = "length"
            for j, t in enumerate(ids):
                if t in eos:
                    ids, finish = ids[:j], "stop"
                    break
            results.append(_chat_result(tok, r, ids, finish, int(sum(mask))))
        return results

    def _generate_shared(self, tok: Any, lm: Any, reqs: list[ChatRequest], rows: list[list[int]], n: int,
                         eos: set[int]) -> list[ChatResult]:  # fmt: skip
        """Greedy generation over the cache of the rows' shared first `n` tokens (see llm/decode.py)."""
        import torch

        from autointerp.llm.decode import greedy

        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        with _LOCK, torch.inference_mode():
            _ids, cache = self._prefix_ids(lm, ("chat", tuple(rows[0][:n])), rows[0][:n])
            out = greedy(lm, cache, n, [r[n:] for r in rows], [r.max_tokens for r in reqs], eos, int(pad))
        results = []
        for r, ids, row in zip(reqs, out, rows, strict=True):
            finish = "length" if len(ids) >= r.max_tokens else "stop"
            results.append(_chat_result(tok, r, ids, finish, len(row)))
        return results

    async def logprobs(self, req: LogprobsRequest) -> LogprobsResult:
        return only(await self.logprobs_batch([req]))

    async def logprobs_batch(self, reqs: Sequence[LogprobsRequest]) -> list[LogprobsResult | LLMError]:
        return await asyncio.to_thread(self._logprobs_sync, list(reqs))

    def _candidate_ids(self, tok: Any, candidates: Sequence[str]) -> dict[str, int]:
        ids: dict[str, int] = {}
        for c in candidates:
            enc = tok.encode(c, add_special_tokens=False)
            if len(enc) != 1:
                raise UnsupportedError(
                    f"candidate {c!r} is {len(enc)} tokens for {self.model}; candidates must be single tokens",
                    backend=self.kind,
                    model=self.model,
                )
            ids[c] = enc[0]
        return ids

    def _logprobs_sync(self, reqs: list[LogprobsRequest]) -> list[LogprobsResult | LLMError]:
        """Requests that share a prefix run as the rows of one forward pass (each request is one row, read once)."""
        tok, lm = self._model()
        out: list[LogprobsResult | LLMError] = [PermanentLLMError("not run")] * len(reqs)
        groups: dict[str, list[int]] = {}
        cands: dict[int, dict[str, int]] = {}
        for i, r in enumerate(reqs):
            try:
                cands[i] = self._candidate_ids(tok, r.candidates)
            except UnsupportedError as exc:
                out[i] = exc
                continue
            groups.setdefault(r.prefix, []).append(i)
        for prefix, idx in groups.items():
            group = [(reqs[i], cands[i]) for i in idx]
            for i, res in zip(idx, self._logprobs_group(tok, lm, prefix, group), strict=True):
                out[i] = res
        return out

    def _logprobs_group(
        self, tok: Any, lm: Any, prefix: str, reqs: list[tuple[LogprobsRequest, dict[str, int]]]
    ) -> list[LogprobsResult]:
        """One forward pass over the requests' tokens, right-padded after the shared prefix's cache.

        Right padding needs no attention mask: every row starts at the same position (right after the prefix) and
        causal attention never lets a token see the padding that follows it. Each row runs up to the last row its
        request reads (all of them without read_at), and the LM head runs at the rows read only.
        """
        import torch

        from autointerp.subject.cache import with_cache

        with _LOCK, torch.inference_mode():
            pre_ids, cache = self._prefix(tok, lm, prefix) if prefix else ([], None)
            enc = [self._split(tok, r, prefix, pre_ids) for r, _ in reqs]
            reads = [
                read_rows(offsets, r.read_at) if r.read_at else list(range(len(ids)))
                for (r, _), (ids, offsets) in zip(reqs, enc, strict=True)
            ]
            run = [k for k, rows in enumerate(reads) if rows]
            logp: dict[int, Any] = {}
            if run:
                longest = max(reads[k][-1] + 1 for k in run)
                pad = tok.pad_token_id if tok.pad_token_id is not None else 0
                x = torch.full((len(run), longest), int(pad), dtype=torch.long)
                for row, k in enumerate(run):
                    n = reads[k][-1] + 1  # tokens after the last row read change nothing read: not run
                    x[row, :n] = torch.tensor(enc[k][0][:n])
                past = None
                if cache is not None:
                    # forward appends to a cache in place: each pass gets its own copy, widened to the batch
                    past = copy.deepcopy(cache)
                    if len(run) > 1:
                        past.batch_repeat_interleave(len(run))
                picks = [(row, pos) for row, k in enumerate(run) for pos in reads[k]]
                with _head_at(lm, picks) as picked:
                    out = lm(x.to(lm.device), **with_cache(lm, past), use_cache=past is not None)
                logits = picked(out.logits)
                rows = torch.log_softmax(logits.float(), dim=-1).split([len(reads[k]) for k in run])
                logp = dict(zip(run, rows, strict=True))
            results = []
            for k, ((req, cands), (ids, offsets)) in enumerate(zip(reqs, enc, strict=True)):
                if not ids:
                    results.append(LogprobsResult((), (), (), 0))
                    continue
                results.append(_result(tok, req, cands, ids, offsets, reads[k], logp.get(k)))
        return results

    def _prefix(self, tok: Any, lm: Any, prefix: str) -> tuple[list[int], Any]:
        """The prefix's token ids and key/value cache, computed once and kept (LRU). Called under _LOCK."""
        cached = self._prefixes.get(prefix)
        if cached is None:
            return self._prefix_ids(lm, prefix, list(tok(prefix, add_special_tokens=False)["input_ids"]))
        self._prefixes.move_to_end(prefix)
        return cached

    def _prefix_ids(self, lm: Any, key: Any, pre_ids: list[int]) -> tuple[list[int], Any]:
        """The key/value cache of `pre_ids`, kept under `key` (LRU). Called under _LOCK.

        A new prefix that starts with the same tokens as a kept one (the instructions and shots are the same for
        every feature, only the explanation or the texts at the end differ) runs over a copy of that one's cache,
        cut to the tokens they share: a feature's prefix pass reads its own part only.
        """
        import torch

        from autointerp.subject.cache import cache_length, output_cache, with_cache

        cached = self._prefixes.get(key)
        if cached is None:
            shared, past = 0, None
            for ids, kept in self._prefixes.values():
                n = _common(ids, pre_ids)
                if n > shared and getattr(kept, "is_croppable", True) and hasattr(kept, "crop"):
                    shared, past = n, kept
            shared = min(shared, len(pre_ids) - 1)  # at least one token runs: the pass needs an input
            if shared < self.min_shared:
                shared, past = 0, None
            if past is not None:
                past = copy.deepcopy(past)
                drop = cache_length(past) - shared
                if drop > 0:
                    past.crop(-drop)  # a negative length drops that many tokens on every release from 5.0
            x = torch.tensor([pre_ids[shared:]], device=lm.device)
            # logits_to_keep=1: the prefix pass is for its key/value cache; its logits are never read.
            out = lm(x, **with_cache(lm, past), use_cache=True, logits_to_keep=1)
            cached = (pre_ids, output_cache(out))
            self._prefixes[key] = cached
            while len(self._prefixes) > self.prefix_slots:
                self._prefixes.popitem(last=False)
        self._prefixes.move_to_end(key)
        return cached

    @staticmethod
    def _split(tok: Any, req: LogprobsRequest, prefix: str, pre_ids: list[int]) -> tuple[list[int], list[int]]:
        """The prompt's token ids and offsets (counted from the prefix's start).

        The prompt keeps the joint tokenization of prefix + prompt whenever that splits at the boundary (a prefix
        ending in a newline nearly always does); otherwise it is tokenized on its own, which changes at most the
        whitespace tokens at the boundary.
        """
        if not prefix:
            enc = tok(req.prompt, return_offsets_mapping=True, add_special_tokens=False)
            return list(enc["input_ids"]), [int(a) for a, _ in enc["offset_mapping"]]
        n, shift = len(pre_ids), len(prefix)
        enc = tok(prefix + req.prompt, return_offsets_mapping=True, add_special_tokens=False)
        ids, offsets = list(enc["input_ids"]), [int(a) for a, _ in enc["offset_mapping"]]
        if ids[:n] == pre_ids and (len(ids) == n or offsets[n] >= shift):
            return ids[n:], offsets[n:]
        enc = tok(req.prompt, return_offsets_mapping=True, add_special_tokens=False)
        return list(enc["input_ids"]), [int(a) + shift for a, _ in enc["offset_mapping"]]

    async def capabilities(self) -> Capabilities:
        await asyncio.to_thread(self._model)
        return Capabilities(chat=True, prompt_logprobs=True, note="in-process transformers")


def _chat_result(tok: Any, req: ChatRequest, ids: list[int], finish: str, n_prompt: int) -> ChatResult:
    text = tok.decode(ids, skip_special_tokens=True)
    for s in req.stop:
        if s in text:
            text, finish = text[: text.index(s)], "stop"
    return ChatResult(text, finish, n_prompt, len(ids))


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token id lists."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


@contextmanager
def _head_at(lm: Any, picks: list[tuple[int, int]]) -> Iterator[Callable[[Any], Any]]:
    """Run the LM head at the picked (row, position) pairs only, inside this block; yields the function that turns
    the forward's logits into one row per pick, in order.

    A forward pre-hook on the output embedding hands it the picked hidden states as one row of len(picks)
    positions, so the model's own code after the head (softcapping, scaling) still applies. The full-vocabulary
    head is a fifth of a small model's FLOPs per token, and the simulator reads one position of the four or so
    its record's line takes.
    """
    import torch

    rows = torch.tensor([r for r, _ in picks], dtype=torch.long)
    pos = torch.tensor([p for _, p in picks], dtype=torch.long)
    seen: list[bool] = []

    def gather(module: Any, args: tuple[Any, ...]) -> tuple[Any, ...] | None:  # noqa: ARG001
        h = args[0]
        if seen or h.dim() != 3:  # not the one call over every position this code expects: leave it alone
            return None
        seen.append(True)
        return (h[rows.to(h.device), pos.to(h.device)].unsqueeze(0), *args[1:])

    def picked(logits: Any) -> Any:
        if seen:
            return logits[0]
        return logits[rows.to(logits.device), pos.to(logits.device)]  # the hook did not run: read the full logits

    handle = lm.get_output_embeddings().register_forward_pre_hook(gather)
    try:
        yield picked
    finally:
        handle.remove()


def _result(
    tok: Any,
    req: LogprobsRequest,
    cands: dict[str, int],
    ids: list[int],
    offsets: list[int],
    rows: list[int],
    logp: Any,
) -> LogprobsResult:
    """One request's result: its computed rows (log-probabilities in `logp`, one line per row) hold the top-k
    alternatives plus the candidates, or with read_at and candidates the candidates only; other rows are empty."""
    import torch

    from autointerp.subject.tokens import token_strings

    out: list[dict[str, float]] = [{} for _ in ids]
    if rows:
        cand_ids = list(cands.values())
        cand_lp = logp[:, cand_ids].tolist() if cand_ids else [[] for _ in rows]
        if req.read_at and cand_ids:
            for i, values in zip(rows, cand_lp, strict=True):
                out[i] = dict(zip(cands, values, strict=True))
        else:
            top = torch.topk(logp, k=max(1, req.top_logprobs), dim=-1)
            top_strings = [token_strings(tok, row) for row in top.indices.tolist()]
            for n, i in enumerate(rows):
                d = dict(zip(top_strings[n], top.values[n].tolist(), strict=True))
                d.update(zip(cands, cand_lp[n], strict=True))
                out[i] = d
    return LogprobsResult(
        tokens=tuple(token_strings(tok, ids)),
        offsets=tuple(offsets),
        logprobs=tuple(out),
        prompt_tokens=len(ids),
    )
