"""Every site means the same tensor on every model family (tiny random-init models built from configs here, no
download): `sites.capture` equals a forward hook on the Hugging Face module that this file names for the family
(written out here, not read from the Layout), the algebra between sites holds (resid.mid = resid.pre + attn.out,
mlp.out = down_proj(mlp.post), Gemma's mlp.out = post_feedforward_layernorm(mlp(mlp.in)), ...), every Hugging Face
module path that subject.hf_paths accepts is the tensor of the site it maps to, and replacing a site's tensor
through `sites.hooks` changes exactly that tensor."""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from autointerp.subject.hf_paths import HF_TABLES, hf_path_to_site
from autointerp.subject.names import FORWARD_ORDER, SITE_KINDS, SiteError, parse_site
from autointerp.subject.sites import LAYOUTS, capture, hooks, layout_for

N_LAYERS, D, FF, HEADS, HEAD_DIM, VOCAB = 2, 16, 32, 4, 8, 64

Spec = dict[str, tuple[str, str]]  # site kind -> (module path inside the block, "input" | "output")

LLAMA: Spec = {
    "resid.pre": ("", "input"),
    "attn.z": ("self_attn.o_proj", "input"),
    "attn.out": ("self_attn", "output"),
    "resid.mid": ("post_attention_layernorm", "input"),
    "mlp.in": ("post_attention_layernorm", "output"),
    "mlp.post": ("mlp.down_proj", "input"),
    "mlp.out": ("mlp", "output"),
    "resid.post": ("", "output"),
}
GEMMA: Spec = LLAMA | {
    "attn.out": ("post_attention_layernorm", "output"),
    "resid.mid": ("pre_feedforward_layernorm", "input"),
    "mlp.in": ("pre_feedforward_layernorm", "output"),
    "mlp.out": ("post_feedforward_layernorm", "output"),
}
GPT2: Spec = {
    "resid.pre": ("", "input"),
    "attn.z": ("attn.c_proj", "input"),
    "attn.out": ("attn", "output"),
    "resid.mid": ("ln_2", "input"),
    "mlp.in": ("ln_2", "output"),
    "mlp.post": ("mlp.c_proj", "input"),
    "mlp.out": ("mlp", "output"),
    "resid.post": ("", "output"),
}
NEOX: Spec = {
    "resid.pre": ("", "input"),
    "attn.z": ("attention.dense", "input"),
    "attn.out": ("attention", "output"),
    "resid.mid": ("post_attention_layernorm", "input"),
    "mlp.in": ("post_attention_layernorm", "output"),
    "mlp.post": ("mlp.dense_4h_to_h", "input"),
    "mlp.out": ("mlp", "output"),
    "resid.post": ("", "output"),
}

Got = dict[str, torch.Tensor]
Identities = Callable[[Any, Got], dict[str, tuple[torch.Tensor, torch.Tensor]]]


def _gated(block: Any, g: Got) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    mlp = block.mlp
    x = g["mlp.in"]
    return {"mlp.post = act(gate(mlp.in)) * up(mlp.in)": (g["mlp.post"], mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))}


def _llama_identities(block: Any, g: Got) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return _gated(block, g) | {
        "mlp.in = post_attention_layernorm(resid.mid)": (g["mlp.in"], block.post_attention_layernorm(g["resid.mid"])),
        "mlp.out = down_proj(mlp.post)": (g["mlp.out"], block.mlp.down_proj(g["mlp.post"])),
        "attn.out = o_proj(attn.z)": (g["attn.out"], block.self_attn.o_proj(g["attn.z"])),
    }


def _gemma_identities(block: Any, g: Got) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    post_ff, post_attn = block.post_feedforward_layernorm, block.post_attention_layernorm
    return _gated(block, g) | {
        "mlp.in = pre_feedforward_layernorm(resid.mid)": (g["mlp.in"], block.pre_feedforward_layernorm(g["resid.mid"])),
        "mlp.out = post_feedforward_layernorm(mlp(mlp.in))": (g["mlp.out"], post_ff(block.mlp(g["mlp.in"]))),
        "mlp.out = post_feedforward_layernorm(down_proj(mlp.post))": (
            g["mlp.out"],
            post_ff(block.mlp.down_proj(g["mlp.post"])),
        ),
        "attn.out = post_attention_layernorm(o_proj(attn.z))": (
            g["attn.out"],
            post_attn(block.self_attn.o_proj(g["attn.z"])),
        ),
    }


def _gpt2_identities(block: Any, g: Got) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {
        "mlp.in = ln_2(resid.mid)": (g["mlp.in"], block.ln_2(g["resid.mid"])),
        "mlp.post = act(c_fc(mlp.in))": (g["mlp.post"], block.mlp.act(block.mlp.c_fc(g["mlp.in"]))),
        "mlp.out = c_proj(mlp.post)": (g["mlp.out"], block.mlp.c_proj(g["mlp.post"])),
        "attn.out = c_proj(attn.z)": (g["attn.out"], block.attn.c_proj(g["attn.z"])),
    }


