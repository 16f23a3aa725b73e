"""EleutherAI sparsify SAEs written by the real `eai-sparsify` package and read by our loader: encodings equal
sparsify's own, hookpoint folders map to the sites whose tensors sparsify's trainer reads, folders of several
hookpoints expand, the collector records sparsify's latents, and what we cannot represent is refused by name."""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, get_args

import pytest
import torch
from safetensors.torch import load_file, save_file
from sparsify import SparseCoder, SparseCoderConfig
from sqlmodel import select
from torch import nn

from autointerp.collect.run import run_collect, source_specs
from autointerp.config import RunConfig
from autointerp.corpus import tokenize_corpus
from autointerp.store import open_store
from autointerp.store.tables import Feature, SAERow
from autointerp.subject.sae import (
    FORMATS,
    SAE_ARCHITECTURES,
    SAEArchitecture,
    SAEFormatError,
    hookpoint_site,
    load_sae,
    load_saes,
    sae_dirs,
    save_sae,
    stable_id,
)
from autointerp.subject.sites import capture, layout_for
from autointerp.subject.sources import load_sources

D_IN = 16


def _coder(d_in: int = D_IN, seed: int = 0, **cfg: Any) -> SparseCoder:
    """A sparsify SparseCoder with random weights and nonzero biases (its init zeroes both biases, so a loader that
    dropped one would still pass)."""
    cfg = {"num_latents": 48, "k": 4} | cfg
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        coder = SparseCoder(d_in, SparseCoderConfig(**cfg))
        with torch.no_grad():
            coder.encoder.bias.normal_(0.0, 0.3)
            coder.b_dec.normal_(0.0, 0.5)
            if coder.W_dec is not None:
                coder.W_dec.normal_(0.0, 1.0 / math.sqrt(d_in))
    return coder.eval()


def _save(coder: SparseCoder, path: Path) -> Path:
    coder.save_to_disk(path)  # sparsify's own writer
    return path


def _x(n: int = 64, d_in: int = D_IN, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, d_in, generator=torch.Generator().manual_seed(seed)) * 2


@torch.no_grad()
def _sparsify_dense(coder: SparseCoder, x: torch.Tensor) -> torch.Tensor:
    """sparsify's encoding as a dense [N, d_sae] tensor: its top values at their indices, zeros elsewhere."""
    out = coder.encode(x)
    return torch.zeros(x.shape[0], coder.num_latents).scatter_(-1, out.top_indices, out.top_acts)


# --- encodings equal sparsify's own


