"""Names from the Hugging Face hub (subject.hub): model ids, hf:// folders and SAELens releases, resolved through a
Hugging Face cache laid out here as huggingface_hub lays it out (blobs, snapshots/COMMIT/... links, refs/main),
with HF_HUB_OFFLINE=1 and no network."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from autointerp.subject import hub
from autointerp.subject.files import ModelLoadError, resolve
from autointerp.subject.sae import SAE, SAEConfig, SAEFormatError, load_sae, save_sae

C1 = "1" * 40
C2 = "2" * 40


def put_repo(cache: Path, repo: str, files: dict[str, Path | bytes], commit: str, ref: str = "main") -> Path:
    """Files into the cache as the hub's download leaves them: content in blobs/, linked from snapshots/COMMIT/."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snap = root / "snapshots" / commit
    for rel, content in files.items():
        data = content.read_bytes() if isinstance(content, Path) else content
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snap / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(Path("../" * (len(Path(rel).parts) + 1), "blobs", blob.name))
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / ref).write_text(commit, encoding="utf-8")
    return snap


def dir_files(d: Path, prefix: str = "") -> dict[str, Path | bytes]:
    return {f"{prefix}{p.relative_to(d).as_posix()}": p for p in d.rglob("*") if p.is_file()}


def small_sae(d_in: int, site: str) -> SAE:
    g = torch.Generator().manual_seed(2)
    return SAE(SAEConfig(d_in=d_in, d_sae=16, architecture="relu", site=site),
               W_enc=torch.randn(d_in, 16, generator=g) / 4, b_enc=torch.zeros(16),
               W_dec=torch.randn(16, d_in, generator=g) / math.sqrt(16), b_dec=torch.zeros(d_in))  # fmt: skip


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_gpt2_dir: Path) -> Path:
    """A hub cache with the tiny GPT-2 at two commits (main, v2), and an SAE repo: `res` an SAELens folder at
    blocks.1.resid.post, `many` a folder of two, `junk` no SAE at all."""
    c = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(c))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("AUTOINTERP_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(hub, "_RESOLVED", {})
    put_repo(c, "tiny-org/tiny-gpt2", dir_files(tiny_gpt2_dir), C1)
    put_repo(c, "tiny-org/tiny-gpt2", dir_files(tiny_gpt2_dir), C2, ref="v2")
    saes = tmp_path / "saes"
    save_sae(small_sae(64, "blocks.1.resid.post"), saes / "res")
    save_sae(small_sae(64, "blocks.0.resid.post"), saes / "many" / "a")
    save_sae(small_sae(64, "blocks.2.resid.post"), saes / "many" / "b")
    put_repo(c, "tiny-org/tiny-saes", {**dir_files(saes), "junk/README.md": b"nothing here", "junk/w.bin": b"0"}, C1)
    return c


# ----------------------------------------------------------------------------------------------------
# Names


@pytest.mark.parametrize(
    ("spec", "parts"),
    [
        ("google/gemma-2-2b", ("google/gemma-2-2b", None)),
        ("EleutherAI/pythia-70m@step1000", ("EleutherAI/pythia-70m", "step1000")),
        ("org/name@refs/pr/1", ("org/name", "refs/pr/1")),
        ("./org/name", None),
        ("/abs/path", None),
        ("a/b/c", None),
        ("model.gguf", None),
        ("../up", None),
    ],
)
def test_a_model_id_has_the_org_name_shape(spec: str, parts: tuple[str, str | None] | None) -> None:
    assert hub.model_id_parts(spec) == parts


def test_hub_sae_names_parse_and_bad_ones_are_named() -> None:
    assert hub.hf_parts("hf://google/gemma-scope-2b-pt-res/layer_12/width_16k@abc") == (
        "google/gemma-scope-2b-pt-res", "layer_12/width_16k", "abc")  # fmt: skip
    assert hub.saelens_parts("saelens:gemma-scope-2b-pt-res-canonical/layer_12/width_16k/canonical") == (
        "gemma-scope-2b-pt-res-canonical", "layer_12/width_16k/canonical", None)  # fmt: skip
    for bad in ("hf://justone", "hf://org/../x", "saelens:release-only", "saelens:/id"):
        with pytest.raises(ValueError, match="is not"):
            hub.check_sae_name(bad)
    assert hub.check_sae_name("some/dir") == "some/dir"


def test_the_hub_cache_is_where_huggingface_hub_puts_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub.hub_cache() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "c"))  # the more specific one wins, as in huggingface_hub
    assert hub.hub_cache() == tmp_path / "c"
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    assert not hub.offline()


