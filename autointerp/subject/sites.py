"""Named sites and hooks.

A site is a stable string `blocks.L.KIND`:
- `mlp.post`   the input of the MLP's output projection (gated MLPs: act(gate) * up; gpt2: gelu(c_fc)),
- `mlp.out`    what the MLP adds to the residual stream (Gemma 2/3: the output of post_feedforward_layernorm),
- `attn.out`   what attention adds to it (Gemma 2/3: the output of post_attention_layernorm),
- `resid.pre`  the hidden state entering block L, `resid.post` the hidden state block L returns,
- `resid.mid`, `mlp.in`, `attn.z`: see subject.names (the residual before the MLP's norm, the MLP's normalized
  input, the heads' concatenated outputs).
A Layout maps those to modules for one model family; families live in a registry, not an if/elif chain.
tests/unit/test_site_families.py proves that each site is the same tensor on every registered family.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any, ClassVar

import torch
from torch import nn

from autointerp.subject.names import FORWARD_ORDER, SITE_KINDS, SiteError, SiteRef, parse_site

__all__ = ["SITE_KINDS", "SiteError", "SiteRef", "parse_site"]

# How a hook attaches: forward output of a module, or the forward input (pre-hook) of a module.
OUTPUT = "output"
INPUT = "input"


class Layout(ABC):
    """Where each site lives in one model family (abstract: one subclass per family, see LAYOUTS)."""

    family: ClassVar[str] = ""

    @abstractmethod
    def blocks(self, model: Any) -> nn.ModuleList: ...

    @abstractmethod
    def mlp_down(self, block: Any) -> nn.Module:
        """The MLP's output projection; its input is `mlp.post`."""
        ...

    @abstractmethod
    def mlp(self, block: Any) -> nn.Module: ...

    @abstractmethod
    def attn(self, block: Any) -> nn.Module: ...

    @abstractmethod
    def final_norm(self, model: Any) -> nn.Module: ...

    @abstractmethod
    def mlp_norm(self, block: Any) -> nn.Module:
        """The norm in front of the MLP: its input is `resid.mid`, its output `mlp.in`."""
        ...

    @abstractmethod
    def attn_proj(self, block: Any) -> nn.Module:
        """The attention's output projection: its input is `attn.z`."""
        ...

    def parallel(self, model: Any) -> bool:  # noqa: ARG002 - families with a parallel attention/MLP override it
        """True where attention and MLP both read the block's input (no `resid.mid` exists)."""
        return False

    def mlp_out(self, block: Any) -> nn.Module:
        """The module whose output the block adds to the residual stream after the MLP (`mlp.out`)."""
        return self.mlp(block)

    def attn_out(self, block: Any) -> nn.Module:
        """The module whose output the block adds to the residual stream after attention (`attn.out`)."""
        return self.attn(block)

    def text_config(self, model: Any) -> Any:
        """The config with the language model's widths (a multimodal model keeps them in its text_config)."""
        cfg = model.config
        return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg

    def unembed(self, model: Any) -> nn.Module:
        return model.get_output_embeddings()

    def n_layers(self, model: Any) -> int:
        return len(self.blocks(model))

    def mlp_width(self, model: Any) -> int:
        cfg = self.text_config(model)
        return int(getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * cfg.hidden_size)

    def site_width(self, model: Any, site: SiteRef) -> int:
        if site.kind == "mlp.post":
            return self.mlp_width(model)
        cfg = self.text_config(model)
        if site.kind == "attn.z":
            heads = int(getattr(cfg, "num_attention_heads", None) or cfg.n_head)
            head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
            return heads * int(head_dim)
        return int(cfg.hidden_size)

    def locate(self, model: Any, site: SiteRef) -> tuple[nn.Module, str]:
        """(module, OUTPUT|INPUT): the tensor of `site` is that module's first output or first input."""
        blocks = self.blocks(model)
        if not 0 <= site.layer < len(blocks):
            raise SiteError(f"site {site.name}: layer {site.layer} out of range (model has {len(blocks)} blocks)")
        block = blocks[site.layer]
        if site.kind == "resid.mid" and self.parallel(model):
            raise SiteError(f"site {site.name}: a {self.family} model with a parallel attention/MLP has no resid.mid")
        table: dict[str, Callable[[], tuple[nn.Module, str]]] = {
            "resid.mid": lambda: (self.mlp_norm(block), INPUT),
            "mlp.in": lambda: (self.mlp(block), INPUT),
            "attn.z": lambda: (self.attn_proj(block), INPUT),
            "mlp.post": lambda: (self.mlp_down(block), INPUT),
            "mlp.out": lambda: (self.mlp_out(block), OUTPUT),
            "attn.out": lambda: (self.attn_out(block), OUTPUT),
            "resid.pre": lambda: (block, INPUT),
            "resid.post": lambda: (block, OUTPUT),
        }
        return table[site.kind]()


