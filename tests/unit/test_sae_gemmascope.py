"""Gemma Scope (params.npz, site from the path) and Gemma Scope 2 (config.json + params.safetensors with Hugging Face
module paths and the affine skip connection), written by the test in the published layouts, in a Hugging Face cache
laid out as huggingface_hub lays it out; encodings and transcoder outputs compared with SAELens' own modules built
from the same tensors."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import autointerp.subject.hf_paths as hf_paths
from autointerp.subject.names import SiteError
from autointerp.subject.sae import SAEFormatError, load_sae, stable_id
from autointerp.subject.sources import SAESource, load_sources

D, D_SAE = 64, 48


def _params(seed: int = 1, d_out: int = D) -> dict[str, np.ndarray]:
    g = np.random.default_rng(seed)
    return {
        "W_enc": (g.standard_normal((D, D_SAE)) / math.sqrt(D)).astype(np.float32),
        "W_dec": (g.standard_normal((D_SAE, d_out)) / math.sqrt(D_SAE)).astype(np.float32),
        "b_enc": (g.standard_normal(D_SAE) * 0.1).astype(np.float32),
        "b_dec": (g.standard_normal(d_out) * 0.1).astype(np.float32),
        "threshold": (g.random(D_SAE) * 0.2).astype(np.float32),
    }


def _hub_folder(cache: Path, repo: str, folder: str) -> Path:
    """`folder` of `repo` in a Hugging Face cache: models--ORG--NAME/snapshots/REV/..., refs/main naming REV."""
    rev = "0123456789abcdef0123456789abcdef01234567"
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(rev)
    path = root / "snapshots" / rev / folder
    path.mkdir(parents=True)
    return path


def _saelens_jumprelu(params: dict[str, np.ndarray], *, transcoder: bool, skip: np.ndarray | None = None) -> Any:
    from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig
    from sae_lens.saes.transcoder import (
        JumpReLUSkipTranscoder,
        JumpReLUSkipTranscoderConfig,
        JumpReLUTranscoder,
        JumpReLUTranscoderConfig,
    )

    d_out = params["W_dec"].shape[1]
    if not transcoder:
        module: Any = JumpReLUSAE(JumpReLUSAEConfig(d_in=D, d_sae=D_SAE, apply_b_dec_to_input=False))
    elif skip is None:
        module = JumpReLUTranscoder(
            JumpReLUTranscoderConfig(d_in=D, d_sae=D_SAE, d_out=d_out, apply_b_dec_to_input=False)
        )
    else:
        module = JumpReLUSkipTranscoder(
            JumpReLUSkipTranscoderConfig(d_in=D, d_sae=D_SAE, d_out=d_out, apply_b_dec_to_input=False)
        )
    state = {k: torch.from_numpy(v) for k, v in params.items()}
    if skip is not None:
        state["W_skip"] = torch.from_numpy(skip).T.contiguous()  # SAELens: [d_out, d_in], as its Gemma 3 loader
    module.load_state_dict(state)
    return module


def _diffs(ours: Any, theirs: Any, label: str) -> None:
    x = torch.randn(40, D, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        z, z_ref = ours.encode(x), theirs.encode(x)
        z_diff = (z - z_ref).abs().max().item()
        out_diff = (ours(x) - theirs(x)).abs().max().item()
    print(f"{label}: max |diff| encode {z_diff:.3g}, forward {out_diff:.3g}")  # noqa: T201 (reported with -s)
    assert z.count_nonzero() > 0 and z_diff <= 1e-5 and out_diff <= 1e-5


# --- Gemma Scope: params.npz


@pytest.mark.parametrize(
    ("repo", "read", "write"),
    [
        ("google/gemma-scope-2b-pt-res", "blocks.3.resid.post", None),
        ("google/gemma-scope-2b-pt-mlp", "blocks.3.mlp.out", None),
        ("google/gemma-scope-9b-it-res", "blocks.3.resid.post", None),
        ("google/gemma-scope-2b-pt-transcoders", "blocks.3.mlp.in", "blocks.3.mlp.out"),
    ],
)
def test_gemmascope_site_from_the_repo_path(tmp_path: Path, repo: str, read: str, write: str | None) -> None:
    folder = _hub_folder(tmp_path / "hub", repo, "layer_3/width_16k/average_l0_82")
    params = _params()
    np.savez(folder / "params.npz", **params)
    ours = load_sae(folder)
    assert (ours.cfg.site, ours.cfg.write_sites, ours.cfg.apply_b_dec_to_input) == (
        read,
        (write,) if write else (),
        False,
    )
    _diffs(ours, _saelens_jumprelu(params, transcoder=write is not None), f"Gemma Scope {repo.split('-')[-1]}")


def test_gemmascope_attention_reads_the_heads(tmp_path: Path) -> None:
    folder = _hub_folder(tmp_path, "google/gemma-scope-2b-pt-att", "layer_0/width_16k/average_l0_10")
    np.savez(folder / "params.npz", **_params())
    assert load_sae(folder).cfg.site == "blocks.0.attn.z"


def test_gemmascope_site_from_the_config_or_refused(tmp_path: Path) -> None:
    folder = tmp_path / "renamed"
    folder.mkdir()
    np.savez(folder / "params.npz", **_params())
    with pytest.raises(SAEFormatError, match="site = ") as info:
        load_sae(folder)
    assert str(folder / "params.npz") in str(info.value)
    sae = load_sae(folder, expected_site="blocks.2.resid.post")
    assert sae.cfg.site == "blocks.2.resid.post" and not sae.cfg.is_transcoder
    # a path that says otherwise than the config is refused
    hub = _hub_folder(tmp_path / "hub", "google/gemma-scope-2b-pt-res", "layer_4/width_16k/average_l0_9")
    np.savez(hub / "params.npz", **_params())
    with pytest.raises(SAEFormatError, match="blocks.4.resid.post"):
        load_sae(hub, expected_site="blocks.2.resid.post")


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda p: p.pop("threshold"), "missing array(s) ['threshold']"),
        (lambda p: p.__setitem__("b_dec", np.zeros(D + 1, np.float32)), "b_dec has shape"),
        (lambda p: p.__setitem__("scaling_factor", np.full(D_SAE, 2.0, np.float32)), "scaling_factor"),
        (lambda p: p.__setitem__("W_enc", np.full((D, D_SAE), np.nan, np.float32)), "non-finite"),
    ],
)
def test_gemmascope_bad_archives_refused(tmp_path: Path, change: Any, needle: str) -> None:
    folder = _hub_folder(tmp_path, "google/gemma-scope-2b-pt-res", "layer_1/width_16k/average_l0_5")
    params = _params()
    change(params)
    np.savez(folder / "params.npz", **params)
    with pytest.raises(SAEFormatError) as info:
        load_sae(folder)
    assert str(folder / "params.npz") in str(info.value) and needle in str(info.value), str(info.value)


def test_gemmascope_embedding_refused(tmp_path: Path) -> None:
    folder = _hub_folder(tmp_path, "google/gemma-scope-2b-pt-res", "embedding/width_4k/average_l0_6")
    np.savez(folder / "params.npz", **_params())
    with pytest.raises(SAEFormatError, match="embedding"):
        load_sae(folder)


# --- Gemma Scope 2: config.json + params.safetensors


_HF = {
    "model.layers.1.pre_feedforward_layernorm.output": "blocks.1.mlp.in",
    "model.layers.1.post_feedforward_layernorm.output": "blocks.1.mlp.out",
    "model.layers.1.output": "blocks.1.resid.post",
}


@pytest.fixture
def gemma3_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Hugging Face path table of a Gemma 3 (another module's, mocked here: only its contract matters)."""

    def fake(path: str, family: str | None) -> str:
        if family == "gemma3" and path in _HF:
            return _HF[path]
        raise SiteError(f"unknown hook {path!r} for family {family!r}")

    monkeypatch.setattr(hf_paths, "hf_path_to_site", fake)