def _neox_identities(block: Any, g: Got) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    mlp_input = g["resid.pre"] if block.use_parallel_residual else g["resid.mid"]
    return {
        "mlp.in = post_attention_layernorm(MLP's residual input)": (
            g["mlp.in"],
            block.post_attention_layernorm(mlp_input),
        ),
        "mlp.post = act(dense_h_to_4h(mlp.in))": (g["mlp.post"], block.mlp.act(block.mlp.dense_h_to_4h(g["mlp.in"]))),
        "mlp.out = dense_4h_to_h(mlp.post)": (g["mlp.out"], block.mlp.dense_4h_to_h(g["mlp.post"])),
        "attn.out = dense(attn.z)": (g["attn.out"], block.attention.dense(g["attn.z"])),
    }


@dataclass(frozen=True)
class Family:
    name: str
    build: Callable[[], nn.Module]
    blocks: str  # path of the blocks in the full model
    spec: Spec
    identities: Identities
    parallel: bool = False


def _small(**extra: Any) -> dict[str, Any]:
    return {
        "vocab_size": VOCAB,
        "hidden_size": D,
        "intermediate_size": FF,
        "num_hidden_layers": N_LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
    } | extra


def _causal(config_cls: str, **kw: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers
        from transformers import AutoModelForCausalLM

        cfg = getattr(transformers, config_cls)(**kw)
        return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")

    return build


def _gemma3_multimodal() -> nn.Module:
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    text = _small(head_dim=HEAD_DIM, sliding_window=4, model_type="gemma3_text")
    vision = {
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": 28,
        "patch_size": 14,
        "model_type": "siglip_vision_model",
    }
    cfg = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)
    cfg._attn_implementation = "eager"
    return Gemma3ForConditionalGeneration(cfg)


FAMILIES = [
    Family("llama", _causal("LlamaConfig", **_small()), "model.layers", LLAMA, _llama_identities),
    Family("mistral", _causal("MistralConfig", **_small(head_dim=HEAD_DIM)), "model.layers", LLAMA, _llama_identities),
    Family("qwen2", _causal("Qwen2Config", **_small()), "model.layers", LLAMA, _llama_identities),
    # qwen3 and the gemmas have head_dim * heads != hidden_size: attn.z is wider than the residual stream.
    Family("qwen3", _causal("Qwen3Config", **_small(head_dim=HEAD_DIM)), "model.layers", LLAMA, _llama_identities),
    Family(
        "gemma2",
        _causal("Gemma2Config", **_small(head_dim=HEAD_DIM, sliding_window=4)),
        "model.layers",
        GEMMA,
        _gemma_identities,
    ),
    Family(
        "gemma3_text",
        _causal("Gemma3TextConfig", **_small(head_dim=HEAD_DIM, sliding_window=4)),
        "model.layers",
        GEMMA,
        _gemma_identities,
    ),
    Family("gemma3", _gemma3_multimodal, "model.language_model.layers", GEMMA, _gemma_identities),
    Family(
        "gpt_neox",
        _causal("GPTNeoXConfig", **_small(use_parallel_residual=True, rotary_pct=0.5)),
        "gpt_neox.layers",
        NEOX,
        _neox_identities,
        parallel=True,
    ),
    Family(
        "gpt_neox",
        _causal("GPTNeoXConfig", **_small(use_parallel_residual=False, rotary_pct=0.5)),
        "gpt_neox.layers",
        NEOX,
        _neox_identities,
    ),
    Family(
        "gpt2",
        _causal("GPT2Config", vocab_size=VOCAB, n_embd=D, n_inner=FF, n_layer=N_LAYERS, n_head=HEADS, n_positions=64),
        "transformer.h",
        GPT2,
        _gpt2_identities,
    ),
]
IDS = [f.name + ("-parallel" if f.parallel else "") for f in FAMILIES]
_BUILT: dict[str, nn.Module] = {}


@pytest.fixture(params=FAMILIES, ids=IDS)
def family(request: pytest.FixtureRequest) -> Family:
    return request.param


def _model(fam: Family) -> Any:
    """The family's tiny model, built once per session; every parameter redrawn so that no norm is the identity
    (Gemma's norms start at zero gain offset, which would make a pre-norm and a post-norm tensor look alike)."""
    key = fam.name + str(fam.parallel)
    if key not in _BUILT:
        torch.manual_seed(0)
        model = fam.build()
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.3)
        model.eval()
        model.requires_grad_(False)
        _BUILT[key] = model
    return _BUILT[key]


def _ids() -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))


