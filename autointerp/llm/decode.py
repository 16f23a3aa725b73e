"""Greedy generation of a batch of chat requests over one shared prefix's key/value cache (the local backend).

Explainer, detection, fuzzing and judge prompts of one batch share their instructions and examples: the prefix is
run once (and kept, see LocalBackend._prefix_ids) and each request runs its own tokens only. Rows are padded in
the middle, between the prefix and their own tokens, so that every row's last token sits at the same column; the
attention mask hides the padding and explicit position ids keep each row's positions those of its unpadded prompt.
A row's tokens thus see what they would see alone, and greedy decoding picks the same tokens (up to float
rounding, which can only matter at an exact tie).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any


def greedy(lm: Any, prefix_cache: Any, n_prefix: int, suffixes: Sequence[Sequence[int]], max_new: Sequence[int],
           eos: set[int], pad: int) -> list[list[int]]:  # fmt: skip
    """Each row's generated token ids (its end-of-sequence token excluded), at most max_new[i] of them."""
    import torch

    from autointerp.subject.cache import output_cache, with_cache

    b = len(suffixes)
    longest = max(len(s) for s in suffixes)
    device = lm.device
    x = torch.full((b, longest), pad, dtype=torch.long)
    mask = torch.ones((b, n_prefix + longest), dtype=torch.long)
    pos = torch.zeros((b, longest), dtype=torch.long)
    for i, s in enumerate(suffixes):
        gap = longest - len(s)
        x[i, gap:] = torch.tensor(list(s), dtype=torch.long)
        mask[i, n_prefix : n_prefix + gap] = 0
        pos[i, gap:] = torch.arange(n_prefix, n_prefix + len(s))
        pos[i, :gap] = n_prefix  # padding: masked, any position will do
    past = copy.deepcopy(prefix_cache)  # forward appends to a cache in place
    if b > 1:
        past.batch_repeat_interleave(b)
    nxt_pos = torch.tensor([n_prefix + len(s) for s in suffixes], dtype=torch.long)
    out = lm(x.to(device), attention_mask=mask.to(device), position_ids=pos.to(device), **with_cache(lm, past),
             use_cache=True, logits_to_keep=1)  # fmt: skip
    generated: list[list[int]] = [[] for _ in range(b)]
    done = [m <= 0 for m in max_new]
    for _step in range(max(max_new, default=0)):
        picks = out.logits[:, -1, :].argmax(dim=-1).tolist()
        for i, t in enumerate(picks):
            if done[i]:
                continue
            if t in eos:
                done[i] = True
                continue
            generated[i].append(int(t))
            done[i] = len(generated[i]) >= max_new[i]
        if all(done):
            break
        step = torch.tensor([[t if t not in eos else pad] for t in picks], dtype=torch.long)
        mask = torch.cat([mask, torch.ones((b, 1), dtype=torch.long)], dim=1)
        out = lm(step.to(device), attention_mask=mask.to(device), position_ids=nxt_pos[:, None].to(device),
                 **with_cache(lm, output_cache(out)), use_cache=True, logits_to_keep=1)  # fmt: skip
        nxt_pos = nxt_pos + 1
    return generated
