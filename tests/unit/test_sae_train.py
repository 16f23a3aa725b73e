"""The CPU TopK trainer on small synthetic data with planted sparse directions."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from autointerp.subject.sae import SAE, load_sae, save_sae, stable_id
from autointerp.subject.sae_train import TrainReport, train_topk_sae

D_IN, N_FEAT, WIDTH, K = 32, 48, 96, 4


def _planted(n: int = 6000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse codes over a random unit dictionary, noise, a mean offset and one large outlier dimension."""
    g = torch.Generator().manual_seed(seed)
    dictionary = torch.randn(N_FEAT, D_IN, generator=g)
    dictionary /= dictionary.norm(dim=1, keepdim=True)
    active = torch.rand(n, N_FEAT, generator=g) < 3.0 / N_FEAT
    mags = torch.rand(n, N_FEAT, generator=g) * 2 + 0.5
    x = (active * mags) @ dictionary + 0.02 * torch.randn(n, D_IN, generator=g)
    x += torch.randn(D_IN, generator=g)
    x[:, 3] += 30.0
    return x, dictionary


def _train(x: torch.Tensor, seed: int = 0) -> tuple[SAE, TrainReport]:
    return train_topk_sae(
        x, width=WIDTH, k=K, site="blocks.2.resid.post", model_name="synthetic", steps=400, batch_size=512,
        lr=3e-3, seed=seed,
    )  # fmt: skip


@pytest.fixture(scope="module")
def trained() -> tuple[torch.Tensor, torch.Tensor, SAE, TrainReport]:
    x, dictionary = _planted()
    sae, report = _train(x)
    return x, dictionary, sae, report


def test_reconstructs_and_recovers_planted_directions(
    trained: tuple[torch.Tensor, torch.Tensor, SAE, TrainReport],
) -> None:
    x, dictionary, sae, report = trained
    assert report.fvu < 0.25, report
    assert report.l0 == pytest.approx(K, abs=0.05), report
    assert report.steps == 400 and report.n_tokens == x.shape[0]
    assert 0.0 <= report.dead_fraction < 0.5
    best_cos = (sae.W_dec @ dictionary.T).max(dim=0).values
    assert (best_cos > 0.9).float().mean() > 0.5, best_cos
    # decoder rows stay unit-norm; the saved SAE works on raw activations
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(WIDTH))
    z = sae.encode(x[:100])
    assert ((z > 0).sum(dim=1) <= K).all()
    assert sae.cfg.architecture == "topk" and sae.cfg.k == K and sae.cfg.site == "blocks.2.resid.post"


def test_deterministic_for_a_seed(trained: tuple[torch.Tensor, torch.Tensor, SAE, TrainReport]) -> None:
    x, _, sae, _ = trained
    again, _ = _train(x)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(again, name), getattr(sae, name)), name
    assert stable_id(again) == stable_id(sae)


def test_save_and_reload_encode_identically(
    trained: tuple[torch.Tensor, torch.Tensor, SAE, TrainReport], tmp_path: Path
) -> None:
    x, _, sae, _ = trained
    save_sae(sae, tmp_path / "sae")
    back = load_sae(tmp_path / "sae", expected_d_in=D_IN, expected_site="blocks.2.resid.post")
    assert torch.equal(back.encode(x[:200]), sae.encode(x[:200]))
    assert back.cfg.model_name == "synthetic"
    assert stable_id(tmp_path / "sae") == stable_id(sae)


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="2-D float"):
        train_topk_sae(torch.zeros(100, 4, dtype=torch.long), width=8, k=2, site="blocks.0.resid.post", model_name="m")
    bad = torch.randn(100, 4)
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        train_topk_sae(bad, width=8, k=2, site="blocks.0.resid.post", model_name="m")
    with pytest.raises(ValueError, match="k <= width"):
        train_topk_sae(torch.randn(100, 4), width=8, k=9, site="blocks.0.resid.post", model_name="m")