def _gs2(folder: Path, *, affine: bool, out: str | None, seed: int = 4) -> tuple[dict[str, np.ndarray], np.ndarray]:
    params = _params(seed)
    skip = (np.random.default_rng(seed + 1).standard_normal((D, D)) / 16).astype(np.float32)
    tensors = {"w_enc": params["W_enc"], "w_dec": params["W_dec"], "b_enc": params["b_enc"],
               "b_dec": params["b_dec"], "threshold": params["threshold"]}  # fmt: skip
    if affine:
        tensors["affine_skip_connection"] = skip
    save_file({k: torch.from_numpy(v) for k, v in tensors.items()}, str(folder / "params.safetensors"))
    cfg: dict[str, Any] = {"architecture": "jump_relu", "model_name": "gemma-v3-1b-pt",
                           "hf_hook_point_in": "model.layers.1.pre_feedforward_layernorm.output" if out else
                           "model.layers.1.output", "width": D_SAE}  # fmt: skip
    if out is not None:
        cfg["hf_hook_point_out"] = out
        cfg["affine_connection"] = affine
    (folder / "config.json").write_text(json.dumps(cfg))
    return params, skip


@pytest.mark.usefixtures("gemma3_paths")
@pytest.mark.parametrize("affine", [False, True])
def test_gemmascope2_transcoder_as_saelens(tmp_path: Path, affine: bool) -> None:
    folder = _hub_folder(tmp_path, "google/gemma-scope-2-1b-pt", "transcoder_all/layer_1_width_16k_l0_small")
    params, skip = _gs2(folder, affine=affine, out="model.layers.1.post_feedforward_layernorm.output")
    ours = load_sae(folder, family="gemma3")
    assert (ours.cfg.site, ours.cfg.write_sites, ours.cfg.skip) == ("blocks.1.mlp.in", ("blocks.1.mlp.out",), affine)
    theirs = _saelens_jumprelu(params, transcoder=True, skip=skip if affine else None)
    _diffs(ours, theirs, f"Gemma Scope 2 transcoder affine={affine}")


