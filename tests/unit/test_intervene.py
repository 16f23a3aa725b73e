"""Interventions: the clamp formula against the literal decode(z') + error for every SAE convention, targets and
strengths, and `steer --json` end to end on a tiny GPT-2. The exact checks on the real SmolLM2:
tests/integration/test_intervene_smollm2.py."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from autointerp.intervene.feature import choose_strength
from autointerp.intervene.hooks import (
    Intervention,
    InterventionError,
    Latent,
    Neuron,
)
from autointerp.subject.sae import SAE, SAEConfig

# ----------------------------------------------------------------------------------------------------
# The clamp formula in every SAE convention (no model)


def _random_sae(**cfg: Any) -> SAE:
    d_in, d_sae = 8, 12
    g = torch.Generator().manual_seed(1)
    threshold = torch.rand(d_sae, generator=g) * 0.3 if cfg.get("architecture") == "jumprelu" else None
    return SAE(
        SAEConfig(d_in=d_in, d_sae=d_sae, site="blocks.0.resid.post", **cfg),
        W_enc=torch.randn(d_in, d_sae, generator=g),
        b_enc=torch.randn(d_sae, generator=g) * 0.1,
        W_dec=torch.randn(d_sae, d_in, generator=g) * 0.7,
        b_dec=torch.randn(d_in, generator=g),
        threshold=threshold,
    )


CONVENTIONS = {
    "relu": {"architecture": "relu"},
    "topk-rescaled": {"architecture": "topk", "k": 3, "rescale_acts_by_decoder_norm": True},
    "jumprelu-no-bdec": {"architecture": "jumprelu", "apply_b_dec_to_input": False},
    "expected-average": {"architecture": "topk", "k": 4, "normalize_activations": "expected_average_only_in",
                         "norm_scaling_factor": 0.37},
    "constant-norm": {"architecture": "relu", "normalize_activations": "constant_norm_rescale"},
}  # fmt: skip


@pytest.mark.parametrize("name", list(CONVENTIONS))
def test_clamp_is_decode_of_edited_code_plus_error(name: str) -> None:
    sae = _random_sae(**CONVENTIONS[name])
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, sae.d_in, generator=g) * 4 + 1
    # The SAE's reconstruction in input units, written out by hand from the cfg (not via the code under test).
    scale = math.sqrt(sae.d_in) / x.norm(dim=-1, keepdim=True) if name == "constant-norm" else 1.0

    def recon(z: torch.Tensor) -> torch.Tensor:
        return sae.decode(z) / scale

    torch.testing.assert_close(recon(sae.encode(x)), sae(x))  # the hand-written units are the SAE's own
    z = sae.encode(x)
    for j, value in [(int(z[0, 0].argmax()), 2.5), (int(z[1, 2].argmin()), 7.0), (5, 0.0)]:
        edited = z.clone()
        edited[..., j] = value
        literal = recon(edited) + (x - recon(z))
        torch.testing.assert_close(Latent(sae, j).clamp(x, value), literal, atol=1e-5, rtol=1e-5)
        # ablation removes exactly activation x decoder row, in the SAE's conventions
        row = sae.W_dec[j] / (sae.W_dec[j].norm() if sae.cfg.rescale_acts_by_decoder_norm else 1.0)
        if sae.cfg.normalize_activations == "expected_average_only_in":
            row = row / 0.37
        contribution = z[..., j, None] * row / scale
        torch.testing.assert_close(Latent(sae, j).clamp(x, 0.0) - x, -contribution, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(Latent(sae, j).contribution(x), contribution, atol=1e-6, rtol=1e-6)
        assert torch.equal(Latent(sae, j).clamp(x, 0.0)[z[..., j] == 0], x[z[..., j] == 0])


def test_add_uses_the_unit_decoder_direction() -> None:
    sae = _random_sae(architecture="relu")
    x = torch.randn(2, 4, sae.d_in)
    diff = Latent(sae, 3).add(x, 1.5) - x
    expected = 1.5 * sae.W_dec[3] / sae.W_dec[3].norm()
    torch.testing.assert_close(diff, expected.expand_as(diff))


def test_targets_validate_indices() -> None:
    sae = _random_sae(architecture="relu")
    assert Latent(sae, 11).write_site == "blocks.0.resid.post"  # a latent index may exceed the site width (12 > 8)
    with pytest.raises(InterventionError, match="latent 12 out of range"):
        Latent(sae, 12)
    with pytest.raises(InterventionError, match="neuron 8 out of range"):
        Neuron("blocks.0.mlp.post", 8, 8)
    with pytest.raises(InterventionError, match="unknown mode"):
        Intervention(Neuron("blocks.0.mlp.post", 1, 8), "boost", 1.0)  # type: ignore[arg-type]


def test_choose_strength() -> None:
    assert choose_strength("add", strength=3.0).value == 3.0
    assert choose_strength("clamp", clamp_to=2.0, max_act=1.5).value == 3.0
    assert choose_strength("clamp", clamp_value=-1.0).value == -1.0
    calib = choose_strength("clamp", max_act=4.0)
    assert calib.value is None and calib.target_kl == 0.5 and calib.initial == 4.0
    assert choose_strength("add", target_kl=0.2).target_kl == 0.2
    assert choose_strength("ablate").value == 0.0
    for mode, kw, msg in [
        ("ablate", {"strength": 1.0}, "takes no strength"),
        ("add", {"clamp_to": 2.0}, "does not apply to mode add"),
        ("clamp", {"strength": 2.0}, "does not apply to mode clamp"),
        ("clamp", {"clamp_to": 2.0, "clamp_value": 1.0}, "only one of"),
        ("clamp", {"clamp_to": 2.0, "max_act": 0.0}, "positive max activation"),
        ("add", {"target_kl": -1.0}, "must be positive"),
        ("boost", {}, "unknown mode"),
    ]:
        with pytest.raises(InterventionError, match=msg):
            choose_strength(mode, **kw)


# ----------------------------------------------------------------------------------------------------
# The real SmolLM2 and a TopK SAE trained on its layer-6 residual stream


# ----------------------------------------------------------------------------------------------------
# CLI end to end on a tiny GPT-2


def _config(tmp: Path, corpus: Path, model: Path) -> Path:
    cfg = tmp / "cfg.toml"
    cfg.write_text(
        f"""db = "sqlite:///{tmp}/db.sqlite"