@pytest.mark.parametrize(
    "cfg",
    [
        {},
        {"num_latents": 0, "expansion_factor": 3, "k": 5},  # d_sae from expansion_factor
        {"k": 1},
        {"multi_topk": True, "normalize_decoder": False},  # training-only options
        {"activation": "groupmax", "k": 6},
        {"activation": "groupmax", "k": 48},  # groups of one latent: every latent active
    ],
    ids=["topk", "expansion", "k1", "training-flags", "groupmax", "groupmax-k=d_sae"],
)
def test_encoding_matches_sparsify(tmp_path: Path, cfg: dict[str, Any]) -> None:
    coder = _coder(**cfg)
    sae = load_sae(_save(coder, tmp_path / "layers.3"), expected_d_in=D_IN)
    assert sae.cfg.architecture == coder.cfg.activation and sae.cfg.k == coder.cfg.k
    assert sae.d_sae == coder.num_latents and sae.cfg.site == "blocks.3.resid.post"
    assert sae.cfg.raw["format"] == "sparsify" and sae.cfg.raw["hookpoint"] == "layers.3"
    x = _x()
    want = _sparsify_dense(coder, x)
    got = sae.encode(x)
    diff = float((got - want).abs().max())
    assert diff < 1e-5, diff
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (want > 0).any(-1).all()  # the comparison is not between zero tensors
    # The collector's sparse path gives the same values at the same latents.
    values, indices = sae.encode_sparse(x)
    torch.testing.assert_close(torch.zeros_like(got).scatter_(-1, indices, values), want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        enc = coder.encode(x)
        torch.testing.assert_close(sae(x), coder.decode(enc.top_acts, enc.top_indices), rtol=1e-4, atol=1e-5)
        if not coder.cfg.multi_topk:  # with it, sparsify's forward returns its top-4k training reconstruction
            torch.testing.assert_close(sae(x), coder(x).sae_out, rtol=1e-4, atol=1e-5)


def test_batched_and_low_precision_inputs(tmp_path: Path) -> None:
    coder = _coder()
    sae = load_sae(_save(coder, tmp_path / "layers.0"))
    x = _x(30).reshape(5, 6, D_IN)
    want = _sparsify_dense(coder, x.reshape(30, D_IN)).reshape(5, 6, -1)
    torch.testing.assert_close(sae.encode(x), want, rtol=1e-5, atol=1e-5)
    assert sae.encode(x.to(torch.bfloat16)).dtype == torch.float32


def test_bf16_weights_load_as_requested_dtype(tmp_path: Path) -> None:
    coder = _coder().to(torch.bfloat16)
    path = _save(coder, tmp_path / "layers.1")
    sae = load_sae(path)
    x = _x()
    assert sae.W_enc.dtype == torch.float32
    # Same weights in float32: our encoding is sparsify's on the upcast weights.
    want = _sparsify_dense(coder.float(), x)
    torch.testing.assert_close(sae.encode(x), want, rtol=1e-5, atol=1e-5)


# --- hookpoints and sites


@pytest.mark.parametrize(
    ("hookpoint", "site"),
    [
        ("layers.6", "blocks.6.resid.post"),
        ("h.0", "blocks.0.resid.post"),
        ("model.layers.12", "blocks.12.resid.post"),
        ("layers.6.mlp", "blocks.6.mlp.out"),
        ("h.2.mlp", "blocks.2.mlp.out"),
        ("layers.6.mlp.down_proj", "blocks.6.mlp.out"),
        ("h.2.mlp.c_proj", "blocks.2.mlp.out"),
        ("layers.1.mlp.dense_4h_to_h", "blocks.1.mlp.out"),
        ("h.2.mlp.act", "blocks.2.mlp.post"),
        ("gpt_neox.layers.1.mlp.act", "blocks.1.mlp.post"),
        ("layers.3.self_attn", "blocks.3.attn.out"),
        ("transformer.h.3.attn", "blocks.3.attn.out"),
        ("layers.3.attention", "blocks.3.attn.out"),
        ("layers.3.self_attn.o_proj", "blocks.3.attn.out"),
        ("my_renamed_sae", None),
    ],
)
def test_hookpoint_site(hookpoint: str, site: str | None) -> None:
    assert hookpoint_site(hookpoint) == site


@pytest.mark.parametrize(
    ("hookpoint", "needle"),
    [
        ("layers.6.mlp.act_fn", "act(gate) alone"),
        ("layers.6.input_layernorm", "input_layernorm"),
        ("h.2.ln_2", "ln_2"),
        ("layers.6.mlp.gate_proj", "gate_proj"),
        ("embed_tokens", "embeddings"),
        ("norm", "final norm"),
    ],
)
def test_unrepresentable_hookpoints_refused(hookpoint: str, needle: str) -> None:
    with pytest.raises(SAEFormatError, match=re.escape(needle)):
        hookpoint_site(hookpoint)


@pytest.mark.parametrize(
    ("hookpoint", "family", "refused"),
    [
        ("layers.6.mlp", "gemma2", True),
        ("model.layers.6.self_attn", "gemma3_text", True),
        ("layers.6.mlp.down_proj", "gemma3", True),
        ("layers.6", "gemma2", False),  # the block's output is the residual on every family
        ("layers.6.mlp", "llama", False),
        ("layers.6.mlp", None, False),
    ],
)
def test_gemma_module_outputs_before_the_post_norm_refused(hookpoint: str, family: str | None, refused: bool) -> None:
    from autointerp.subject.sae.sparsify import check_family

    if refused:
        with pytest.raises(SAEFormatError, match="post-norm"):
            check_family(hookpoint, family, "run/" + hookpoint)
    else:
        check_family(hookpoint, family, "run/" + hookpoint)


def test_gemma_family_refusal_reaches_load_sae(tmp_path: Path) -> None:
    coder = SparseCoder(16, SparseCoderConfig(num_latents=32, k=4))
    folder = tmp_path / "layers.1.mlp"
    coder.save_to_disk(folder)
    assert load_sae(folder).d_in == 16  # no family given: read as before
    with pytest.raises(SAEFormatError, match="post-norm"):
        load_sae(folder, family="gemma2")


def _tiny_models() -> list[nn.Module]:
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
    )

    torch.manual_seed(0)
    common = {"vocab_size": 64, "bos_token_id": 0, "eos_token_id": 1}
    return [
        m.eval()
        for m in (
            LlamaForCausalLM(
                LlamaConfig(
                    hidden_size=16,
                    intermediate_size=24,
                    num_hidden_layers=2,
                    num_attention_heads=2,
                    num_key_value_heads=2,
                    **common,
                )
            ),
            GPT2LMHeadModel(GPT2Config(n_embd=16, n_inner=24, n_layer=2, n_head=2, **common)),
            GPTNeoXForCausalLM(
                GPTNeoXConfig(
                    hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2, **common
                )
            ),
        )
    ]