def _kinds(fam: Family) -> list[str]:
    return [k for k in SITE_KINDS if not (fam.parallel and k == "resid.mid")]


def _first(x: Any) -> torch.Tensor:
    return x[0] if isinstance(x, tuple) else x


def _by_hand(model: nn.Module, points: dict[str, tuple[str, str]], ids: torch.Tensor) -> Got:
    """Run the whole model (with its LM head, not the base model capture uses) with a plain forward hook on each
    named module (full path -> input/output); return the tensors under the keys of `points`."""
    got: Got = {}
    handles = []
    for key, (path, io) in points.items():
        module = model.get_submodule(path)
        if io == "input":
            handles.append(module.register_forward_pre_hook(lambda _m, a, k=key: got.__setitem__(k, a[0].clone())))
        else:
            handles.append(module.register_forward_hook(lambda _m, _a, o, k=key: got.__setitem__(k, _first(o).clone())))
    try:
        with torch.inference_mode():
            model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return got


def _path(fam: Family, layer: int, inside: str) -> str:
    return f"{fam.blocks}.{layer}" + (f".{inside}" if inside else "")


def _close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m: f"{what}: {m}")


def test_every_family_has_a_layout_and_module_paths() -> None:
    assert {f.name for f in FAMILIES} <= set(LAYOUTS)
    assert set(HF_TABLES) == set(LAYOUTS)


def test_layout_matches_config_type(family: Family) -> None:
    model = _model(family)
    assert layout_for(model).family == family.name or family.name in ("mistral", "qwen2", "qwen3")
    assert model.config.model_type == family.name


def test_each_site_is_the_named_module_tensor(family: Family) -> None:
    model, ids = _model(family), _ids()
    layout = layout_for(model)
    for layer in range(N_LAYERS):
        sites = {f"blocks.{layer}.{k}": k for k in _kinds(family)}
        ours = capture(model, layout, list(sites), ids)
        want = _by_hand(model, {k: (_path(family, layer, p), io) for k, (p, io) in family.spec.items()}, ids)
        for site, kind in sites.items():
            _close(ours[site], want[kind], f"{family.name} {site} vs {family.spec[kind]}")
            assert ours[site].shape[-1] == layout.site_width(model, parse_site(site)), site


def test_identities_between_sites(family: Family) -> None:
    model, ids = _model(family), _ids()
    layout = layout_for(model)
    blocks = model.get_submodule(family.blocks)
    for layer in range(N_LAYERS):
        g = {
            k: t
            for s, t in capture(model, layout, [f"blocks.{layer}.{k}" for k in _kinds(family)], ids).items()
            for k in [s.split(".", 2)[2]]
        }
        with torch.inference_mode():
            pairs = family.identities(blocks[layer], g)
        if family.parallel:
            pairs["resid.post = resid.pre + attn.out + mlp.out"] = (
                g["resid.post"],
                g["resid.pre"] + g["attn.out"] + g["mlp.out"],
            )
        else:
            pairs["resid.mid = resid.pre + attn.out"] = (g["resid.mid"], g["resid.pre"] + g["attn.out"])
            pairs["resid.post = resid.mid + mlp.out"] = (g["resid.post"], g["resid.mid"] + g["mlp.out"])
        if layer:
            prev = capture(model, layout, [f"blocks.{layer - 1}.resid.post"], ids)[f"blocks.{layer - 1}.resid.post"]
            pairs["resid.pre = previous resid.post"] = (g["resid.pre"], prev)
        for what, (lhs, rhs) in pairs.items():
            _close(lhs, rhs, f"{family.name} layer {layer}: {what}")


def test_parallel_family_has_no_resid_mid(family: Family) -> None:
    model = _model(family)
    layout = layout_for(model)
    if family.parallel:
        with pytest.raises(SiteError, match="parallel attention/MLP has no resid.mid"):
            layout.locate(model, parse_site("blocks.1.resid.mid"))
    else:
        layout.locate(model, parse_site("blocks.1.resid.mid"))