[model]
name = "{model}"
[corpus]
source = "{corpus}"
ctx_len = 16
max_tokens = 1500
[collect]
sites = ["blocks.1.mlp.post"]
batch_size = 8
top_k = 4
n_quantiles = 2
per_quantile = 2
n_random = 2
[sae_train]
site = "blocks.2.resid.post"
width = 64
k = 4
tokens = 1000
epochs = 2
batch_size = 256
"""
    )
    return cfg


def test_cli_steer_json(tmp_path: Path, small_corpus: Path, tiny_gpt2_dir: Path) -> None:
    from autointerp.cli import app

    runner = CliRunner()
    cfg = str(_config(tmp_path, small_corpus, tiny_gpt2_dir))
    assert runner.invoke(app, ["sae", "train", "--config", cfg, "--out", str(tmp_path / "sae")]).exit_code == 0
    res = runner.invoke(app, ["collect", "--config", cfg, "--sae", str(tmp_path / "sae")])
    assert res.exit_code == 0, res.output
    rows = json.loads(runner.invoke(app, ["features", "list", "--config", cfg, "--json", "--all"]).stdout)
    latent = next(r for r in rows if r["source"] != "neurons" and r["max"] > 0)
    neuron = next(r for r in rows if r["source"] == "neurons" and r["max"] > 0)

    def steer(*args: str) -> dict[str, Any]:
        res = runner.invoke(app, ["steer", "--config", cfg, "--prompt", "The state of the Union", "--json", *args])
        assert res.exit_code == 0, res.output
        return json.loads(res.stdout)

    out = steer(latent["id"], "--mode", "clamp", "--clamp-to", "3", "--max-new-tokens", "6")
    assert {"baseline", "steered", "mode", "strength", "kl"} <= set(out)
    assert out["mode"] == "clamp" and out["strength"] == pytest.approx(3 * latent["max"])
    assert len(out["baseline_ids"]) == len(out["steered_ids"]) == 6 and out["kl"] >= 0
    assert out["id"] == latent["id"] and out["calibration"] is None
    # this random model's next-token KL saturates near 0.02 nats: a small target is reachable
    out = steer(neuron["id"], "--mode", "add", "--target-kl", "0.01", "--max-new-tokens", "4")
    assert out["calibration"]["converged"] and abs(out["kl"] - 0.01) <= 0.001, out["calibration"]
    assert out["strength"] == out["calibration"]["strength"]
    out = steer(neuron["id"], "--mode", "add", "--target-kl", "0.5", "--max-new-tokens", "1")
    assert not out["calibration"]["converged"] and len(out["calibration"]["trace"]) < 30  # saturation detected
    out = steer(latent["id"], "--mode", "ablate", "--max-new-tokens", "3")
    assert out["mode"] == "ablate" and out["strength"] == 0.0
    res = runner.invoke(app, ["steer", latent["id"], "--config", cfg, "--prompt", "Hi", "--max-new-tokens", "3"])
    assert res.exit_code == 0 and "baseline" in res.stdout and "KL" in res.stdout
    bad = ["steer", latent["id"], "--config", cfg, "--prompt", "x", "--mode", "ablate", "--strength", "2"]
    res = runner.invoke(app, bad)
    assert res.exit_code != 0 and isinstance(res.exception, InterventionError)