class LlamaLayout(Layout):
    family = "llama"

    def blocks(self, model: Any) -> nn.ModuleList:
        return model.model.layers

    def mlp_down(self, block: Any) -> nn.Module:
        return block.mlp.down_proj

    def mlp(self, block: Any) -> nn.Module:
        return block.mlp

    def attn(self, block: Any) -> nn.Module:
        return block.self_attn

    def final_norm(self, model: Any) -> nn.Module:
        return model.model.norm

    def mlp_norm(self, block: Any) -> nn.Module:
        return block.post_attention_layernorm  # llama's name for the norm in front of the MLP

    def attn_proj(self, block: Any) -> nn.Module:
        return block.self_attn.o_proj


class GemmaPostNormLayout(LlamaLayout):
    """Gemma 2 and Gemma 3: four norms per block. What the block adds to the residual stream is the output of
    `post_attention_layernorm` (attn.out) and `post_feedforward_layernorm` (mlp.out), not of `self_attn` / `mlp`;
    the MLP's own norm is `pre_feedforward_layernorm` (llama's `post_attention_layernorm` plays that part)."""

    family = "gemma2"

    def mlp_norm(self, block: Any) -> nn.Module:
        return block.pre_feedforward_layernorm

    def mlp_out(self, block: Any) -> nn.Module:
        return block.post_feedforward_layernorm

    def attn_out(self, block: Any) -> nn.Module:
        return block.post_attention_layernorm


class Gemma3Layout(GemmaPostNormLayout):
    """Gemma3ForCausalLM (model_type gemma3_text: 270m, 1b) keeps its blocks at `model.layers`."""

    family = "gemma3_text"


class Gemma3MultimodalLayout(GemmaPostNormLayout):
    """Gemma3ForConditionalGeneration (model_type gemma3: 4b and up): the text blocks sit at
    `model.language_model.layers`; the vision tower is not a subject."""

    family = "gemma3"

    def blocks(self, model: Any) -> nn.ModuleList:
        return model.model.language_model.layers

    def final_norm(self, model: Any) -> nn.Module:
        return model.model.language_model.norm


class GPT2Layout(Layout):
    family = "gpt2"

    def blocks(self, model: Any) -> nn.ModuleList:
        return model.transformer.h

    def mlp_down(self, block: Any) -> nn.Module:
        return block.mlp.c_proj

    def mlp(self, block: Any) -> nn.Module:
        return block.mlp

    def attn(self, block: Any) -> nn.Module:
        return block.attn

    def final_norm(self, model: Any) -> nn.Module:
        return model.transformer.ln_f

    def mlp_norm(self, block: Any) -> nn.Module:
        return block.ln_2

    def attn_proj(self, block: Any) -> nn.Module:
        return block.attn.c_proj


class GPTNeoXLayout(Layout):
    family = "gpt_neox"

    def blocks(self, model: Any) -> nn.ModuleList:
        return model.gpt_neox.layers

    def mlp_down(self, block: Any) -> nn.Module:
        return block.mlp.dense_4h_to_h

    def mlp(self, block: Any) -> nn.Module:
        return block.mlp

    def attn(self, block: Any) -> nn.Module:
        return block.attention

    def final_norm(self, model: Any) -> nn.Module:
        return model.gpt_neox.final_layer_norm

    def mlp_norm(self, block: Any) -> nn.Module:
        return block.post_attention_layernorm

    def attn_proj(self, block: Any) -> nn.Module:
        return block.attention.dense

    def parallel(self, model: Any) -> bool:
        return bool(getattr(model.config, "use_parallel_residual", True))


# model_type (from the HF config) -> adapter. Llama-like families (one norm in front of attention and one in front
# of the MLP, nothing after them) share the llama layout; Gemma 1 is llama-like, Gemma 2 and 3 are not.
LAYOUTS: dict[str, type[Layout]] = {
    "llama": LlamaLayout,
    "mistral": LlamaLayout,
    "qwen2": LlamaLayout,
    "qwen3": LlamaLayout,
    "gemma": LlamaLayout,
    "gemma2": GemmaPostNormLayout,
    "gemma3_text": Gemma3Layout,
    "gemma3": Gemma3MultimodalLayout,
    "olmo": LlamaLayout,
    "gpt2": GPT2Layout,
    "gpt_neox": GPTNeoXLayout,
}