@contextmanager
def _sparsify_reads(model: nn.Module, hookpoints: list[str], out: dict[str, torch.Tensor]) -> Iterator[None]:
    """What sparsify's trainer feeds an SAE on each hookpoint: the first output of that module of the base model."""
    base = model.base_model

    def make(name: str) -> Any:
        def hook(_m: nn.Module, _inp: Any, output: Any) -> None:
            out[name] = (output[0] if isinstance(output, tuple) else output).detach()

        return hook

    handles = [base.get_submodule(h).register_forward_hook(make(h)) for h in hookpoints]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def test_hookpoint_sites_are_the_tensors_sparsify_reads() -> None:
    """For Llama, GPT-2 and GPT-NeoX: every supported hookpoint of the model reads the tensor of its site."""
    ids = torch.randint(2, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    for model in _tiny_models():
        names = [n for n, _ in model.base_model.named_modules() if n]
        points = {}
        for n in names:
            try:
                site = hookpoint_site(n)
            except SAEFormatError:
                continue
            if site is not None:
                points[n] = site
        kinds = {s.split(".", 2)[2] for s in points.values()}
        assert kinds >= {"resid.post", "mlp.out", "attn.out"}, (type(model).__name__, points)
        theirs: dict[str, torch.Tensor] = {}
        with _sparsify_reads(model, list(points), theirs), torch.no_grad():
            model.base_model(input_ids=ids, use_cache=False)
        ours = capture(model, layout_for(model), sorted(set(points.values())), ids, stop_early=False)
        for hookpoint, site in points.items():
            torch.testing.assert_close(ours[site], theirs[hookpoint], msg=f"{type(model).__name__} {hookpoint}")


# --- folders of several hookpoints


def _run_dir(tmp: Path) -> Path:
    """A sparsify run as its trainer lays it out: one folder per hookpoint, two seeds of one, the run's config.json
    and a `best/` copy."""
    run = tmp / "run"
    _save(_coder(seed=1), run / "layers.10")
    _save(_coder(seed=2), run / "layers.2")
    _save(_coder(d_in=24, seed=3), run / "layers.2.mlp.down_proj")
    _save(_coder(seed=4, activation="groupmax", k=8), run / "layers.2.self_attn")
    _save(_coder(seed=5), run / "layers.4" / "seed0")
    _save(_coder(seed=6), run / "layers.4" / "seed1")
    _save(_coder(seed=7), run / "best" / "layers.2")
    (run / "config.json").write_text(json.dumps({"model": "tiny/llama", "sae": {"k": 4}, "hookpoints": ["layers.*"]}))
    torch.save({"global_step": 3}, run / "state.pt")
    return run


def test_folder_of_hookpoints(tmp_path: Path) -> None:
    run = _run_dir(tmp_path)
    dirs = sae_dirs(run)
    rel = [str(p.relative_to(run)) for p in dirs]
    assert rel == [
        "layers.2",
        "layers.2.mlp.down_proj",
        "layers.2.self_attn",
        "layers.4/seed0",
        "layers.4/seed1",
        "layers.10",
    ]
    loaded = load_saes(run)
    sites = [sae.cfg.site for _, sae in loaded]
    assert sites == [
        "blocks.2.resid.post",
        "blocks.2.mlp.out",
        "blocks.2.attn.out",
        "blocks.4.resid.post",
        "blocks.4.resid.post",
        "blocks.10.resid.post",
    ]
    assert [p for p, _ in loaded] == dirs
    assert all(sae.cfg.model_name == "tiny/llama" for _, sae in loaded)
    assert loaded[1][1].d_in == 24 and loaded[2][1].cfg.architecture == "groupmax"
    assert len({stable_id(sae) for _, sae in loaded}) == len(loaded)
    # One hookpoint folder stands for itself; the run folder is not one SAE.
    assert sae_dirs(run / "layers.2") == [run / "layers.2"]
    with pytest.raises(SAEFormatError, match=r"run: a folder of 6 SAEs \(layers\.2, layers\.2\.mlp\.down_proj"):
        load_sae(run)
    # Each loads alone, with the same site and id.
    one = load_sae(run / "layers.4" / "seed1", expected_site="blocks.4.resid.post")
    assert stable_id(one) == stable_id(loaded[4][1])


def test_renamed_folder_takes_the_given_site(tmp_path: Path) -> None:
    path = _save(_coder(), tmp_path / "my_sae")
    assert load_sae(path).cfg.site is None
    assert load_sae(path, expected_site="blocks.1.resid.post").cfg.site == "blocks.1.resid.post"
    with pytest.raises(SAEFormatError, match=r"layers\.3.*blocks\.1\.resid\.post"):
        load_sae(_save(_coder(), tmp_path / "layers.3"), expected_site="blocks.1.resid.post")


def test_converted_to_saelens_encodes_the_same(tmp_path: Path) -> None:
    coder = _coder()
    sae = load_sae(_save(coder, tmp_path / "layers.5"))
    back = load_sae(save_sae(sae, tmp_path / "as-saelens"))
    assert back.cfg.site == "blocks.5.resid.post"
    x = _x()
    torch.testing.assert_close(back.encode(x), sae.encode(x), rtol=1e-6, atol=1e-6)
    assert stable_id(back) == stable_id(sae)
    groupmax = load_sae(_save(_coder(activation="groupmax", k=6), tmp_path / "layers.6"))
    with pytest.raises(SAEFormatError, match="groupmax SAEs have no SAELens cfg"):
        save_sae(groupmax, tmp_path / "nope")
    assert not (tmp_path / "nope").exists()


def test_registries_are_consistent(tmp_path: Path) -> None:
    assert set(get_args(SAEArchitecture)) == set(SAE_ARCHITECTURES)
    assert all(name == spec.name for name, spec in SAE_ARCHITECTURES.items())
    path = _save(_coder(), tmp_path / "layers.0")
    assert [f.name for f in FORMATS.values() if f.is_own(path)] == ["sparsify"]


# --- the collector


def test_collect_a_sparsify_run(tmp_path: Path, small_corpus: Path, tiny_gpt2_dir: Path, tiny_subject: Any) -> None:
    """`collect --sae RUN_DIR` on a folder of GPT-2 hookpoints: each SAE on its own site, and the latents recorded
    are sparsify's encodings of what its trainer reads at that hookpoint."""
    corpus = tokenize_corpus(
        str(small_corpus),
        tiny_subject.tokenizer,
        tokenizer_name=tiny_subject.name,
        bos_token_id=tiny_subject.bos_token_id,
        ctx_len=16,
        seed=3,
    )
    hookpoints = ["h.1", "h.1.mlp.act", "h.2.mlp"]  # tiny GPT-2: d=64, MLP width 128
    theirs: dict[str, torch.Tensor] = {}
    with _sparsify_reads(tiny_subject.model, hookpoints, theirs), torch.no_grad():
        tiny_subject.model.base_model(input_ids=torch.from_numpy(corpus.tokens), use_cache=False)
    run = tmp_path / "run"
    coders = {}
    for i, h in enumerate(hookpoints):
        coder = coders[h] = _coder(d_in=theirs[h].shape[-1], seed=i, num_latents=40, k=3)
        acts = theirs[h].flatten(0, 1)
        with torch.no_grad():  # b_dec the mean input, as sparsify initialises it; pre-activations of order 1
            coder.b_dec.copy_(acts.mean(0))
            coder.encoder.weight.div_(acts.std(0).mean())
        _save(coder, run / h)
    cfg = RunConfig.model_validate(
        {
            "db": f"sqlite:///{tmp_path}/a.sqlite",
            "model": {"name": str(tiny_gpt2_dir)},
            "corpus": {"source": str(small_corpus), "ctx_len": 16, "max_tokens": None, "seed": 3},
            "collect": {"sites": [], "saes": [{"path": str(run)}], "batch_size": 4, "top_k": 4, "n_random": 2},
        }
    )
    sources = load_sources(tiny_subject, source_specs(cfg))
    assert [s.read_site for s in sources] == ["blocks.1.resid.post", "blocks.1.mlp.post", "blocks.2.mlp.out"]
    assert all(s.sparse for s in sources)
    store = open_store(cfg.db)
    run_collect(cfg, store, subject=tiny_subject)
    skip = 1 + cfg.collect.skip_positions  # BOS and the positions after it are never recorded
    with store.session() as s:
        rows = {r.site: r for r in s.exec(select(SAERow)).all()}
        assert {site: Path(r.path).name for site, r in rows.items()} == {
            "blocks.1.resid.post": "h.1",
            "blocks.1.mlp.post": "h.1.mlp.act",
            "blocks.2.mlp.out": "h.2.mlp",
        }
        for h, coder in coders.items():
            row = rows[hookpoint_site(h)]  # type: ignore[index]
            assert row.architecture == "topk" and row.k == 3 and row.cfg["hookpoint"] == h
            x = theirs[h][:, skip:, :]
            want = _sparsify_dense(coder, x.reshape(-1, x.shape[-1])).reshape(*x.shape[:2], -1)
            feats = s.exec(select(Feature).where(Feature.source == row.id)).all()
            assert len(feats) == 40
            for f in feats:
                a = want[:, :, f.index]
                assert f.max_act == pytest.approx(float(a.max()), rel=1e-5, abs=1e-6)
                assert f.density == pytest.approx(float((a > 0).double().mean()), rel=1e-6)
            assert sum(f.max_act > 0 for f in feats) > 20, h


# --- refusals name the file and the field


def _expect_error(path: Path, *needles: str, **kw: Any) -> None:
    with pytest.raises(SAEFormatError) as info:
        load_sae(path, **kw)
    msg = str(info.value)
    for needle in (str(path), *needles):
        assert needle in msg, msg


def _edit_cfg(path: Path, **changes: Any) -> Path:
    cfg_file = path / "cfg.json"
    raw = json.loads(cfg_file.read_text())
    for key, value in changes.items():
        if value is ...:
            raw.pop(key)
        else:
            raw[key] = value
    cfg_file.write_text(json.dumps(raw))
    return path


def test_transcoder_reads_the_module_input(tmp_path: Path) -> None:
    # Transcoders load (their encodings are compared with sparsify's in test_transcoder_formats.py).
    sae = load_sae(_save(_coder(transcode=True), tmp_path / "layers.2.mlp"))
    assert (sae.cfg.site, sae.cfg.write_sites, sae.cfg.skip) == ("blocks.2.mlp.in", ("blocks.2.mlp.out",), False)
    assert not sae.cfg.apply_b_dec_to_input
    sae = load_sae(_save(_coder(transcode=True, skip_connection=True), tmp_path / "layers.3"))
    assert (sae.cfg.site, sae.cfg.write_sites, sae.cfg.skip) == ("blocks.3.resid.pre", ("blocks.3.resid.post",), True)


def test_skip_connection_without_the_flag_refused(tmp_path: Path) -> None:
    path = _save(_coder(skip_connection=True), tmp_path / "layers.2")
    assert load_sae(path).cfg.skip
    # The tensor alone (cfg edited to hide the flag) is refused.
    _expect_error(_edit_cfg(path, skip_connection=False), "sae.safetensors", "W_skip")


@pytest.mark.parametrize(
    ("changes", "needles"),
    [
        ({"signed": True}, ("signed=true",)),
        ({"activation": "relu"}, ("activation 'relu'",)),
        ({"jumprelu": True}, ("unknown sparsify cfg key", "jumprelu")),
        ({"k": ...}, ("missing key 'k'",)),
        ({"d_in": ...}, ("missing key 'd_in'",)),
        ({"k": 0}, ("k must be an integer",)),
        ({"k": 4.5}, ("k must be an integer",)),
        ({"k": 49}, ("k=49 exceeds",)),
        ({"num_latents": 40}, ("encoder.weight has shape", "num_latents")),
        ({"d_in": 8}, ("encoder.weight has shape",)),
        ({"transcode": "no"}, ("transcode must be true or false",)),
        ({"multi_topk": 1}, ("multi_topk must be true or false",)),
        ({"activation": "groupmax", "k": 5}, ("does not divide",)),
    ],
)
def test_bad_cfg_refused(tmp_path: Path, changes: dict[str, Any], needles: tuple[str, ...]) -> None:
    path = _edit_cfg(_save(_coder(), tmp_path / "layers.2"), **changes)
    _expect_error(path, "cfg.json", *needles)


def test_signed_false_accepted(tmp_path: Path) -> None:
    """Files of the older `sae` package carry signed=false, which is today's encoding."""
    coder = _coder()
    path = _edit_cfg(_save(coder, tmp_path / "layers.2"), signed=False)
    x = _x()
    torch.testing.assert_close(load_sae(path).encode(x), _sparsify_dense(coder, x), rtol=1e-5, atol=1e-5)


def test_bad_files_refused(tmp_path: Path) -> None:
    path = _save(_coder(), tmp_path / "layers.2")
    (path / "cfg.json").write_text("{nope")
    _expect_error(path, "cfg.json", "invalid JSON")

    path = _save(_coder(), tmp_path / "a" / "layers.2")
    tensors = load_file(str(path / "sae.safetensors"))
    del tensors["encoder.bias"]
    save_file(tensors, str(path / "sae.safetensors"))
    _expect_error(path, "sae.safetensors", "missing tensor", "encoder.bias")

    path = _save(_coder(), tmp_path / "b" / "layers.2")
    tensors = load_file(str(path / "sae.safetensors"))
    tensors["W_dec"][0, 0] = float("nan")
    save_file(tensors, str(path / "sae.safetensors"))
    _expect_error(path, "sae.safetensors", "non-finite")

    path = _save(_coder(), tmp_path / "c" / "layers.2")
    (path / "sae.safetensors").write_bytes(b"garbage")
    _expect_error(path, "sae.safetensors", "cannot read safetensors")

    path = _save(_coder(), tmp_path / "d" / "layers.2")
    (path / "cfg.json").unlink()
    _expect_error(path, "cfg.json", "missing config")


def test_unrepresentable_hookpoint_folder_refused(tmp_path: Path) -> None:
    path = _save(_coder(), tmp_path / "layers.2.post_attention_layernorm")
    _expect_error(path, "cfg.json", "post_attention_layernorm")
    path = _save(_coder(), tmp_path / "embed_tokens")
    _expect_error(path, "cfg.json", "embeddings")


def test_ambiguous_directory_refused(tmp_path: Path) -> None:
    path = _save(_coder(), tmp_path / "layers.2")
    shutil.copy(path / "sae.safetensors", path / "sae_weights.safetensors")
    _expect_error(path, "ambiguous")
