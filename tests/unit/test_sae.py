"""SAELens-format SAEs: parsing old and new cfgs, encodings against hand computations, refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from autointerp.subject.sae import (
    SAE,
    SAEConfig,
    SAEFormatError,
    load_sae,
    save_sae,
    site_to_tl_hook,
    stable_id,
    tl_hook_to_site,
)

D_IN, D_SAE = 6, 10


def _weights(seed: int = 0, *, threshold: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = {
        "W_enc": torch.randn(D_IN, D_SAE, generator=g),
        "b_enc": torch.randn(D_SAE, generator=g) * 0.1,
        "W_dec": torch.randn(D_SAE, D_IN, generator=g),
        "b_dec": torch.randn(D_IN, generator=g),
    }
    if threshold:
        w["threshold"] = torch.rand(D_SAE, generator=g) * 0.5
    return w


def _old_cfg(**kw: Any) -> dict[str, Any]:
    """SAELens <= 5 style: flat, activation_fn_str, activation_fn_kwargs."""
    cfg = {
        "architecture": "standard",
        "d_in": D_IN,
        "d_sae": D_SAE,
        "activation_fn_str": "relu",
        "apply_b_dec_to_input": True,
        "finetuning_scaling_factor": False,
        "context_size": 128,
        "model_name": "gpt2",
        "hook_name": "blocks.3.hook_resid_post",
        "hook_layer": 3,
        "hook_head_index": None,
        "prepend_bos": True,
        "dataset_path": "x",
        "normalize_activations": "none",
        "dtype": "torch.float32",
        "device": "cpu",
    }
    cfg.update(kw)
    return cfg


def _new_cfg(**kw: Any) -> dict[str, Any]:
    """SAELens 6 style: architecture + k at top level, names nested in metadata."""
    cfg = {
        "architecture": "topk",
        "d_in": D_IN,
        "d_sae": D_SAE,
        "k": 3,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {"model_name": "smollm2", "hook_name": "blocks.5.mlp.hook_post", "hook_layer": 5},
    }
    cfg.update(kw)
    return cfg


def _write(path: Path, cfg: dict[str, Any] | str, weights: dict[str, torch.Tensor]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "cfg.json").write_text(cfg if isinstance(cfg, str) else json.dumps(cfg))
    save_file(weights, str(path / "sae_weights.safetensors"))
    return path


def _x(n: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed))


# --- sites


@pytest.mark.parametrize(
    ("hook", "site"),
    [
        ("blocks.12.hook_resid_post", "blocks.12.resid.post"),
        ("blocks.0.hook_resid_pre", "blocks.0.resid.pre"),
        ("blocks.4.mlp.hook_post", "blocks.4.mlp.post"),
        ("blocks.4.hook_mlp_out", "blocks.4.mlp.out"),
        ("blocks.4.hook_attn_out", "blocks.4.attn.out"),
    ],
)
def test_site_names_round_trip(hook: str, site: str) -> None:
    assert tl_hook_to_site(hook) == site
    assert tl_hook_to_site(site) == site
    assert site_to_tl_hook(site) == hook
    assert site_to_tl_hook(hook) == hook


@pytest.mark.parametrize("bad", ["blocks.3.attn.hook_q", "hook_embed", "blocks.x.resid.post", "resid.post"])
def test_unknown_hook_name(bad: str) -> None:
    with pytest.raises(SAEFormatError, match="unknown hook"):
        tl_hook_to_site(bad)


# --- encodings against hand computations


def test_old_style_relu_matches_hand_computation(tmp_path: Path) -> None:
    w = _weights()
    sae = load_sae(_write(tmp_path / "s", _old_cfg(), w), expected_d_in=D_IN, expected_site="blocks.3.resid.post")
    assert sae.cfg.architecture == "relu"
    assert sae.cfg.site == "blocks.3.resid.post" and sae.cfg.model_name == "gpt2"
    assert sae.cfg.raw["context_size"] == 128
    x = _x()
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    z = torch.relu(pre)
    torch.testing.assert_close(sae.encode(x), z)
    torch.testing.assert_close(sae.feature_activations(x), z)
    torch.testing.assert_close(sae(x), z @ w["W_dec"] + w["b_dec"])
    torch.testing.assert_close(sae.decode(z), z @ w["W_dec"] + w["b_dec"])


def test_apply_b_dec_to_input_false(tmp_path: Path) -> None:
    w = _weights()
    sae = load_sae(_write(tmp_path / "s", _old_cfg(apply_b_dec_to_input=False), w))
    x = _x()
    torch.testing.assert_close(sae.encode(x), torch.relu(x @ w["W_enc"] + w["b_enc"]))


def test_old_style_topk_via_activation_fn(tmp_path: Path) -> None:
    w = _weights()
    cfg = _old_cfg(activation_fn_str="topk", activation_fn_kwargs={"k": 2})
    sae = load_sae(_write(tmp_path / "s", cfg, w))
    assert sae.cfg.architecture == "topk" and sae.cfg.k == 2
    x = _x()
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    vals, idx = pre.topk(2, dim=-1)
    expected = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
    torch.testing.assert_close(sae.encode(x), expected)
    assert ((sae.encode(x) > 0).sum(-1) <= 2).all()


def test_new_style_topk_with_metadata(tmp_path: Path) -> None:
    w = _weights()
    sae = load_sae(_write(tmp_path / "s", _new_cfg(), w), expected_site="blocks.5.mlp.post")
    assert sae.cfg.architecture == "topk" and sae.cfg.k == 3
    assert sae.cfg.site == "blocks.5.mlp.post" and sae.cfg.model_name == "smollm2"
    x = _x()
    pre = x @ w["W_enc"] + w["b_enc"]  # apply_b_dec_to_input is false in this cfg
    vals, idx = pre.topk(3, dim=-1)
    torch.testing.assert_close(sae.encode(x), torch.zeros_like(pre).scatter(-1, idx, vals.relu()))


def test_topk_applies_relu_after_selection(tmp_path: Path) -> None:
    w = _weights()
    w["b_enc"] = torch.full((D_SAE,), -100.0)  # every pre-activation negative
    sae = load_sae(_write(tmp_path / "s", _new_cfg(), w))
    assert (sae.encode(_x()) == 0).all()


def test_jumprelu_matches_hand_computation(tmp_path: Path) -> None:
    w = _weights(threshold=True)
    sae = load_sae(_write(tmp_path / "s", _new_cfg(architecture="jumprelu", k=None), w))
    x = _x(50)
    pre = x @ w["W_enc"] + w["b_enc"]
    expected = torch.relu(pre) * (pre > w["threshold"])
    torch.testing.assert_close(sae.encode(x), expected)
    assert (expected > 0).any() and ((pre > 0) & (pre <= w["threshold"])).any()  # the threshold matters here


def test_jumprelu_log_threshold(tmp_path: Path) -> None:
    w = _weights(threshold=True)
    w["log_threshold"] = w.pop("threshold").log()
    sae = load_sae(_write(tmp_path / "s", _new_cfg(architecture="jumprelu", k=None), w))
    assert sae.threshold is not None
    torch.testing.assert_close(sae.threshold, w["log_threshold"].exp())


def test_rescale_acts_by_decoder_norm(tmp_path: Path) -> None:
    w = _weights()
    cfg = _new_cfg(rescale_acts_by_decoder_norm=True)
    sae = load_sae(_write(tmp_path / "s", cfg, w))
    x = _x()
    norms = w["W_dec"].norm(dim=-1)
    pre = (x @ w["W_enc"] + w["b_enc"]) * norms  # selection happens on the scaled pre-activations
    vals, idx = pre.topk(3, dim=-1)
    z = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
    torch.testing.assert_close(sae.encode(x), z)
    # decode undoes the scaling, so the reconstruction uses the pre-decoder activation
    torch.testing.assert_close(sae(x), (z / norms) @ w["W_dec"] + w["b_dec"])
    torch.testing.assert_close(sae.decode(z), (z / norms) @ w["W_dec"] + w["b_dec"])


def test_constant_norm_rescale(tmp_path: Path) -> None:
    w = _weights()
    sae = load_sae(_write(tmp_path / "s", _old_cfg(normalize_activations="constant_norm_rescale"), w))
    x = _x()
    coeff = math.sqrt(D_IN) / x.norm(dim=-1, keepdim=True)
    z = torch.relu((x * coeff - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
    torch.testing.assert_close(sae.encode(x), z)
    torch.testing.assert_close(sae(x), (z @ w["W_dec"] + w["b_dec"]) / coeff)
    # scale invariance of the features: the point of this normalization
    torch.testing.assert_close(sae.encode(3 * x), z)


def test_expected_average_with_factor(tmp_path: Path) -> None:
    w = _weights()
    cfg = _old_cfg(normalize_activations="expected_average_only_in", norm_scaling_factor=0.5)
    sae = load_sae(_write(tmp_path / "s", cfg, w))
    x = _x()
    z = torch.relu((x * 0.5 - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
    torch.testing.assert_close(sae.encode(x), z)
    torch.testing.assert_close(sae(x), (z @ w["W_dec"] + w["b_dec"]) / 0.5)


def test_batched_shapes_dtype_and_grad() -> None:
    w = _weights()
    cfg = SAEConfig(d_in=D_IN, d_sae=D_SAE, architecture="topk", k=3, site="blocks.1.resid.post")
    sae = SAE(cfg, **w)
    x = torch.randn(2, 5, D_IN)
    z = sae.encode(x)
    assert z.shape == (2, 5, D_SAE)
    torch.testing.assert_close(z.reshape(10, D_SAE), sae.encode(x.reshape(10, D_IN)))
    out = sae(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    xg = x.clone().requires_grad_(True)
    sae(xg).sum().backward()  # the in-place fast path must not break autograd through the input
    assert xg.grad is not None
    with pytest.raises(ValueError, match="d_in=6"):
        sae.encode(torch.randn(3, D_IN + 1))


# --- save / load / id


@pytest.mark.parametrize("arch", ["relu", "topk", "jumprelu"])
def test_save_load_round_trip(tmp_path: Path, arch: str) -> None:
    w = _weights(threshold=arch == "jumprelu")
    cfg = SAEConfig(
        d_in=D_IN,
        d_sae=D_SAE,
        architecture=arch,  # type: ignore[arg-type]
        k=3 if arch == "topk" else None,
        site="blocks.2.resid.post",
        model_name="m",
    )
    sae = SAE(cfg, **w)
    save_sae(sae, tmp_path / "out")
    raw = json.loads((tmp_path / "out" / "cfg.json").read_text())
    assert raw["metadata"]["hook_name"] == raw["hook_name"] == "blocks.2.hook_resid_post"
    assert raw["normalize_activations"] == "none" and raw["dtype"] == "float32"
    back = load_sae(tmp_path / "out", expected_d_in=D_IN, expected_site="blocks.2.resid.post")
    assert {k: v for k, v in vars(back.cfg).items() if k != "raw"} == {k: v for k, v in vars(cfg).items() if k != "raw"}
    x = _x(20)
    assert torch.equal(back.encode(x), sae.encode(x))
    assert torch.equal(back(x), sae(x))
    assert stable_id(back) == stable_id(sae) == stable_id(tmp_path / "out")


def test_stable_id_changes_with_weights_and_cfg() -> None:
    w = _weights()
    cfg = SAEConfig(d_in=D_IN, d_sae=D_SAE, architecture="topk", k=3)
    base = stable_id(SAE(cfg, **w))
    assert len(base) == 16
    assert stable_id(SAE(SAEConfig(d_in=D_IN, d_sae=D_SAE, architecture="topk", k=4), **w)) != base
    w2 = dict(w, b_enc=w["b_enc"] + 1e-3)
    assert stable_id(SAE(cfg, **w2)) != base
    assert stable_id(SAE(cfg, **w)) == base


# --- refusals: every message names the path


def _expect_error(path: Path, needle: str, **kw: Any) -> None:
    with pytest.raises(SAEFormatError) as info:
        load_sae(path, **kw)
    msg = str(info.value)
    assert str(path) in msg, msg
    assert needle in msg, msg


def test_missing_cfg(tmp_path: Path) -> None:
    p = _write(tmp_path / "s", _old_cfg(), _weights())
    (p / "cfg.json").unlink()
    _expect_error(p, "missing config")


def test_missing_weights(tmp_path: Path) -> None:
    p = _write(tmp_path / "s", _old_cfg(), _weights())
    (p / "sae_weights.safetensors").unlink()
    _expect_error(p, "missing weights")


def test_not_a_directory(tmp_path: Path) -> None:
    _expect_error(tmp_path / "nope", "not a directory")


def test_bad_json(tmp_path: Path) -> None:
    _expect_error(_write(tmp_path / "s", "{not json", _weights()), "invalid JSON")


def test_corrupt_weights(tmp_path: Path) -> None:
    p = _write(tmp_path / "s", _old_cfg(), _weights())
    (p / "sae_weights.safetensors").write_bytes(b"garbage")
    _expect_error(p, "cannot read safetensors")


def test_missing_key(tmp_path: Path) -> None:
    w = _weights()
    del w["b_dec"]
    _expect_error(_write(tmp_path / "s", _old_cfg(), w), "b_dec")


def test_missing_cfg_key(tmp_path: Path) -> None:
    cfg = _old_cfg()
    del cfg["d_sae"]
    _expect_error(_write(tmp_path / "s", cfg, _weights()), "d_sae")


def test_wrong_shape(tmp_path: Path) -> None:
    w = _weights()
    w["W_dec"] = torch.randn(D_SAE, D_IN + 1)
    _expect_error(_write(tmp_path / "s", _old_cfg(), w), "W_dec has shape")


def test_d_in_mismatch_with_site(tmp_path: Path) -> None:
    p = _write(tmp_path / "s", _old_cfg(), _weights())
    with pytest.raises(SAEFormatError) as info:
        load_sae(p, expected_d_in=576)
    msg = str(info.value)
    assert str(p) in msg and "576" in msg and f"d_in={D_IN}" in msg and "blocks.3.resid.post" in msg


def test_site_mismatch(tmp_path: Path) -> None:
    _expect_error(
        _write(tmp_path / "s", _old_cfg(), _weights()),
        "blocks.4.resid.post",
        expected_site="blocks.4.resid.post",
    )


def test_unknown_architecture(tmp_path: Path) -> None:
    _expect_error(_write(tmp_path / "s", _old_cfg(architecture="wild"), _weights()), "unknown architecture 'wild'")


def test_unknown_activation(tmp_path: Path) -> None:
    cfg = _old_cfg(activation_fn_str="tanh-relu")
    _expect_error(_write(tmp_path / "s", cfg, _weights()), "unknown activation function")


def test_gated_refused(tmp_path: Path) -> None:
    w = _weights()
    w["r_mag"] = torch.zeros(D_SAE)
    _expect_error(_write(tmp_path / "s", _old_cfg(architecture="gated"), w), "gated")


@pytest.mark.parametrize("tensor", ["W_enc", "b_enc", "W_dec", "b_dec"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_refused_naming_file_and_tensor(tmp_path: Path, tensor: str, bad: float) -> None:
    w = _weights()
    w[tensor].view(-1)[3] = bad
    path = _write(tmp_path / "s", _old_cfg(), w)
    _expect_error(path, f"sae_weights.safetensors: tensor {tensor} contains 1 non-finite value(s)")
    _expect_error(path, str(bad))


def test_non_finite_log_threshold_named_as_in_the_file(tmp_path: Path) -> None:
    w = _weights()
    w["log_threshold"] = torch.zeros(D_SAE)
    w["log_threshold"][2] = float("nan")
    _expect_error(_write(tmp_path / "s", _new_cfg(architecture="jumprelu", k=None), w), "tensor log_threshold")


def test_cast_overflow_refused(tmp_path: Path) -> None:
    w = _weights()
    w["W_dec"][1, 1] = 1e6  # finite in float32, inf in float16
    path = _write(tmp_path / "s", _old_cfg(), w)
    assert load_sae(path).W_dec[1, 1] == 1e6
    _expect_error(
        path, "tensor W_dec contains 1 non-finite value(s) (NaN or inf) after the cast to float16", dtype=torch.float16
    )


def test_in_memory_sae_with_nan_refused() -> None:
    w = _weights()
    w["b_dec"][0] = float("nan")
    with pytest.raises(SAEFormatError, match="<in-memory SAE>: tensor b_dec"):
        SAE(SAEConfig(d_in=D_IN, d_sae=D_SAE, architecture="relu"), **w)


def test_topk_without_k(tmp_path: Path) -> None:
    cfg = _new_cfg()
    del cfg["k"]
    _expect_error(_write(tmp_path / "s", cfg, _weights()), "without k")


def test_topk_conflicting_k(tmp_path: Path) -> None:
    cfg = _new_cfg(activation_fn_kwargs={"k": 4})
    _expect_error(_write(tmp_path / "s", cfg, _weights()), "activation_fn_kwargs.k")


def test_jumprelu_without_threshold(tmp_path: Path) -> None:
    _expect_error(_write(tmp_path / "s", _new_cfg(architecture="jumprelu", k=None), _weights()), "threshold")


def test_unexpected_tensor(tmp_path: Path) -> None:
    w = _weights(threshold=True)  # a threshold in a relu SAE: probably a mislabelled jumprelu
    _expect_error(_write(tmp_path / "s", _old_cfg(), w), "unexpected tensor")


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ({"normalize_activations": "layer_norm"}, "normalize_activations"),
        ({"normalize_activations": "expected_average_only_in"}, "norm_scaling_factor"),
        ({"hook_head_index": 2}, "hook_head_index"),
        ({"finetuning_scaling_factor": True}, "finetuning_scaling_factor"),
        ({"reshape_activations": "hook_z"}, "reshape_activations"),
        ({"d_out": 8}, "transcoders"),
        ({"hook_name": "blocks.3.attn.hook_q"}, "unknown hook"),
        ({"metadata": {"hook_name": "blocks.4.hook_resid_post"}}, "in metadata"),
        ({"apply_b_dec_to_input": "yes"}, "apply_b_dec_to_input"),
    ],
)
def test_unsupported_cfg_values_refused(tmp_path: Path, override: dict[str, Any], needle: str) -> None:
    _expect_error(_write(tmp_path / "s", _old_cfg(**override), _weights()), needle)


def test_rescale_with_jumprelu_refused(tmp_path: Path) -> None:
    cfg = _new_cfg(architecture="jumprelu", k=None, rescale_acts_by_decoder_norm=True)
    _expect_error(_write(tmp_path / "s", cfg, _weights(threshold=True)), "rescale_acts_by_decoder_norm")


def test_sparsify_non_finite_named_as_in_the_file(tmp_path: Path) -> None:
    """sparsify's tensor names (encoder.weight is our W_enc transposed): the message names the one in the file."""
    w = _weights()
    tensors = {"encoder.weight": w["W_enc"].T.contiguous(), "encoder.bias": w["b_enc"], "W_dec": w["W_dec"]}
    tensors["b_dec"] = w["b_dec"]
    tensors["encoder.weight"][4, 1] = float("inf")
    path = tmp_path / "run" / "layers.3"
    path.mkdir(parents=True)
    (path / "cfg.json").write_text(json.dumps({"d_in": D_IN, "num_latents": D_SAE, "k": 3}))
    save_file(tensors, str(path / "sae.safetensors"))
    _expect_error(
        path, "sae.safetensors: tensor encoder.weight contains 1 non-finite value(s) (NaN or inf), the first inf"
    )