def layout_for(model: nn.Module) -> Layout:
    model_type = getattr(model.config, "model_type", "")
    if model_type not in LAYOUTS:
        raise SiteError(f"unsupported model family {model_type!r}; supported: {', '.join(sorted(LAYOUTS))}")
    return LAYOUTS[model_type]()


def _first(x: Any) -> torch.Tensor:
    return x[0] if isinstance(x, tuple) else x


HookFn = Callable[[torch.Tensor], torch.Tensor | None]


@contextmanager
def hooks(model: nn.Module, layout: Layout, fns: dict[str, HookFn]) -> Iterator[None]:
    """Attach `fn(tensor) -> tensor | None` at each site for the duration of the block; always removed.

    A returned tensor replaces the site's value (for interventions); None leaves it unchanged.
    """
    handles = []
    try:
        for name, fn in fns.items():
            ref = parse_site(name)
            module, where = layout.locate(model, ref)
            if ref.kind == "resid.mid":
                handles.extend(_resid_mid_hooks(layout.blocks(model)[ref.layer], module, fn))
            elif where == OUTPUT:

                def out_hook(_m: nn.Module, _inp: Any, out: Any, fn: HookFn = fn) -> Any:
                    new = fn(_first(out))
                    if new is None:
                        return None
                    return (new, *out[1:]) if isinstance(out, tuple) else new

                handles.append(module.register_forward_hook(out_hook))
            else:

                def in_hook(_m: nn.Module, args: Any, fn: HookFn = fn) -> Any:
                    new = fn(args[0])
                    return None if new is None else (new, *args[1:])

                handles.append(module.register_forward_pre_hook(in_hook))
        yield
    finally:
        for h in handles:
            h.remove()


def _resid_mid_hooks(block: nn.Module, mlp_norm: nn.Module, fn: HookFn) -> list[Any]:
    """resid.mid is read as the input of the MLP's norm, but the block also keeps that tensor as the residual it adds
    the MLP's output to. A replaced value must reach both (as TransformerLens' hook_resid_mid does), so what the
    replacement adds is added to the block's output too: resid.post = (resid.mid + d) + mlp.out."""
    delta: list[torch.Tensor] = []

    def pre(_m: nn.Module, args: Any) -> Any:
        delta.clear()  # a pass stopped inside the block (capture's early stop) leaves nothing for the next one
        new = fn(args[0])
        if new is None:
            return None
        delta.append(new - args[0])
        return (new, *args[1:])

    def post(_m: nn.Module, _inp: Any, out: Any) -> Any:
        if not delta:
            return None
        d = delta.pop()
        return (_first(out) + d, *out[1:]) if isinstance(out, tuple) else out + d

    return [mlp_norm.register_forward_pre_hook(pre), block.register_forward_hook(post)]


class _StopForward(Exception):
    """Raised inside a hook once every requested site is captured: the rest of the model is not run."""


def base_model(model: nn.Module) -> nn.Module:
    """The transformer without its LM head (the head is never needed to read a site)."""
    return getattr(model, getattr(model, "base_model_prefix", ""), model)


def capture(
    model: nn.Module,
    layout: Layout,
    sites: list[str],
    input_ids: torch.Tensor,
    *,
    stop_early: bool = True,
) -> dict[str, torch.Tensor]:
    """Run the model on `input_ids` and return each site's tensor [batch, seq, width].

    With stop_early the forward pass stops right after the deepest requested site is computed.
    """
    refs = {s: parse_site(s) for s in sites}
    out: dict[str, torch.Tensor] = {}
    last = max(refs, key=lambda s: (refs[s].layer, FORWARD_ORDER[refs[s].kind]))

    def make(name: str) -> HookFn:
        def fn(t: torch.Tensor) -> None:
            out[name] = t.detach()
            if stop_early and name == last and len(out) == len(refs):
                raise _StopForward

        return fn

    with hooks(model, layout, {s: make(s) for s in sites}), torch.inference_mode(), suppress(_StopForward):
        base_model(model)(input_ids=input_ids, use_cache=False)
    missing = set(refs) - set(out)
    if missing:
        raise SiteError(f"sites {sorted(missing)} were not reached by the forward pass")
    return out