def test_config_accepts_hub_names_and_refuses_training_into_one() -> None:
    from autointerp.config import ConfigError, load_config

    cfg = load_config(None, {"model.name": "google/gemma-2-2b", "collect.saes": [{"path": "hf://o/r/p@v1"}]})
    assert cfg.collect.saes[0].path == "hf://o/r/p@v1"
    with pytest.raises(ConfigError, match="collect.saes.0.path"):
        load_config(None, {"collect.saes": [{"path": "saelens:nothing"}]})
    with pytest.raises(ConfigError, match="train_if_missing needs a directory"):
        load_config(None, {"collect.saes": [{"path": "hf://o/r/p", "train_if_missing": True}]})


# ----------------------------------------------------------------------------------------------------
# Models


def test_a_model_id_resolves_to_its_cached_commit(cache: Path) -> None:
    main = resolve("tiny-org/tiny-gpt2")
    assert main.name == f"tiny-org/tiny-gpt2@{C1[:12]}"
    assert main.path == cache / "models--tiny-org--tiny-gpt2" / "snapshots" / C1
    assert main.source == f"tiny-org/tiny-gpt2@{C1}"
    again = resolve(main.source)  # what the store keeps loads the same snapshot, by its commit
    assert (again.name, again.path) == (main.name, main.path)
    assert resolve("tiny-org/tiny-gpt2@v2").name == f"tiny-org/tiny-gpt2@{C2[:12]}"  # never mixed with main


