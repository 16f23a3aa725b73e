"""The three parts joined: a Gemma 3 by its Hugging Face id (subject.hub), its module paths mapped to sites
(subject.hf_paths, sites.py's gemma3 layout) and a Gemma Scope 2 transcoder by hf:// (subject.sae.gemmascope2),
through the CLI with nothing mocked. A tiny random-init Gemma3ForCausalLM and a transcoder folder in the published
layout sit in a Hugging Face cache laid out here (HF_HUB_OFFLINE=1): collected at pre_feedforward_layernorm's output
(blocks.1.mlp.in) with the activations computed by hand from a forward hook there, steered at
post_feedforward_layernorm's output (blocks.1.mlp.out), and refused before anything is written when its config names
a tensor that is not a site on Gemma or its width is not the model's."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from sqlmodel import select

from autointerp.subject import hub

C1 = "1" * 40
MODEL, TC_REPO, TC_PATH = "tiny-org/tiny-gemma3", "tiny-org/gemma-scope-2-tiny", "transcoder/layer_1_width_64"
SAE_NAME = f"hf://{TC_REPO}/{TC_PATH}"
D, D_SAE = 32, 64
READ, WRITE = "blocks.1.mlp.in", "blocks.1.mlp.out"
HOOK_IN = "model.layers.1.pre_feedforward_layernorm.output"
HOOK_OUT = "model.layers.1.post_feedforward_layernorm.output"


def put_repo(cache: Path, repo: str, files: dict[str, Path | bytes], commit: str) -> None:
    """Files into the cache as the hub's download leaves them: content in blobs/, linked from snapshots/COMMIT/."""
    root = cache / f"models--{repo.replace('/', '--')}"
    for rel, content in files.items():
        data = content.read_bytes() if isinstance(content, Path) else content
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = root / "snapshots" / commit / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(Path("../" * (len(Path(rel).parts) + 1), "blobs", blob.name))
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(commit, encoding="utf-8")


def _tiny_gemma3(out: Path, tokenizer_dir: Path) -> None:
    """A 2-block Gemma3ForCausalLM (d_model 32) with SmolLM2's tokenizer; every norm gain redrawn so that no norm is
    the identity (a pre-norm and a post-norm tensor would look alike)."""
    from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    cfg = Gemma3TextConfig(
        vocab_size=len(tok), hidden_size=D, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, sliding_window=4, max_position_embeddings=128,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id,
    )  # fmt: skip
    model = Gemma3ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.3)
    model.save_pretrained(out)
    tok.save_pretrained(out)


def _params(d_in: int = D) -> dict[str, np.ndarray]:
    """The published tensor names (lowercase; w_enc [d_in, d_sae], w_dec [d_sae, d_out]), random."""
    rng = np.random.default_rng(5)

    def f32(*shape: int, scale: float = 1.0) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    return {
        "w_enc": f32(d_in, D_SAE, scale=d_in**-0.5),
        "w_dec": f32(D_SAE, D, scale=D_SAE**-0.5),
        "b_enc": f32(D_SAE, scale=0.1),
        "b_dec": f32(D, scale=0.1),
        "threshold": np.abs(f32(D_SAE, scale=0.5)),
        "affine_skip_connection": f32(d_in, D, scale=d_in**-0.5),
    }


