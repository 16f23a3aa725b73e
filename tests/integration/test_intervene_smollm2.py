"""Interventions: exact checks on the real SmolLM2 with a TopK SAE trained here in seconds (latents and neurons
change exactly what they say), positions under cached generation, batched and sampled generation, hooks removed
after an error, KL calibration, direct effects."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from autointerp.intervene.hooks import (
    DEFAULT_START,
    NEUTRAL_PROMPTS,
    Intervention,
    Latent,
    Neuron,
    intervene,
)
from autointerp.intervene.steer import calibrate, direct_effects, encode_prompt, generate, generate_many, mean_kl
from autointerp.subject.sae import SAE
from autointerp.subject.sae_train import train_topk_sae
from autointerp.subject.sites import capture, hooks

SITE = "blocks.6.resid.post"


NEURON_SITE = "blocks.6.mlp.post"


PROMPT = "The President spoke to the Congress about the economy and the"


TRAIN_TEXT = [
    "The state of the Union is strong. We will build roads, schools and hospitals in every State of the nation.",
    "In 1862 the Congress passed 37 acts; in 1863 it passed 41. Our farmers and workers pay 12 per cent in taxes.",
    "Fellow-Citizens of the Senate and House of Representatives: peace, commerce and honest friendship with all.",
    "Once upon a time a small cat lived in a quiet village by the sea, and every morning it walked to the harbour.",
]


@pytest.fixture(scope="module")
def smol_sae(smol_subject: Any) -> SAE:
    """A 256-latent TopK SAE (k=8) trained on ~180 tokens of layer 6 in about two seconds."""
    ids = torch.tensor([encode_prompt(smol_subject, t * 3)[:48] for t in TRAIN_TEXT])
    acts = capture(smol_subject.model, smol_subject.layout, [SITE], ids)[SITE][:, DEFAULT_START:]
    sae, _ = train_topk_sae(
        acts.reshape(-1, acts.shape[-1]), width=256, k=8, site=SITE, model_name="smol", steps=100, batch_size=128
    )
    assert sae.cfg.normalize_activations == "none" and not sae.cfg.rescale_acts_by_decoder_norm
    return sae


def _ids(subject: Any, prompt: str = PROMPT) -> torch.Tensor:
    return torch.tensor([encode_prompt(subject, prompt)])


def _logits(subject: Any, ids: torch.Tensor, *ivs: Intervention) -> torch.Tensor:
    with intervene(subject, *ivs), torch.inference_mode():
        return subject.model(input_ids=ids).logits


def _site(subject: Any, ids: torch.Tensor, site: str, *ivs: Intervention) -> torch.Tensor:
    with intervene(subject, *ivs):
        return capture(subject.model, subject.layout, [site], ids)[site][0]


@pytest.mark.slow
def test_clamp_to_current_value_leaves_logits_unchanged(smol_subject: Any, smol_sae: SAE) -> None:
    ids = _ids(smol_subject)
    last = ids.shape[1] - 1
    z = smol_sae.encode(_site(smol_subject, ids, SITE)[last])
    j = int(z.argmax())
    assert z[j] > 0
    base = _logits(smol_subject, ids)
    same = _logits(smol_subject, ids, Intervention.clamp(Latent(smol_sae, j), float(z[j]), start=last))
    torch.testing.assert_close(same, base, atol=1e-5, rtol=0)
    # not vacuous: the same latent ablated at the same position moves the logits
    ablated = _logits(smol_subject, ids, Intervention.ablate(Latent(smol_sae, j), start=last))
    assert (ablated - base).abs().max() > 1e-2


@pytest.mark.slow
def test_strength_zero_is_identity(smol_subject: Any, smol_sae: SAE) -> None:
    ids = _ids(smol_subject)
    base = _logits(smol_subject, ids)
    for target in (Latent(smol_sae, 7), Neuron(NEURON_SITE, 11, 1536)):
        assert torch.equal(_logits(smol_subject, ids, Intervention.add(target, 0.0, start=0)), base)
    assert mean_kl(smol_subject, [Intervention.add(Latent(smol_sae, 7), 0.0)]) == 0.0


@pytest.mark.slow
def test_ablation_removes_exactly_the_latent_contribution(smol_subject: Any, smol_sae: SAE) -> None:
    ids = _ids(smol_subject)
    x = _site(smol_subject, ids, SITE)
    z = smol_sae.encode(x)
    j = int((z[DEFAULT_START:] > 0).sum(0).argmax())  # the latent active at the most positions
    assert (z[DEFAULT_START:, j] > 0).sum() >= 2
    ablated = _site(smol_subject, ids, SITE, Intervention.ablate(Latent(smol_sae, j)))
    expected = -z[:, j, None] * smol_sae.W_dec[j]  # activation x decoder row (this SAE: no normalization)
    tol = 2e-7 * float(x.abs().max())
    torch.testing.assert_close(ablated[DEFAULT_START:] - x[DEFAULT_START:], expected[DEFAULT_START:], atol=tol, rtol=0)
    assert torch.equal(ablated[:DEFAULT_START], x[:DEFAULT_START])  # BOS and the sink position are left alone
    assert smol_sae.encode(ablated)[DEFAULT_START:, j].max() < z[DEFAULT_START:, j].max()


@pytest.mark.slow
def test_neuron_clamp_sets_exactly_that_neuron(smol_subject: Any) -> None:
    ids = _ids(smol_subject)
    x = _site(smol_subject, ids, NEURON_SITE)
    i, rest = 123, torch.arange(x.shape[1]) != 123
    for iv, want in [
        (Intervention.clamp(Neuron(NEURON_SITE, i, 1536), 3.25), torch.full((x.shape[0] - 2,), 3.25)),
        (Intervention.ablate(Neuron(NEURON_SITE, i, 1536)), torch.zeros(x.shape[0] - 2)),
        (Intervention.add(Neuron(NEURON_SITE, i, 1536), 0.5), x[2:, i] + 0.5),
    ]:
        new = _site(smol_subject, ids, NEURON_SITE, iv)
        assert torch.equal(new[2:, i], want), iv.mode
        assert torch.equal(new[:, rest], x[:, rest])  # every other neuron untouched
        assert torch.equal(new[:2], x[:2])


def _record_down_proj_input(subject: Any, layer: int, seen: list[torch.Tensor]) -> Any:
    # A forward hook sees the input as modified by every pre-hook, whatever the order they were registered in.
    down = subject.layout.mlp_down(subject.layout.blocks(subject.model)[layer])
    return down.register_forward_hook(lambda _m, args, _out: seen.append(args[0][0].detach().clone()))


@pytest.mark.slow
def test_positions_under_kv_cache_generation(smol_subject: Any) -> None:
    neuron = Neuron(NEURON_SITE, 123, 1536)
    n_prompt = _ids(smol_subject).shape[1]
    for kwargs, first_modified in [
        ({"interventions": [Intervention.clamp(neuron, 9.0, start=n_prompt + 2)]}, n_prompt + 2),
        ({"interventions": [Intervention.clamp(neuron, 9.0)], "generated_only": True}, n_prompt),
    ]:
        seen: list[torch.Tensor] = []
        handle = _record_down_proj_input(smol_subject, 6, seen)
        try:
            gen = generate(smol_subject, PROMPT, max_new_tokens=5, **kwargs)
        finally:
            handle.remove()
        assert gen.n_forward == len(seen) == 5
        assert seen[0].shape[0] == n_prompt and all(s.shape[0] == 1 for s in seen[1:])  # cached steps: 1 token
        values = torch.cat([s[:, 123] for s in seen])  # by absolute position
        assert (values[first_modified:] == 9.0).all()
        assert (values[:first_modified] != 9.0).all()


@pytest.mark.slow
def test_cached_steered_generation_matches_full_forward(smol_subject: Any, smol_sae: SAE) -> None:
    iv = Intervention.add(Latent(smol_sae, 7), 40.0)
    gen = generate(smol_subject, PROMPT, [iv], max_new_tokens=8)
    base = generate(smol_subject, PROMPT, max_new_tokens=8)
    assert gen.token_ids != base.token_ids  # the steering matters for these tokens
    full = torch.tensor([list(gen.prompt_ids) + list(gen.token_ids)])
    logits = _logits(smol_subject, full, iv)[0]
    n = len(gen.prompt_ids)
    assert logits[n - 1 : -1].argmax(-1).tolist() == list(gen.token_ids)
    assert gen.text == smol_subject.tokenizer.decode(list(gen.token_ids))


@pytest.mark.slow
def test_batched_generation_equals_one_prompt_at_a_time(smol_subject: Any, smol_sae: SAE) -> None:
    # prompts of different lengths (left padding of 0 to several tokens), with and without interventions whose
    # start counts from each row's own first token; a row that stops early must not disturb the others
    prompts = ["Hi", PROMPT, "The best part of the day was", "Once upon a time in a small village, there"]
    for ivs in (
        [],
        [Intervention.add(Latent(smol_sae, 7), 40.0)],
        [Intervention.clamp(Neuron(NEURON_SITE, 5, 1536), 4.0, start=3)],
    ):
        one = [generate(smol_subject, p, ivs, max_new_tokens=10) for p in prompts]
        many = generate_many(smol_subject, prompts, ivs, max_new_tokens=10)
        assert [g.token_ids for g in many] == [g.token_ids for g in one]
        assert [g.text for g in many] == [g.text for g in one] and [g.prompt_ids for g in many] == [
            g.prompt_ids for g in one
        ]
        assert many[0].n_forward == max(g.n_forward for g in one)  # one batched pass per step for all rows
    assert generate_many(smol_subject, prompts, max_new_tokens=0)[0].token_ids == ()


@pytest.mark.slow
def test_sampling_is_reproducible_for_a_seed(smol_subject: Any) -> None:
    runs = [generate(smol_subject, PROMPT, max_new_tokens=6, temperature=1.0, seed=s) for s in (3, 3, 4)]
    assert runs[0] == runs[1]
    assert runs[0].token_ids != runs[2].token_ids


@pytest.mark.slow
def test_hooks_removed_after_exception_during_generation(smol_subject: Any, smol_sae: SAE, n_hooks: Any) -> None:
    generate(smol_subject, PROMPT, max_new_tokens=1)  # transformers may register its own hooks on first use
    before = n_hooks(smol_subject.model)
    base = _logits(smol_subject, _ids(smol_subject))
    calls: list[int] = []

    def fail_on_third_step(_t: torch.Tensor) -> None:
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")

    ivs = [Intervention.add(Latent(smol_sae, 7), 40.0), Intervention.clamp(Neuron(NEURON_SITE, 5, 1536), 4.0)]
    failing = {"blocks.9.resid.post": fail_on_third_step}
    with pytest.raises(RuntimeError, match="boom"), hooks(smol_subject.model, smol_subject.layout, failing):
        generate(smol_subject, PROMPT, ivs, max_new_tokens=10)
    assert len(calls) == 3
    assert n_hooks(smol_subject.model) == before
    assert torch.equal(_logits(smol_subject, _ids(smol_subject)), base)


@pytest.mark.slow
def test_calibration_reaches_target_kl(smol_subject: Any, smol_sae: SAE) -> None:
    target = Latent(smol_sae, 7)
    cal = calibrate(smol_subject, lambda a: Intervention.add(target, a), target_kl=0.5, tol=0.05)
    assert cal.converged and abs(cal.kl - 0.5) <= 0.05, cal
    assert cal.n_forward == 1 + len(cal.trace)
    assert mean_kl(smol_subject, [Intervention.add(target, cal.strength)]) == pytest.approx(cal.kl, abs=1e-5)
    # clamp is calibrated on the clamp value, from a starting guess
    cal = calibrate(smol_subject, lambda v: Intervention.clamp(target, v), target_kl=0.3, tol=0.03, initial=5.0)
    assert cal.converged and abs(cal.kl - 0.3) <= 0.03, cal
    assert len(NEUTRAL_PROMPTS) >= 8


@pytest.mark.slow
def test_direct_effects_match_rmsnorm_gain_times_unembedding(smol_subject: Any, smol_sae: SAE) -> None:
    model = smol_subject.model
    gain, unembed = model.model.norm.weight, model.lm_head.weight
    down = model.model.layers[6].mlp.down_proj.weight
    cases = [(Latent(smol_sae, 7), smol_sae.W_dec[7]), (Neuron(NEURON_SITE, 123, 1536), down[:, 123])]
    for target, direction in cases:
        with torch.inference_mode():
            want = unembed @ (gain * direction / direction.norm())
        eff = direct_effects(smol_subject, target, k=5)
        assert [e.token_id for e in eff.promoted] == want.topk(5).indices.tolist()
        assert [e.token_id for e in eff.suppressed] == want.topk(5, largest=False).indices.tolist()
        torch.testing.assert_close(
            torch.tensor([e.value for e in eff.promoted]), want.topk(5).values, atol=1e-4, rtol=0
        )
        assert all(isinstance(e.token, str) for e in eff.promoted + eff.suppressed)
