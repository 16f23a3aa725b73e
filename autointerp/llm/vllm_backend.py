"""vLLM's offline engine (`vllm.LLM`), for GPU machines: `pip install autointerp[vllm]`. Imported only when used.

Chat requests go to `LLM.chat` in batches (vLLM schedules them itself); prompt log-probabilities use
`SamplingParams(prompt_logprobs=k)`, which returns the distribution at every prompt position.
"""

from __future__ import annotations

import asyncio
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
    keep_read,
    read_rows,
)


@lru_cache(maxsize=1)
def _engine(model: str, options: tuple[tuple[str, str], ...]) -> Any:
    try:
        import vllm
    except ImportError as exc:
        raise PermanentLLMError(
            "the vllm backend needs vLLM: pip install 'autointerp[vllm]' (GPU machines)", backend="vllm", model=model
        ) from exc
    kwargs: dict[str, Any] = {k: _typed(v) for k, v in options}
    return vllm.LLM(model=model, **kwargs)


def _typed(v: str) -> Any:
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(v.lower(), v)


@register
class VLLMBackend(Backend):
    kind = "vllm"

    def __init__(self, spec: BackendSpec) -> None:
        super().__init__(spec)
        self.max_batch = max(1, spec.batch_size)

    async def chat(self, req: ChatRequest) -> ChatResult:
        return only(await self.chat_batch([req]))

    async def chat_batch(self, reqs: Sequence[ChatRequest]) -> list[ChatResult | LLMError]:
        return await asyncio.to_thread(self._chat_sync, list(reqs))

    def _chat_sync(self, reqs: list[ChatRequest]) -> list[ChatResult | LLMError]:
        import vllm

        llm = _engine(self.model, self.spec.options)
        out: list[ChatResult | LLMError] = []
        for r in reqs:  # sampling settings differ per request; vLLM still batches inside one call per request
            params = vllm.SamplingParams(
                max_tokens=r.max_tokens, temperature=r.temperature, stop=list(r.stop) or None, seed=r.seed
            )
            (res,) = llm.chat([{"role": m.role, "content": m.content} for m in r.messages], params, use_tqdm=False)
            comp = res.outputs[0]
            out.append(
                ChatResult(
                    text=comp.text,
                    finish_reason=str(comp.finish_reason or "stop"),
                    prompt_tokens=len(res.prompt_token_ids or []),
                    completion_tokens=len(comp.token_ids),
                )
            )
        return out

    async def logprobs(self, req: LogprobsRequest) -> LogprobsResult:
        return await asyncio.to_thread(self._logprobs_sync, req)

    def _logprobs_sync(self, req: LogprobsRequest) -> LogprobsResult:
        import vllm

        llm = _engine(self.model, self.spec.options)
        tok = llm.get_tokenizer()
        params = vllm.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=max(1, req.top_logprobs))
        text = req.prefix + req.prompt  # vLLM's automatic prefix caching reuses the shared prefix
        (res,) = llm.generate([text], params, use_tqdm=False)
        ids = list(res.prompt_token_ids)
        enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
        offsets = [int(a) for a, _ in enc["offset_mapping"]]
        if len(offsets) != len(ids):  # the engine added a BOS: drop it from the prompt tokens
            ids = ids[len(ids) - len(offsets) :]
        # prompt_logprobs[i] scores token i given tokens < i; we report, per token, the next one's distribution.
        plp = list(res.prompt_logprobs or [])[-len(ids) :] + [res.outputs[0].logprobs[0]]
        keep = [pos for pos in range(len(ids)) if offsets[pos] >= len(req.prefix)]  # the result covers `prompt`
        # with read_at, only the rows before the read offsets are decoded (keep_read then keeps the candidates)
        wanted = set(read_rows([offsets[pos] for pos in keep], req.read_at)) if req.read_at else range(len(keep))
        rows: list[dict[str, float]] = []
        for k, pos in enumerate(keep):
            entry = (plp[pos + 1] or {}) if k in wanted else {}
            rows.append({tok.decode([tid]): float(v.logprob) for tid, v in entry.items()})
        res = LogprobsResult(
            tokens=tuple(tok.decode([ids[pos]]) for pos in keep),
            offsets=tuple(offsets[pos] for pos in keep),
            logprobs=tuple(rows),
            prompt_tokens=len(ids),
        )
        return keep_read(req, res)

    async def capabilities(self) -> Capabilities:
        await asyncio.to_thread(_engine, self.model, self.spec.options)
        return Capabilities(chat=True, prompt_logprobs=True, note="vLLM offline engine")
