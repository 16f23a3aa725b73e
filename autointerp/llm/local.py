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

from autointerp.llm.base import Backend, BackendSpec, register
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

    from autointerp.subject.model import ModelLoadError, materialize, pick_device, resolve

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
        (res,) = await self.chat_batch([req])
        if isinstance(res, LLMError):
            raise res
        return res

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
        return await asyncio.to_thread(self._logprobs_sync, req)

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

    def _logprobs_sync(self, req: LogprobsRequest) -> LogprobsResult:
        import torch

        from autointerp.subject.tokens import token_strings

        tok, lm = self._model()
        cands = self._candidate_ids(tok, req.candidates)
        with _LOCK, torch.inference_mode():
            if req.prefix:
                ids, offsets, past = self._after_prefix(tok, lm, req)
            else:
                enc = tok(req.prompt, return_offsets_mapping=True, add_special_tokens=False)
                ids, offsets, past = list(enc["input_ids"]), [int(a) for a, _ in enc["offset_mapping"]], None
            if not ids:
                return LogprobsResult((), (), (), 0)
            x = torch.tensor([ids], device=lm.device)
            # use_cache only with a prefix: the cache is then a private copy, grown by this pass and dropped.
            logits = lm(x, past_key_values=past, use_cache=past is not None).logits[0]
            logp = torch.log_softmax(logits.float(), dim=-1)
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

    def _after_prefix(self, tok: Any, lm: Any, req: LogprobsRequest) -> tuple[list[int], list[int], Any]:
        """The prompt's token ids and offsets (from the prefix's start) and a private copy of the prefix's cache.

        Called under _LOCK. The prompt keeps the joint tokenization of prefix + prompt whenever that splits at the
        boundary (a prefix ending in a newline nearly always does); otherwise it is tokenized on its own, which
        changes at most the whitespace tokens at the boundary.
        """
        import torch

        cached = self._prefixes.get(req.prefix)
        if cached is None:
            pre_ids = list(tok(req.prefix, add_special_tokens=False)["input_ids"])
            x = torch.tensor([pre_ids], device=lm.device)
            # logits_to_keep=1: the prefix pass is for its key/value cache; its logits are never read.
            cached = (pre_ids, lm(x, use_cache=True, logits_to_keep=1).past_key_values)
            self._prefixes[req.prefix] = cached
            while len(self._prefixes) > self.prefix_slots:
                self._prefixes.popitem(last=False)
        self._prefixes.move_to_end(req.prefix)
        pre_ids, cache = cached
        n, shift = len(pre_ids), len(req.prefix)
        enc = tok(req.prefix + req.prompt, return_offsets_mapping=True, add_special_tokens=False)
        ids, offsets = list(enc["input_ids"]), [int(a) for a, _ in enc["offset_mapping"]]
        if ids[:n] == pre_ids and (len(ids) == n or offsets[n] >= shift):
            ids, offsets = ids[n:], offsets[n:]
        else:
            enc = tok(req.prompt, return_offsets_mapping=True, add_special_tokens=False)
            ids, offsets = list(enc["input_ids"]), [int(a) + shift for a, _ in enc["offset_mapping"]]
        # forward appends to a cache in place: each request gets its own deep copy, so nothing of one record
        # leaks into the next whatever the cache class (crop semantics differ across transformers versions).
        return ids, offsets, copy.deepcopy(cache)

    async def capabilities(self) -> Capabilities:
        await asyncio.to_thread(self._model)
        return Capabilities(chat=True, prompt_logprobs=True, note="in-process transformers")