def test_every_accepted_module_path_is_its_site(family: Family) -> None:
    """The torch-free table in subject.hf_paths, entry by entry, against a hook on that module of the model."""
    model, ids = _model(family), _ids()
    layout = layout_for(model)
    table = HF_TABLES[family.name]
    layer = 1
    prefixes = [p for p in table.prefixes if _resolves(model, f"{p}.{layer}")]
    assert prefixes, f"no prefix of {family.name} resolves in the model"
    for prefix in prefixes:
        paths = {
            f"{prefix}.{layer}.{rest}": hf_path_to_site(f"{prefix}.{layer}.{rest}", family.name) for rest in table.sites
        }
        if family.parallel:  # pythia's MLP norm reads the block input: the layout refuses resid.mid
            mid = [p for p, s in paths.items() if s.endswith("resid.mid")]
            assert mid
            with pytest.raises(SiteError, match="no resid.mid"):
                capture(model, layout, [paths[mid[0]]], ids)
            paths = {p: s for p, s in paths.items() if p not in mid}
        want = _by_hand(model, {p: tuple(p.rsplit(".", 1)) for p in paths}, ids)  # type: ignore[misc]
        ours = capture(model, layout, sorted(set(paths.values())), ids)
        for path, site in paths.items():
            _close(ours[site], want[path], f"{family.name} {path} -> {site}")
        refused = {f"{prefix}.{layer}.{rest}": f"{prefix}.{layer}.{use}" for rest, use in table.refused.items()}
        before_norm = _by_hand(model, {p: tuple(p.rsplit(".", 1)) for p in refused}, ids) if refused else {}  # type: ignore[misc]
        for path, use in refused.items():
            with pytest.raises(SiteError, match="not a site.*" + re.escape(use)):
                hf_path_to_site(path, family.name)
            site = hf_path_to_site(use, family.name)
            assert not torch.allclose(before_norm[path], ours[site]), path


def _resolves(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


def test_replacing_a_site_changes_exactly_that_tensor(family: Family) -> None:
    """Add a vector at one site through sites.hooks (what steering does): the sites before it in the block are
    unchanged, the site itself moves by the vector, and where the site is added to the residual stream (attn.out,
    mlp.out, resid.mid) the residual moves by exactly that vector too."""
    model, ids = _model(family), _ids()
    layout = layout_for(model)
    layer = 1
    names = {k: f"blocks.{layer}.{k}" for k in _kinds(family)}
    base = capture(model, layout, list(names.values()), ids)
    for kind, site in names.items():
        v = torch.randn(layout.site_width(model, parse_site(site)), generator=torch.Generator().manual_seed(2))

        def add(t: torch.Tensor, v: torch.Tensor = v) -> torch.Tensor:
            return t + v

        with hooks(model, layout, {site: add}):
            got = capture(model, layout, list(names.values()), ids)
        for other, other_site in names.items():
            if FORWARD_ORDER[other] < FORWARD_ORDER[kind]:
                _close(got[other_site], base[other_site], f"{family.name}: {other} after adding at {kind}")
        _close(got[site], base[site] + v, f"{family.name}: {kind} itself")
        if kind in ("attn.out", "resid.mid") and not family.parallel:
            # resid.mid carries the change to the block's output: resid.post = resid.mid + mlp.out
            _close(got[names["resid.mid"]], base[names["resid.mid"]] + v, f"{family.name}: resid.mid after {kind}")
            _close(got[names["resid.post"]], got[names["resid.mid"]] + got[names["mlp.out"]], f"{family.name} post")
        if kind == "mlp.out" or (kind == "attn.out" and family.parallel):
            _close(got[names["resid.post"]], base[names["resid.post"]] + v, f"{family.name}: resid.post after {kind}")
        if kind in ("mlp.in", "mlp.post", "attn.z"):
            assert not torch.allclose(got[names["resid.post"]], base[names["resid.post"]]), kind


def test_multimodal_gemma3_loads_as_a_subject_and_steers(tmp_path: Path, smol_tokenizer_dir: Path) -> None:
    """Gemma3ForConditionalGeneration through load_subject (its widths live in text_config) and the intervention
    path (intervene/hooks.py): adding alpha to an mlp.out neuron, an output hook on post_feedforward_layernorm,
    moves resid.post by exactly alpha on that coordinate from the start position on, and nothing before."""
    from autointerp.intervene.hooks import Intervention, intervene, load_target
    from autointerp.subject.model import load_subject

    fam = next(f for f in FAMILIES if f.name == "gemma3")
    _model(fam).save_pretrained(tmp_path / "g3")
    for f in smol_tokenizer_dir.iterdir():
        shutil.copy(f, tmp_path / "g3" / f.name)
    subject = load_subject(str(tmp_path / "g3"))
    assert subject.layout.family == "gemma3" and subject.d_model == D and subject.n_layers == N_LAYERS
    assert subject.layout.site_width(subject.model, parse_site("blocks.1.attn.z")) == HEADS * HEAD_DIM
    target = load_target(subject, "blocks.1.mlp.out", "neurons", 3)
    ids, sites = _ids(), ["blocks.1.mlp.in", "blocks.1.resid.post"]
    base = capture(subject.model, subject.layout, sites, ids)
    with intervene(subject, Intervention.add(target, 5.0, start=2)):
        got = capture(subject.model, subject.layout, sites, ids)
    _close(got["blocks.1.mlp.in"], base["blocks.1.mlp.in"], "mlp.in, before the write site")
    delta = got["blocks.1.resid.post"] - base["blocks.1.resid.post"]
    want = torch.zeros_like(delta)
    want[:, 2:, 3] = 5.0
    _close(delta, want, "resid.post moves by the steering vector")
