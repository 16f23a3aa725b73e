"""circuit-tracer folders: cross-layer transcoders (W_enc_{l} / W_dec_{l} files, a latent of layer l writes every layer
>= l) and transcoder sets (config.yaml listing one file per layer), written by the test in circuit-tracer's layout for
the tiny GPT-2 (3 blocks, d=64): one source per layer, encoded and decoded as circuit-tracer computes them,
collected at each read site, steered at every write site, refused when the layer count or a hook does not fit."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from huggingface_hub import constants as hf_constants
from safetensors.torch import save_file
from sqlmodel import select

import autointerp.collect.run as collect_run
from autointerp.config import RunConfig
from autointerp.intervene.hooks import Direction, Intervention, intervene, load_target, target_of
from autointerp.review.pages import transcoder_line
from autointerp.store import open_store
from autointerp.store.tables import Feature, SAERow
from autointerp.subject.sae import SAEFormatError, load_sae, load_saes, sae_parts
from autointerp.subject.sources import TRANSCODER, SAESource, load_sources

D, D_SAE, LAYERS = 64, 24, 3


def _clt(root: Path, n_layers: int = LAYERS, *, jumprelu: bool = False, seed: int = 1) -> dict[str, torch.Tensor]:
    """A CLT as circuit-tracer's CrossLayerTranscoder.to_safetensors writes it; returns its tensors by file key."""
    g = torch.Generator().manual_seed(seed)
    root.mkdir(parents=True, exist_ok=True)
    config = {
        "model_name": "tiny-gpt2",
        "feature_input_hook": "ln2.hook_normalized",
        "feature_output_hook": "mlp.hook_out",
    }
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    out: dict[str, torch.Tensor] = {}
    for i in range(n_layers):
        enc = {
            f"W_enc_{i}": torch.randn(D_SAE, D, generator=g) / math.sqrt(D),
            f"b_enc_{i}": torch.randn(D_SAE, generator=g) * 0.1,
            f"b_dec_{i}": torch.randn(D, generator=g) * 0.1,
        }
        if jumprelu:
            enc[f"threshold_{i}"] = torch.rand(D_SAE, generator=g) * 0.2
        dec = {f"W_dec_{i}": torch.randn(D_SAE, n_layers - i, D, generator=g) / math.sqrt(D_SAE)}
        save_file(enc, str(root / f"W_enc_{i}.safetensors"))
        save_file(dec, str(root / f"W_dec_{i}.safetensors"))
        out |= enc | dec
    return out


def _reference(t: dict[str, torch.Tensor], xs: list[torch.Tensor], jumprelu: bool) -> tuple[list, list]:
    """circuit-tracer's encoding of each layer and its reconstruction of each layer's MLP output, by its formulas."""
    n = len(xs)
    zs = []
    for i, x in enumerate(xs):
        pre = torch.einsum("...d,fd->...f", x, t[f"W_enc_{i}"]) + t[f"b_enc_{i}"]
        zs.append(pre * (pre > t[f"threshold_{i}"]) if jumprelu else pre.relu())
    recon = [
        sum(zs[src] @ t[f"W_dec_{src}"][:, dst - src] for src in range(dst + 1)) + t[f"b_dec_{dst}"] for dst in range(n)
    ]
    return zs, recon


@pytest.mark.parametrize("jumprelu", [False, True])
def test_clt_parts_encode_and_decode_as_circuit_tracer(tmp_path: Path, jumprelu: bool) -> None:
    t = _clt(tmp_path / "clt", jumprelu=jumprelu)
    reads = [f"blocks.{i}.mlp.in" for i in range(LAYERS)]
    assert sae_parts(tmp_path / "clt") == reads
    parts = [sae for _, sae in load_saes(tmp_path / "clt")]
    assert [p.cfg.site for p in parts] == reads
    assert [p.cfg.write_sites for p in parts] == [
        tuple(f"blocks.{j}.mlp.out" for j in range(i, LAYERS)) for i in range(LAYERS)
    ]
    xs = [torch.randn(7, D, generator=torch.Generator().manual_seed(10 + i)) for i in range(LAYERS)]
    zs, recon = _reference(t, xs, jumprelu)
    z_diff = max((p.encode(x) - z).abs().max().item() for p, x, z in zip(parts, xs, zs, strict=True))
    # each part decodes its share of every later layer; the shares sum to the CLT's reconstruction
    ours = [torch.zeros(7, D) for _ in range(LAYERS)]
    for i, (p, x) in enumerate(zip(parts, xs, strict=True)):
        dec = p(x)
        dec = dec if dec.dim() == 3 else dec[:, None]
        for j in range(LAYERS - i):
            ours[i + j] += dec[:, j]
    out_diff = max((a - b).abs().max().item() for a, b in zip(ours, recon, strict=True))
    print(f"circuit-tracer CLT jumprelu={jumprelu}: max |diff| encode {z_diff:.3g}, reconstruction {out_diff:.3g}")  # noqa: T201
    assert all(z.count_nonzero() > 0 for z in zs)
    assert z_diff <= 1e-5 and out_diff <= 1e-5