@pytest.mark.usefixtures("gemma3_paths")
def test_gemmascope2_sae_and_refusals(tmp_path: Path) -> None:
    folder = _hub_folder(tmp_path, "google/gemma-scope-2-1b-pt", "resid_post/layer_1_width_16k_l0_small")
    params, _ = _gs2(folder, affine=False, out=None)
    ours = load_sae(folder, family="gemma3")
    assert (ours.cfg.site, ours.cfg.is_transcoder) == ("blocks.1.resid.post", False)
    _diffs(ours, _saelens_jumprelu(params, transcoder=False), "Gemma Scope 2 SAE")
    # the module paths need the family, and one the family lacks is refused naming the hook
    with pytest.raises(SAEFormatError, match="model family is needed") as info:
        load_sae(folder)
    assert str(folder / "config.json") in str(info.value)
    with pytest.raises(SAEFormatError, match="model.layers.1.output"):
        load_sae(folder, family="llama")
    # the cfg's skip flag and the file must agree
    tc = _hub_folder(tmp_path / "b", "google/gemma-scope-2-1b-pt", "transcoder/layer_1")
    _gs2(tc, affine=True, out="model.layers.1.post_feedforward_layernorm.output")
    raw = json.loads((tc / "config.json").read_text())
    (tc / "config.json").write_text(json.dumps({**raw, "affine_connection": False}))
    with pytest.raises(SAEFormatError, match="affine_skip_connection is present"):
        load_sae(tc, family="gemma3")
    (tc / "config.json").write_text(json.dumps({**raw, "architecture": "topk"}))
    with pytest.raises(SAEFormatError, match="architecture 'topk'"):
        load_sae(tc, family="gemma3")


@pytest.mark.usefixtures("gemma3_paths")
def test_gemmascope2_hooks_the_model_lacks_refused(tmp_path: Path, tiny_subject: Any) -> None:
    # A Gemma 3 transcoder on the tiny GPT-2: its module paths mean nothing there, refused before loading weights.
    folder = _hub_folder(tmp_path, "google/gemma-scope-2-1b-pt", "transcoder_all/layer_1")
    _gs2(folder, affine=True, out="model.layers.1.post_feedforward_layernorm.output")
    with pytest.raises(SAEFormatError, match="pre_feedforward_layernorm"):
        load_sources(tiny_subject, [SAESource(str(folder))])
    assert stable_id(load_sae(folder, family="gemma3"))  # it is a valid transcoder for a Gemma 3
