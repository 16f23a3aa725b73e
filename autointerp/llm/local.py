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
from collections.abc import Sequence
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
    prefix_slots = 4

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
        extra = getattr(lm.generation_config, "eos_token_id", None)
        eos = {tok.eos_token_id} | set(extra if isinstance(extra, list) else [extra])
        results = []
        for r, row, mask in zip(reqs, new, enc["attention_mask"].tolist(), strict=True):
            ids = row[: r.max_tokens]
            finish = "length"
            for j, t in enumerate(ids):
                if t in eos:
                    ids, finish = ids[:j], "stop"
                    break
            text = tok.decode(ids, skip_special_tokens=True)
            for s in r.stop:
                if s in text:
                    text, finish = text[: text.index(s)], "stop"
            results.append(ChatResult(text, finish, int(sum(mask)), len(ids)))
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
        causal attention never lets a token see the padding that follows it. Rows are read up to their own length.
        """
        import torch

        from autointerp.subject.cache import with_cache

        with _LOCK, torch.inference_mode():
            pre_ids, cache = self._prefix(tok, lm, prefix) if prefix else ([], None)
            enc = [self._split(tok, r, prefix, pre_ids) for r, _ in reqs]
            rows = [k for k, (ids, _) in enumerate(enc) if ids]
            logits = None
            if rows:
                longest = max(len(enc[k][0]) for k in rows)
                pad = tok.pad_token_id if tok.pad_token_id is not None else 0
                x = torch.full((len(rows), longest), int(pad), dtype=torch.long)
                for row, k in enumerate(rows):
                    x[row, : len(enc[k][0])] = torch.tensor(enc[k][0])
                past = None
                if cache is not None:
                    # forward appends to a cache in place: each pass gets its own copy, widened to the batch
                    past = copy.deepcopy(cache)
                    if len(rows) > 1:
                        past.batch_repeat_interleave(len(rows))
                logits = lm(x.to(lm.device), **with_cache(lm, past), use_cache=past is not None).logits
            results = []
            row_of = {k: row for row, k in enumerate(rows)}
            for k, ((req, cands), (ids, offsets)) in enumerate(zip(reqs, enc, strict=True)):
                if k not in row_of or logits is None:
                    results.append(LogprobsResult((), (), (), 0))
                    continue
                logp = torch.log_softmax(logits[row_of[k], : len(ids)].float(), dim=-1)
                results.append(_result(tok, req, cands, ids, offsets, logp))
        return results

    def _prefix(self, tok: Any, lm: Any, prefix: str) -> tuple[list[int], Any]:
        """The prefix's token ids and key/value cache, computed once and kept (LRU). Called under _LOCK."""
        import torch

        from autointerp.subject.cache import output_cache

        cached = self._prefixes.get(prefix)
        if cached is None:
            pre_ids = list(tok(prefix, add_special_tokens=False)["input_ids"])
            x = torch.tensor([pre_ids], device=lm.device)
            # logits_to_keep=1: the prefix pass is for its key/value cache; its logits are never read.
            cached = (pre_ids, output_cache(lm(x, use_cache=True, logits_to_keep=1)))
            self._prefixes[prefix] = cached
            while len(self._prefixes) > self.prefix_slots:
                self._prefixes.popitem(last=False)
        self._prefixes.move_to_end(prefix)
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


def _result(
    tok: Any, req: LogprobsRequest, cands: dict[str, int], ids: list[int], offsets: list[int], logp: Any
) -> LogprobsResult:
    """One request's rows: every position's top-k alternatives, plus its candidates."""
    import torch

    from autointerp.subject.tokens import token_strings

    cand_ids = list(cands.values())
    cand_lp = logp[:, cand_ids].tolist() if cand_ids else [[] for _ in range(logp.shape[0])]
    top = torch.topk(logp, k=max(1, req.top_logprobs), dim=-1)
    top_strings = [token_strings(tok, row) for row in top.indices.tolist()]
    rows = []
    for pos in range(logp.shape[0]):
        d = dict(zip(top_strings[pos], top.values[pos].tolist(), strict=True))
        d.update(zip(cands, cand_lp[pos], strict=True))
        rows.append(d)
    return LogprobsResult(
        tokens=tuple(token_strings(tok, ids)),
        offsets=tuple(offsets),
        logprobs=tuple(rows),
        prompt_tokens=len(ids),
    )