def test_clt_refusals(tmp_path: Path, tiny_subject: Any) -> None:
    _clt(tmp_path / "two", n_layers=2)
    with pytest.raises(SAEFormatError, match="cross-layer transcoder of 2 layers, but the model has 3"):
        load_sources(tiny_subject, [SAESource(str(tmp_path / "two"))])
    with pytest.raises(SAEFormatError, match="a folder of 2 per-layer transcoders"):
        load_sae(tmp_path / "two")
    with pytest.raises(SAEFormatError, match="no part reads blocks.1.resid.post"):
        load_sae(tmp_path / "two", expected_site="blocks.1.resid.post")
    t = _clt(tmp_path / "bad")
    save_file({"W_dec_1": t["W_dec_1"][:, :1].contiguous()}, str(tmp_path / "bad" / "W_dec_1.safetensors"))
    with pytest.raises(SAEFormatError, match="W_dec_1 has shape") as info:
        load_sae(tmp_path / "bad", expected_site="blocks.1.mlp.in")
    assert str(tmp_path / "bad" / "W_dec_1.safetensors") in str(info.value)
    (tmp_path / "bad" / "W_enc_1.safetensors").unlink()
    with pytest.raises(SAEFormatError, match=r"are layers \[0, 2\], not 0..1"):
        load_sae(tmp_path / "bad", expected_site="blocks.0.mlp.in")
    # a hook name no TransformerLens model has is refused, naming it
    _clt(tmp_path / "hook")
    (tmp_path / "hook" / "config.yaml").write_text(
        yaml.safe_dump({"feature_input_hook": "hook_mlp_sideways", "feature_output_hook": "hook_mlp_out"})
    )
    with pytest.raises(SAEFormatError, match="hook_mlp_sideways"):
        load_sources(tiny_subject, [SAESource(str(tmp_path / "hook"))])


def test_clt_latent_steers_every_later_layer(tmp_path: Path, tiny_subject: Any) -> None:
    t = _clt(tmp_path / "clt")
    sources = load_sources(tiny_subject, [SAESource(str(tmp_path / "clt"))])
    assert [(s.kind, s.read_site, s.writes) for s in sources] == [
        (TRANSCODER, f"blocks.{i}.mlp.in", tuple(f"blocks.{j}.mlp.out" for j in range(i, LAYERS)))
        for i in range(LAYERS)
    ]
    target = target_of(sources[0], 5)
    assert target.write_sites == ("blocks.0.mlp.out", "blocks.1.mlp.out", "blocks.2.mlp.out")
    ids = torch.tensor([tiny_subject.tokenizer("The state of the Union is strong")["input_ids"]])
    mlps = [tiny_subject.layout.mlp(b) for b in tiny_subject.layout.blocks(tiny_subject.model)]
    before: dict[int, torch.Tensor] = {}
    after: dict[int, torch.Tensor] = {}

    def keep(into: dict[int, torch.Tensor], i: int) -> Any:
        return lambda _m, _a, out: into.__setitem__(i, out.detach().clone())

    first = [m.register_forward_hook(keep(before, i)) for i, m in enumerate(mlps)]
    try:
        with torch.inference_mode(), intervene(tiny_subject, Intervention.add(target, 2.0)):
            last = [m.register_forward_hook(keep(after, i)) for i, m in enumerate(mlps)]
            tiny_subject.model(ids)
            for h in last:
                h.remove()
    finally:
        for h in first:
            h.remove()
    row = t["W_dec_0"][5]  # [3, D]: its writes to layers 0, 1, 2; steered in proportion, of unit total norm
    for layer in range(LAYERS):
        delta = after[layer] - before[layer]
        want = 2.0 * row[layer] / row.norm()
        torch.testing.assert_close(delta[0, 2:], want.expand(ids.shape[1] - 2, -1))
        assert torch.equal(delta[0, :2], torch.zeros_like(delta[0, :2]))
    # the logit lens starts at the first write site
    torch.testing.assert_close(target.site_direction(), row[0] / row[0].norm())