def test_an_existing_path_wins_over_a_model_id(cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    local = tmp_path / "tiny-org" / "tiny-gpt2"
    shutil.copytree(cache / "models--tiny-org--tiny-gpt2" / "snapshots" / C1, local)
    monkeypatch.chdir(tmp_path)
    got = resolve("tiny-org/tiny-gpt2")
    assert (got.name, got.path, got.source) == ("tiny-gpt2", Path("tiny-org/tiny-gpt2"), None)


@pytest.mark.parametrize(
    ("spec", "expect"),
    [
        ("nobody/nothing", "nobody/nothing@main is not in the Hugging Face cache"),
        ("tiny-org/tiny-gpt2@v9", "tiny-org/tiny-gpt2@v9 is not in the Hugging Face cache"),
    ],
)
def test_a_model_missing_from_the_cache_offline_names_the_id_and_the_cache(cache: Path, spec: str, expect: str) -> None:
    with pytest.raises(ModelLoadError) as err:
        resolve(spec)
    assert expect in str(err.value) and str(cache) in str(err.value) and "HF_HUB_OFFLINE" in str(err.value)


def test_a_snapshot_without_its_weights_is_refused_before_loading(cache: Path, tiny_gpt2_dir: Path) -> None:
    files = {k: v for k, v in dir_files(tiny_gpt2_dir).items() if not k.endswith(".safetensors")}
    put_repo(cache, "tiny-org/no-weights", files, C1)
    with pytest.raises(ModelLoadError) as err:
        resolve("tiny-org/no-weights")
    assert "model 'tiny-org/no-weights'" in str(err.value) and "lacks the weights" in str(err.value)
    assert str(cache) in str(err.value)


def test_a_model_by_id_loads_with_transformers(cache: Path) -> None:
    from autointerp.subject.model import load_subject

    subject = load_subject("tiny-org/tiny-gpt2")
    assert subject.name == f"tiny-org/tiny-gpt2@{C1[:12]}"
    assert subject.source == f"tiny-org/tiny-gpt2@{C1}"
    assert subject.n_layers == 3


# ----------------------------------------------------------------------------------------------------
# hf:// SAEs


def test_an_hf_folder_is_the_cached_folder_pinned_to_its_commit(cache: Path) -> None:
    got = hub.resolve_sae("hf://tiny-org/tiny-saes/res")
    assert got.local == cache / "models--tiny-org--tiny-saes" / "snapshots" / C1 / "res"
    assert got.name == f"hf://tiny-org/tiny-saes/res@{C1}"
    assert got.origin == {"repo": "tiny-org/tiny-saes", "path": "res", "revision": C1}
    assert load_sae(got.local).cfg.site == "blocks.1.resid.post"


def test_a_folder_of_several_names_each_by_its_own_path(cache: Path, tiny_subject: Any) -> None:
    from autointerp.subject.sources import SAESource, load_sources

    sources = load_sources(tiny_subject, [SAESource("hf://tiny-org/tiny-saes/many")])
    assert [s.path for s in sources] == [f"hf://tiny-org/tiny-saes/many/a@{C1}", f"hf://tiny-org/tiny-saes/many/b@{C1}"]
    assert [s.read_site for s in sources] == ["blocks.0.resid.post", "blocks.2.resid.post"]
    # The stored name loads the same SAE again (its content id checked).
    (again,) = load_sources(tiny_subject, [SAESource(sources[1].path, expect_id=sources[1].name)])
    assert again.name == sources[1].name and hub.sae_origin(sources[1].path)["path"] == "many/b"


@pytest.mark.parametrize(
    ("name", "expect"),
    [
        ("hf://tiny-org/tiny-saes/junk", ["no SAE format recognised", "README.md", "w.bin"]),
        ("hf://tiny-org/tiny-saes/nope", ["has no folder 'nope'", "res/cfg.json"]),
        ("hf://tiny-org/tiny-saes/res@v9", ["tiny-org/tiny-saes@v9 is not in the Hugging Face cache"]),
        ("hf://tiny-org/absent/res", ["tiny-org/absent@main is not in the Hugging Face cache"]),
    ],
)
def test_bad_hf_names_are_errors_naming_them(cache: Path, name: str, expect: list[str]) -> None:
    with pytest.raises(SAEFormatError) as err:
        hub.resolve_sae(name)
    assert name in str(err.value)
    for text in expect:
        assert text in str(err.value)


def test_collect_by_hub_names_stores_the_pinned_names(
    cache: Path, tmp_path: Path, small_corpus: Path, run_cli: Any
) -> None:
    from autointerp.store import open_store
    from autointerp.store.queries import model_source, sae_origins, sae_path

    db = f"sqlite:///{tmp_path / 'db.sqlite'}"
    args = ["collect", "--db", db, "--model", "tiny-org/tiny-gpt2", "--sae", "hf://tiny-org/tiny-saes/res",
            "--sites", "blocks.1.mlp.post", "--corpus", str(small_corpus), "--tokens", "2000",
            "--batch-size", "8"]  # fmt: skip
    code, out = run_cli(args)
    assert code == 0, out
    store = open_store(db)
    model_id = f"tiny-org/tiny-gpt2@{C1[:12]}"
    assert model_source(store, model_id) == f"tiny-org/tiny-gpt2@{C1}"
    ((sae_id, mid, origin),) = sae_origins(store)
    assert mid == model_id and origin == {"repo": "tiny-org/tiny-saes", "path": "res", "revision": C1}
    assert sae_path(store, sae_id) == f"hf://tiny-org/tiny-saes/res@{C1}"
    store.engine.dispose()


@pytest.mark.parametrize(
    ("flags", "expect"),
    [
        (["--model", "nobody/nothing"], "model 'nobody/nothing': nobody/nothing@main is not in the Hugging Face cache"),
        (["--sae", "hf://tiny-org/tiny-saes/junk"], "no SAE format recognised"),
        (["--sae", "hf://tiny-org/tiny-saes/res@v9"], "tiny-org/tiny-saes@v9 is not in the Hugging Face cache"),
        (["--sae", "saelens:nothing"], "is not saelens:RELEASE/SAE_ID"),
        (["--sae", "saelens:pythia-70m-dedup-res-sm/x"], "no SAELens release 'pythia-70m-dedup-res-sm'; closest:"),
    ],
)
def test_bad_hub_names_exit_2_before_anything_is_written(
    cache: Path, tmp_path: Path, small_corpus: Path, run_cli: Any, flags: list[str], expect: str
) -> None:
    db = tmp_path / "db.sqlite"
    args = ["collect", "--db", f"sqlite:///{db}", "--model", "tiny-org/tiny-gpt2", "--corpus", str(small_corpus),
            "--sites", "blocks.1.mlp.post"]  # fmt: skip
    code, out = run_cli([*args, *flags])
    assert code == 2, out
    assert "error:" in out and expect in " ".join(out.split()) and "Traceback" not in out
    assert not db.exists()


# ----------------------------------------------------------------------------------------------------
# SAELens releases (the registry is SAELens' own; loading and saving are SAELens')

RELEASE, SAE_ID = "pythia-70m-deduped-res-sm", "blocks.0.hook_resid_post"
REPO, FOLDER = "ctigges/pythia-70m-deduped__res-sm_processed", "0-res-sm"


def saelens_files(tmp: Path) -> dict[str, Path | bytes]:
    """What SAELens reads for RELEASE/SAE_ID (its repo's folder FOLDER): a small SAE of the release's d_in, 512."""
    folder = save_sae(small_sae(512, "blocks.0.resid.post"), tmp / "saelens-src")
    cfg = json.loads((folder / "cfg.json").read_text(encoding="utf-8"))
    cfg["model_name"] = "pythia-70m-deduped"
    (folder / "cfg.json").write_text(json.dumps(cfg), encoding="utf-8")
    return dir_files(folder, f"{FOLDER}/")


@pytest.fixture()
def saelens_cache(cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    pytest.importorskip("sae_lens")
    import huggingface_hub.constants

    put_repo(cache, REPO, saelens_files(tmp_path), C1)
    # huggingface_hub read the environment at its import; SAELens' downloads use its value.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_a_saelens_release_is_loaded_by_saelens_and_saved_once(
    saelens_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    got = hub.resolve_sae(f"saelens:{RELEASE}/{SAE_ID}")
    assert got.name == f"saelens:{RELEASE}/{SAE_ID}@{C1}"
    assert got.local == tmp_path / "home" / "saes" / "saelens" / RELEASE / SAE_ID / C1
    assert got.origin == {"release": RELEASE, "sae_id": SAE_ID, "neuronpedia_id": "pythia-70m-deduped/0-res-sm",
                          "repo": REPO, "path": FOLDER, "revision": C1}  # fmt: skip
    sae = load_sae(got.local)  # our SAELens reader, on SAELens' own save
    want = small_sae(512, "blocks.0.resid.post")
    assert sae.cfg.site == "blocks.0.resid.post" and torch.equal(sae.W_enc, want.W_enc)
    # The pinned name never imports SAELens again.
    monkeypatch.setitem(sys.modules, "sae_lens", None)
    monkeypatch.setattr(hub, "_RESOLVED", {})
    assert hub.resolve_sae(got.name).local == got.local


@pytest.mark.parametrize(
    ("name", "expect"),
    [
        (f"saelens:pythia-70m-dedup-res-sm/{SAE_ID}", ["no SAELens release", "closest: pythia-70m-deduped-res-sm"]),
        (f"saelens:{RELEASE}/blocks.0.hook_resid_pots", ["has no SAE", "closest: blocks.0.hook_resid_post"]),
        (f"saelens:{RELEASE}/{SAE_ID}@{C2}", [f"revision {C2} is not in the cache"]),
        (f"saelens:{RELEASE}/blocks.1.hook_resid_post", ["SAELens cannot load it", "HF_HUB_OFFLINE"]),
    ],
)
def test_bad_saelens_names_are_errors_naming_them(saelens_cache: Path, name: str, expect: list[str]) -> None:
    with pytest.raises(SAEFormatError) as err:
        hub.resolve_sae(name)
    assert name in str(err.value)
    for text in expect:
        assert text in str(err.value)


def test_without_the_extra_a_saelens_name_says_how_to_install_it(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sae_lens", None)
    with pytest.raises(SAEFormatError, match=r"pip install 'autointerp\[saelens\]'"):
        hub.resolve_sae(f"saelens:{RELEASE}/{SAE_ID}")


# ----------------------------------------------------------------------------------------------------
# Neuronpedia ids


def test_the_neuronpedia_export_uses_the_release_ids() -> None:
    from autointerp.query.export import neuronpedia_records

    feat = {"model": f"m/x@{C1[:12]}", "site": "blocks.0.resid.post", "source": "abc", "index": 3,
            "explanations": [{"text": "t", "model": None, "explainer": "llm", "scores": []}]}  # fmt: skip
    ids = ({"abc": "0-res-sm"}, {f"m/x@{C1[:12]}": "pythia-70m-deduped"})
    (rec,) = neuronpedia_records(feat, "simulation", None, ids)
    assert (rec["modelId"], rec["layer"], rec["index"]) == ("pythia-70m-deduped", "0-res-sm", "3")
    (plain,) = neuronpedia_records(feat, "simulation", None)
    assert (plain["modelId"], plain["layer"]) == (f"m/x@{C1[:12]}", "0-resid-post-abc")