def _folder(tmp: Path, params: dict[str, np.ndarray], **cfg: Any) -> dict[str, Path | bytes]:
    tmp.mkdir(parents=True, exist_ok=True)
    save_file({k: torch.from_numpy(v) for k, v in params.items()}, str(tmp / "params.safetensors"))
    config = {"architecture": "jump_relu", "model_name": "tiny-gemma3", "width": D_SAE, "l0": 8,
              "hf_hook_point_in": HOOK_IN, "hf_hook_point_out": HOOK_OUT, "affine_connection": True} | cfg  # fmt: skip
    return {
        f"{TC_PATH}/config.json": json.dumps(config).encode(),
        f"{TC_PATH}/params.safetensors": tmp / "params.safetensors",
    }


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, smol_tokenizer_dir: Path) -> Path:
    """The tiny Gemma 3 and three transcoder repos: the good one, one whose config names `mlp.output` (before
    Gemma's post-norm) and one 48 wide where the model's mlp.in is 32."""
    c = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(c))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("AUTOINTERP_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(hub, "_RESOLVED", {})
    model_dir = tmp_path / "model"
    _tiny_gemma3(model_dir, smol_tokenizer_dir)
    put_repo(c, MODEL, {p.relative_to(model_dir).as_posix(): p for p in model_dir.rglob("*") if p.is_file()}, C1)
    put_repo(c, TC_REPO, _folder(tmp_path / "tc", _params()), C1)
    bad = _folder(tmp_path / "bad", _params(), hf_hook_point_out="model.layers.1.mlp.output")
    put_repo(c, "tiny-org/tc-mlp-output", bad, C1)
    put_repo(c, "tiny-org/tc-wide", _folder(tmp_path / "wide", _params(d_in=48)), C1)
    return c


def _args(db: Path, corpus: Path, sae: str) -> list[str]:
    return ["collect", "--db", f"sqlite:///{db}", "--model", MODEL, "--sae", sae, "--sites", "",
            "--corpus", str(corpus), "--tokens", "600", "--batch-size", "4"]  # fmt: skip


def _hand_encoding(x: torch.Tensor) -> torch.Tensor:
    """Gemma Scope 2's JumpReLU on the published tensors: pre = x @ w_enc + b_enc, kept where above threshold."""
    p = {k: torch.from_numpy(v) for k, v in _params().items()}
    pre = x @ p["w_enc"] + p["b_enc"]
    return pre * (pre > p["threshold"])


def _module_output(subject: Any, module: torch.nn.Module, ids: torch.Tensor, *ivs: Any) -> torch.Tensor:
    """`module`'s output in a forward pass of `ids` under the interventions `ivs`."""
    from autointerp.intervene.hooks import intervene

    seen: list[torch.Tensor] = []
    with torch.inference_mode(), intervene(subject, *ivs):
        # registered after the steering hook, so that it sees the module's output as the next module will
        handle = module.register_forward_hook(lambda _m, _a, out: seen.append(out.detach().clone()))
        try:
            subject.model(ids)
        finally:
            handle.remove()
    (out,) = seen
    return out


def test_collect_and_steer_a_gemma_scope_2_transcoder_by_hub_names(
    cache: Path, tmp_path: Path, small_corpus: Path, run_cli: Any
) -> None:
    from autointerp.config import load_config
    from autointerp.corpus import tokenize_corpus
    from autointerp.intervene.feature import StrengthChoice, steer_feature
    from autointerp.intervene.hooks import Intervention, load_target
    from autointerp.review.pages import transcoder_line
    from autointerp.store import open_store
    from autointerp.store.queries import sae_origins, sae_path
    from autointerp.store.tables import Feature, SAERow
    from autointerp.subject.model import load_subject

    db = tmp_path / "db.sqlite"
    code, out = run_cli(_args(db, small_corpus, SAE_NAME))
    assert code == 0, out
    store = open_store(f"sqlite:///{db}")
    with store.session() as s:
        feats = sorted(s.exec(select(Feature)).all(), key=lambda f: f.index)
        row = s.exec(select(SAERow)).one()
    assert len(feats) == D_SAE and {f.site for f in feats} == {READ} and row.site == READ
    assert row.cfg["autointerp"] == {"kind": "transcoder", "read_site": READ, "write_sites": [WRITE]}
    ((sae_id, _, origin),) = sae_origins(store)
    assert origin == {"repo": TC_REPO, "path": TC_PATH, "revision": C1}
    assert sae_path(store, sae_id) == f"{SAE_NAME}@{C1}"
    assert transcoder_line(store, sae_id) == f"transcoder: reads {READ}, writes {WRITE}"

    # The stored maxima are the published encoding of pre_feedforward_layernorm's output, computed by hand.
    subject = load_subject(MODEL)
    cfg = load_config(None, {"corpus.source": str(small_corpus), "corpus.max_tokens": 600})
    corpus = tokenize_corpus(cfg.corpus.source, subject.tokenizer, tokenizer_name=subject.name,
                             bos_token_id=subject.bos_token_id, ctx_len=cfg.corpus.ctx_len,
                             max_tokens=cfg.corpus.max_tokens, seed=cfg.corpus.seed)  # fmt: skip
    ids = torch.from_numpy(corpus.tokens)
    block = subject.model.model.layers[1]
    x = _module_output(subject, block.pre_feedforward_layernorm, ids)
    want = _hand_encoding(x[:, 1 + cfg.collect.skip_positions :]).amax(dim=(0, 1))
    assert (want > 0).sum() > D_SAE // 4  # enough latents fire for the comparison to mean something
    assert [f.max_act for f in feats] == pytest.approx(want.tolist(), rel=1e-4, abs=1e-5)

    # Steering the stored latent (as `steer` loads it) adds alpha x its unit decoder row to post_feedforward_layernorm's
    # output, from the start position on, and leaves pre_feedforward_layernorm's output (upstream) alone.
    index = int(want.argmax())
    target = load_target(subject, READ, sae_id, index, sae_path(store, sae_id))
    assert (target.read_site, target.write_sites) == (READ, (WRITE,))
    prompt = torch.tensor([subject.tokenizer("The state of the Union is strong")["input_ids"]])
    alpha, start = 3.0, 2
    iv = Intervention.add(target, alpha, start=start)
    before = _module_output(subject, block.post_feedforward_layernorm, prompt)
    after = _module_output(subject, block.post_feedforward_layernorm, prompt, iv)
    row_ = torch.from_numpy(_params()["w_dec"][index])
    delta = after - before
    torch.testing.assert_close(delta[0, start:], (alpha * row_ / row_.norm()).expand(prompt.shape[1] - start, -1))
    assert torch.equal(delta[0, :start], torch.zeros_like(delta[0, :start]))
    upstream = _module_output(subject, block.pre_feedforward_layernorm, prompt, iv)
    torch.testing.assert_close(upstream, _module_output(subject, block.pre_feedforward_layernorm, prompt))
    result = steer_feature(subject, target, "The weather today is", StrengthChoice("add", value=20.0), max_new_tokens=3)
    assert result.kl > 0 and result.strength == 20.0
    store.engine.dispose()


@pytest.mark.parametrize(
    ("repo", "expect"),
    [
        ("tiny-org/tc-mlp-output", ["'model.layers.1.mlp.output'", "gemma3_text", HOOK_OUT]),
        ("tiny-org/tc-wide", ["d_in=48 does not match site blocks.1.mlp.in of width 32"]),
    ],
)
def test_a_transcoder_that_does_not_fit_is_refused_before_the_database_is_written(
    cache: Path, tmp_path: Path, small_corpus: Path, run_cli: Any, repo: str, expect: list[str]
) -> None:
    db = tmp_path / "db.sqlite"
    code, out = run_cli(_args(db, small_corpus, f"hf://{repo}/{TC_PATH}"))
    text = " ".join(out.split())
    assert code == 2, out
    assert "error:" in text and "Traceback" not in text
    for needle in expect:
        assert needle in text, needle
    assert not db.exists()