def test_clt_collected_per_layer_and_reloaded(
    tmp_path: Path, small_corpus: Path, tiny_gpt2_dir: Path, tiny_subject: Any
) -> None:
    _clt(tmp_path / "clt")
    cfg = RunConfig.model_validate(
        {
            "db": f"sqlite:///{tmp_path}/a.sqlite",
            "model": {"name": str(tiny_gpt2_dir)},
            "corpus": {"source": str(small_corpus), "ctx_len": 16, "max_tokens": 400, "seed": 3},
            "collect": {
                "sites": [], "saes": [{"path": str(tmp_path / "clt")}], "batch_size": 4, "top_k": 2,
                "n_quantiles": 1, "per_quantile": 1, "n_random": 1,
            },
        }
    )  # fmt: skip
    store = open_store(cfg.db)
    summary = collect_run.run_collect(cfg, store, subject=tiny_subject)
    assert len(summary.sources) == LAYERS
    with store.session() as s:
        sites = {(f.site, f.source) for f in s.exec(select(Feature)).all()}
        rows = {r.id: r for r in s.exec(select(SAERow)).all()}
    assert sorted(site for site, _ in sites) == [f"blocks.{i}.mlp.in" for i in range(LAYERS)]
    name = next(src for site, src in sites if site == "blocks.1.mlp.in")
    assert (
        transcoder_line(store, name) == "transcoder: reads blocks.1.mlp.in, writes blocks.1.mlp.out, blocks.2.mlp.out"
    )
    again = load_target(tiny_subject, "blocks.1.mlp.in", name, 4, rows[name].path)
    assert isinstance(again, Direction)
    assert again.write_sites == ("blocks.1.mlp.out", "blocks.2.mlp.out")


def test_transcoder_set(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_subject: Any) -> None:
    root = tmp_path / "set"
    root.mkdir()
    g = torch.Generator().manual_seed(3)
    files = {}
    for layer in range(LAYERS):
        files[layer] = {
            "W_enc": torch.randn(D_SAE, D, generator=g) / 8, "W_dec": torch.randn(D, D_SAE, generator=g) / 5,
            "b_enc": torch.randn(D_SAE, generator=g) * 0.1, "b_dec": torch.randn(D, generator=g) * 0.1,
            "W_skip": torch.randn(D, D, generator=g) / 8,
        }  # fmt: skip
        save_file(files[layer], str(root / f"layer_{layer}.safetensors"))
    entries = [{"id": f"t{i}", "layer": i, "filepath": f"layer_{i}.safetensors"} for i in range(LAYERS)]
    config = {"model_name": "tiny", "feature_input_hook": "hook_mlp_in", "feature_output_hook": "hook_mlp_out"}
    (root / "config.yaml").write_text(yaml.safe_dump({**config, "transcoders": entries}))
    sources = load_sources(tiny_subject, [SAESource(str(root))])
    assert [(s.read_site, s.writes) for s in sources] == [
        (f"blocks.{i}.mlp.in", (f"blocks.{i}.mlp.out",)) for i in range(LAYERS)
    ]
    tc = sources[1].sae
    assert tc is not None and tc.cfg.skip
    f = files[1]
    x = torch.randn(9, D, generator=g)
    z = (x @ f["W_enc"].T + f["b_enc"]).relu()  # circuit-tracer's SingleLayerTranscoder, by its formulas
    want = z @ f["W_dec"].T + f["b_dec"] + x @ f["W_skip"].T
    diff = max((tc.encode(x) - z).abs().max().item(), (tc(x) - want).abs().max().item())
    print(f"circuit-tracer transcoder set: max |diff| {diff:.3g}")  # noqa: T201
    assert diff <= 1e-5
    # hf:// paths (as circuit-tracer's published sets name their files) come from the Hugging Face cache, offline
    cache, rev = tmp_path / "hub", "0123456789abcdef0123456789abcdef01234567"
    snap = cache / "models--org--repo" / "snapshots" / rev
    snap.mkdir(parents=True)
    (cache / "models--org--repo" / "refs").mkdir()
    (cache / "models--org--repo" / "refs" / "main").write_text(rev)
    for layer in range(LAYERS):
        (snap / f"layer_{layer}.safetensors").write_bytes((root / f"layer_{layer}.safetensors").read_bytes())
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    hub = [{"id": f"t{i}", "layer": i, "filepath": f"hf://org/repo/layer_{i}.safetensors"} for i in range(LAYERS)]
    (root / "config.yaml").write_text(yaml.safe_dump({**config, "transcoders": hub}))
    again = load_sources(tiny_subject, [SAESource(str(root))])
    assert [s.name for s in again] == [s.name for s in sources]
    hub[0]["filepath"] = "hf://org/repo/layer_9.safetensors?revision=main"
    (root / "config.yaml").write_text(yaml.safe_dump({**config, "transcoders": hub}))
    with pytest.raises(
        SAEFormatError, match=r"layer_9.safetensors\?revision=main is not in the local Hugging Face cache"
    ):
        load_sources(tiny_subject, [SAESource(str(root))])
