"""The hub names end to end, as a user runs them, offline: a Hugging Face cache laid out by the test (as
huggingface_hub lays it out) holds a tiny random-init model and the files SAELens asks for a real release of its
registry; `autointerp collect` (in its own process, so huggingface_hub and SAELens read HF_HUB_CACHE and
HF_HUB_OFFLINE from the environment as they do for users) loads the model by its id and the SAE by
`saelens:RELEASE/SAE_ID`, explains with the LLM-free explainer, and the Neuronpedia export carries the release's
Neuronpedia model and source ids."""

from __future__ import annotations

import hashlib
import json
import math
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sae_lens")

COMMIT = "3" * 40
RELEASE, SAE_ID = "pythia-70m-deduped-res-sm", "blocks.0.hook_resid_post"  # d_in 512, hook blocks.0.resid.post
REPO, FOLDER, NEURONPEDIA = "ctigges/pythia-70m-deduped__res-sm_processed", "0-res-sm", "pythia-70m-deduped/0-res-sm"


def put_repo(cache: Path, repo: str, src: Path, prefix: str = "") -> None:
    root = cache / f"models--{repo.replace('/', '--')}"
    for p in (p for p in src.rglob("*") if p.is_file()):
        rel = prefix + p.relative_to(src).as_posix()
        blob = root / "blobs" / hashlib.sha256(p.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(p.read_bytes())
        link = root / "snapshots" / COMMIT / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path("../" * (len(Path(rel).parts) + 1), "blobs", blob.name))
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(COMMIT, encoding="utf-8")


def tiny_model(out: Path) -> None:
    """A 2-block GPT-2 of width 512 (the release's d_in) with a byte-level tokenizer of 257 tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    vocab["<|endoftext|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(vocab), n_positions=64, n_embd=512, n_layer=2, n_head=8, n_inner=256,
                     bos_token_id=len(vocab) - 1, eos_token_id=len(vocab) - 1)  # fmt: skip
    GPT2LMHeadModel(cfg).save_pretrained(out)
    fast.save_pretrained(out)


def release_files(out: Path) -> None:
    from autointerp.subject.sae import SAE, SAEConfig, save_sae

    g = torch.Generator().manual_seed(3)
    sae = SAE(SAEConfig(d_in=512, d_sae=32, architecture="relu", site="blocks.0.resid.post"),
              W_enc=torch.randn(512, 32, generator=g) / 8, b_enc=torch.full((32,), 0.05),
              W_dec=torch.randn(32, 512, generator=g) / math.sqrt(32), b_dec=torch.zeros(512))  # fmt: skip
    save_sae(sae, out)


def test_collect_a_model_id_with_a_saelens_release_and_export_its_neuronpedia_ids(tmp_path: Path) -> None:
    cache = tmp_path / "hf" / "hub"
    tiny_model(tmp_path / "model")
    put_repo(cache, "tiny-org/tiny-512", tmp_path / "model")
    release_files(tmp_path / "sae")
    put_repo(cache, REPO, tmp_path / "sae", f"{FOLDER}/")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"d{i}.txt").write_text(f"Document {i}. " + "The union is strong; taxes rise. " * 40)
    db = tmp_path / "db.sqlite"
    cfg = tmp_path / "hub.toml"
    cfg.write_text(
        f'db = "sqlite:///{db}"\n[model]\nname = "tiny-org/tiny-512"\n[corpus]\nsource = "{corpus}"\nctx_len = 24\n'
        "max_tokens = 2000\n[collect]\nsites = []\nbatch_size = 8\n"
        f'[[collect.saes]]\npath = "saelens:{RELEASE}/{SAE_ID}"\n',
        encoding="utf-8",
    )
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", AUTOINTERP_HOME=str(tmp_path / "home"))

    def cli(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "autointerp.cli", *args], capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    cli("collect", "--config", str(cfg))
    con = sqlite3.connect(db)
    try:
        (model_id, source), *_ = con.execute("select id, source from subject_model").fetchall()
        ((sae_id, path, sae_cfg),) = con.execute("select id, path, cfg from sae").fetchall()
    finally:
        con.close()
    assert (model_id, source) == (f"tiny-org/tiny-512@{COMMIT[:12]}", f"tiny-org/tiny-512@{COMMIT}")
    assert path == f"saelens:{RELEASE}/{SAE_ID}@{COMMIT}"
    assert json.loads(sae_cfg)["origin"] == {"release": RELEASE, "sae_id": SAE_ID, "neuronpedia_id": NEURONPEDIA,
                                             "repo": REPO, "path": FOLDER, "revision": COMMIT}  # fmt: skip
    assert (tmp_path / "home" / "saes" / "saelens" / RELEASE / SAE_ID / COMMIT / "cfg.json").is_file()

    cli("explain", "--config", str(cfg), "--explainer", "tokens", "--features", "all", "--limit", "4")
    lines = cli("export", "--config", str(cfg), "--format", "neuronpedia").splitlines()
    records = [json.loads(x) for x in lines if x.startswith("{")]
    assert records, lines
    assert {(r["modelId"], r["layer"]) for r in records} == {("pythia-70m-deduped", FOLDER)}
