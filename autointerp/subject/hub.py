"""Names of models and SAEs on the Hugging Face hub, resolved to local folders through the hub's own cache.

- `ORG/NAME[@REVISION]`: a model repo (when no file or directory of that name exists: an existing path wins). Its
  files come from the standard Hugging Face cache (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub),
  downloaded there unless HF_HUB_OFFLINE=1. Stored as `ORG/NAME@<first 12 hex of the commit>`, loaded again by
  `ORG/NAME@<commit>`: two revisions never share a model id.
- `hf://ORG/REPO/PATH[@REVISION]`: the folder PATH of a repo (only its files are fetched), in a format that
  autointerp reads natively (subject.sae FORMATS). Stored pinned to its commit: `hf://ORG/REPO/PATH@<commit>`.
- `saelens:RELEASE/SAE_ID[@REVISION]`: an SAE of SAELens' release registry (the extra `autointerp[saelens]`),
  loaded once by SAELens' own loader (through the same hub cache) and saved by SAELens' own save into
  cache_home()/saes/saelens/RELEASE/SAE_ID/<commit>, a SAELens folder our reader loads; the release, id, repo,
  commit and Neuronpedia id are kept beside it (ORIGIN_FILE). Stored pinned: `saelens:RELEASE/SAE_ID@<commit>`.

Module level is standard library only: config validates the names' shape with it, torch-free.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

HF_SCHEME = "hf://"
SAELENS_SCHEME = "saelens:"
ORIGIN_FILE = "autointerp-origin.json"
# Files of a model repo that loading needs (weights, configs, tokenizer); not other formats' copies of the weights.
MODEL_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt"]
_PART = r"[A-Za-z0-9][A-Za-z0-9_.-]*"
_MODEL_ID = re.compile(rf"({_PART}/{_PART})(?:@([^@\s]+))?")
_COMMIT = re.compile(r"[0-9a-f]{40}")


# ----------------------------------------------------------------------------------------------------
# Names (shape only)


def model_id_parts(spec: str) -> tuple[str, str | None] | None:
    """(repo, revision) of a Hugging Face model id `ORG/NAME[@REVISION]`, or None when `spec` has not that shape."""
    m = _MODEL_ID.fullmatch(spec)
    if m is None or ".." in spec or spec.startswith("."):
        return None
    return m.group(1), m.group(2)


def is_hub_sae(path: str) -> bool:
    return path.startswith((HF_SCHEME, SAELENS_SCHEME))


def _split_rev(rest: str) -> tuple[str, str | None]:
    body, at, rev = rest.rpartition("@")
    return (body, rev) if at and rev and "/" not in rev else (rest, None)


def hf_parts(name: str) -> tuple[str, str, str | None]:
    """(repo, path, revision) of `hf://ORG/REPO/PATH[@REVISION]`; ValueError naming it when malformed."""
    body, rev = _split_rev(name.removeprefix(HF_SCHEME))
    parts = body.strip("/").split("/")
    if len(parts) < 2 or model_id_parts("/".join(parts[:2])) is None or any(p in ("", ".", "..") for p in parts):
        raise ValueError(
            f"{name!r} is not hf://ORG/REPO/PATH[@REVISION] (e.g. hf://google/gemma-scope-2b-pt-res/layer_12)"
        )
    return "/".join(parts[:2]), "/".join(parts[2:]), rev


def saelens_parts(name: str) -> tuple[str, str, str | None]:
    """(release, sae_id, revision) of `saelens:RELEASE/SAE_ID[@REVISION]` (the id may hold slashes)."""
    body, rev = _split_rev(name.removeprefix(SAELENS_SCHEME))
    release, _, sae_id = body.partition("/")
    if not release or not sae_id:
        raise ValueError(
            f"{name!r} is not saelens:RELEASE/SAE_ID "
            "(e.g. saelens:gemma-scope-2b-pt-res-canonical/layer_12/width_16k/canonical)"
        )
    return release, sae_id, rev


def check_sae_name(path: str) -> str:
    """A config's SAE path: a hub name must be well formed (ValueError naming it); other paths pass as they are."""
    if path.startswith(HF_SCHEME):
        hf_parts(path)
    elif path.startswith(SAELENS_SCHEME):
        saelens_parts(path)
    return path


# ----------------------------------------------------------------------------------------------------
# The hub cache


def hub_cache() -> Path:
    """The Hugging Face hub cache, as huggingface_hub finds it, read from the environment now (huggingface_hub
    reads it once, at its import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "huggingface"
    return Path(home).expanduser() / "hub"


def offline() -> bool:
    return any(
        os.environ.get(k, "").upper() in ("1", "ON", "YES", "TRUE") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _repo_dir(repo: str, cache: Path) -> Path:
    return cache / f"models--{repo.replace('/', '--')}"


def _pinned(repo: str, rev: str | None, cache: Path, need: str) -> Path | None:
    """The cached snapshot of a full commit hash that holds `need`, found without asking the hub (a commit's files
    never change)."""
    if rev is None or not _COMMIT.fullmatch(rev):
        return None
    snap = _repo_dir(repo, cache) / "snapshots" / rev
    return snap if (snap / need).exists() else None


def snapshot(
    repo: str, rev: str | None, patterns: list[str] | None, what: str, error: type[Exception], need: str = "."
) -> Path:
    """The snapshot folder of `repo` at `rev` (default main) in the hub cache, holding the files of `patterns`
    (downloaded unless offline; a commit whose `need` is cached is taken as it is). Every failure is `error`
    naming `what`, the revision and the cache."""
    cache = hub_cache()
    pinned = _pinned(repo, rev, cache, need)
    if pinned is not None:
        return pinned
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = f"{repo}@{rev or 'main'}"
    try:
        path = snapshot_download(
            repo, revision=rev, cache_dir=cache, allow_patterns=patterns, local_files_only=offline()
        )
    except LocalEntryNotFoundError:
        how = "HF_HUB_OFFLINE is set" if offline() else "the hub could not be reached"
        raise error(f"{what}: {at} is not in the Hugging Face cache {cache} and {how}") from None
    except GatedRepoError:
        raise error(f"{what}: {repo} is gated: accept its terms on huggingface.co and log in (hf auth login)") from None
    except RepositoryNotFoundError:
        raise error(f"{what}: no Hugging Face repo {repo} (or it is private: log in with hf auth login)") from None
    except RevisionNotFoundError:
        raise error(f"{what}: repo {repo} has no revision {rev!r}") from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise error(f"{what}: cannot fetch {at} into {cache}: {exc}") from None
    return Path(path)


# ----------------------------------------------------------------------------------------------------
# Models


@dataclass(frozen=True)
class HubModel:
    name: str  # stored model id: ORG/NAME@<12 hex>
    path: Path  # the snapshot directory
    source: str  # what loads it again: ORG/NAME@<commit>


def resolve_model(spec: str) -> HubModel:
    """A Hugging Face model id as its cached snapshot (fetched unless offline); ModelLoadError naming the id."""
    from autointerp.subject.files import ModelLoadError

    parts = model_id_parts(spec)
    if parts is None:
        raise ModelLoadError(f"model {spec!r} is not a Hugging Face id ORG/NAME[@REVISION]")
    repo, rev = parts
    snap = snapshot(repo, rev, MODEL_FILES, f"model {spec!r}", ModelLoadError, need="config.json")
    if not any(snap.glob("*.safetensors")) and not offline():  # older repos ship PyTorch weights only
        snap = snapshot(repo, rev, [*MODEL_FILES, "*.bin"], f"model {spec!r}", ModelLoadError)
    missing = _missing_model_files(snap)
    if missing:
        how = " (HF_HUB_OFFLINE is set: nothing is fetched)" if offline() else ""
        raise ModelLoadError(
            f"model {spec!r}: the Hugging Face cache {snap} lacks {missing}{how} (files there: {_listing(snap)})"
        )
    commit = snap.name
    return HubModel(f"{repo}@{commit[:12]}", snap, f"{repo}@{commit}")


def _missing_model_files(snap: Path) -> str | None:
    """What a snapshot lacks for transformers to load it (checked before anything is written, not at load)."""
    if not (snap / "config.json").is_file():
        return "config.json"
    for index in (*snap.glob("*.safetensors.index.json"), *snap.glob("*.bin.index.json")):
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError):
            return f"a readable {index.name}"
        lost = sorted(f for f in shards if not (snap / f).is_file())  # a link to a missing blob is not a file
        if lost:
            return f"the weight shards {', '.join(lost)}"
    if not any(p.is_file() for pattern in ("*.safetensors", "*.bin") for p in snap.glob(pattern)):
        return "the weights (*.safetensors)"
    return None


# ----------------------------------------------------------------------------------------------------
# SAEs


@dataclass(frozen=True)
class HubSAE:
    name: str
    """The name pinned to the commit resolved (what the store keeps)."""
    local: Path
    """The folder the native loaders read."""
    origin: dict[str, Any] = field(default_factory=dict)
    """Where it came from (repo, path, revision; for SAELens: release, sae_id, neuronpedia_id)."""


def _sae_error(message: str) -> NoReturn:
    from autointerp.subject.sae.config import SAEFormatError

    raise SAEFormatError(message)


def _listing(root: Path, limit: int = 12) -> str:
    try:
        files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    except OSError:
        files = []
    if not files:
        return "none"
    return ", ".join(files[:limit]) + (f", ... ({len(files)} in all)" if len(files) > limit else "")


def _check_format(name: str, local: Path) -> None:
    """A folder that some native format reads: one SAE, or a folder of several (else the files seen are listed)."""
    from autointerp.subject.sae.formats import FORMATS, sae_dirs

    if any(f.is_own(local) for f in FORMATS.values()) or sae_dirs(local) != [local]:
        return
    layouts = "; ".join(f.layout for f in FORMATS.values())
    _sae_error(f"{name}: no SAE format recognised in {local} (files seen: {_listing(local)}; expected {layouts})")


def _resolve_hf(name: str) -> HubSAE:
    from autointerp.subject.sae.config import SAEFormatError

    try:
        repo, path, rev = hf_parts(name)
    except ValueError as exc:
        _sae_error(str(exc))
    snap = snapshot(repo, rev, [f"{path}/*"] if path else None, name, SAEFormatError, need=path or ".")
    local = snap / path
    if not local.is_dir():
        _sae_error(f"{name}: {repo}@{snap.name[:12]} has no folder {path!r} (files in the cache: {_listing(snap)})")
    _check_format(name, local)
    pinned = f"{HF_SCHEME}{repo}/{path}@{snap.name}" if path else f"{HF_SCHEME}{repo}@{snap.name}"
    return HubSAE(pinned, local, {"repo": repo, "path": path, "revision": snap.name})


def _closest(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=5, cutoff=0.5) or sorted(options)[:5]
    return ", ".join(close)


def _saelens_folder(release: str, sae_id: str, rev: str) -> Path:
    from autointerp.subject.files import cache_home

    safe = re.compile(r"[^A-Za-z0-9_.=-]")
    return cache_home() / "saes" / "saelens" / safe.sub("_", release) / safe.sub("_", sae_id).strip(".") / rev


def _converted(folder: Path) -> HubSAE | None:
    try:
        origin = json.loads((folder / ORIGIN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    name = f"{SAELENS_SCHEME}{origin['release']}/{origin['sae_id']}@{origin['revision']}"
    return HubSAE(name, folder, origin)


def _resolve_saelens(name: str) -> HubSAE:
    try:
        release, sae_id, rev = saelens_parts(name)
    except ValueError as exc:
        _sae_error(str(exc))
    if rev is not None and (done := _converted(_saelens_folder(release, sae_id, rev))) is not None:
        return done  # converted before: SAELens is not even imported
    try:  # the extra, imported only here: it brings transformer-lens, datasets and wandb
        from sae_lens import SAE
        from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory
    except ImportError:
        _sae_error(f"{name}: SAELens releases need the SAELens extra: pip install 'autointerp[saelens]'")
    releases = get_pretrained_saes_directory()
    if release not in releases:
        _sae_error(f"{name}: no SAELens release {release!r}; closest: {_closest(release, list(releases))}")
    entry = releases[release]
    if sae_id not in entry.saes_map:
        ids = list(entry.saes_map)
        _sae_error(f"{name}: release {release} has no SAE {sae_id!r}; closest: {_closest(sae_id, ids)}")
    cache = hub_cache()
    refs = _repo_dir(entry.repo_id, cache) / "refs" / "main"

    def cached_main() -> str | None:
        try:
            return refs.read_text(encoding="utf-8").strip() or None
        except OSError:
            return None

    # Online, SAELens' download moves refs/main to the hub's newest commit, so the revision is read after it.
    known = cached_main() if offline() else None
    if known is not None and rev in (None, known) and (done := _converted(_saelens_folder(release, sae_id, known))):
        return done
    try:
        sae = SAE.from_pretrained(release, sae_id, device="cpu", dtype="float32")
    except Exception as exc:  # noqa: BLE001 (SAELens' loaders raise what their hub calls raise)
        how = " (HF_HUB_OFFLINE is set: its files must be in the cache)" if offline() else ""
        _sae_error(f"{name}: SAELens cannot load it from {entry.repo_id} (cache {cache}){how}: {exc}")
    commit = cached_main()
    if commit is None:
        _sae_error(f"{name}: SAELens loaded it but {refs} names no commit")
    if rev is not None and rev != commit:
        _sae_error(f"{name}: revision {rev} is not in the cache (SAELens loads {entry.repo_id} at main, now {commit})")
    folder = _saelens_folder(release, sae_id, commit)
    if (done := _converted(folder)) is not None:
        return done
    origin = {
        "release": release,
        "sae_id": sae_id,
        "neuronpedia_id": entry.neuronpedia_id.get(sae_id),
        "repo": entry.repo_id,
        "path": entry.saes_map[sae_id],
        "revision": commit,
    }
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=folder.parent))
    try:
        sae.save_model(tmp)
        (tmp / ORIGIN_FILE).write_text(json.dumps(origin, indent=1), encoding="utf-8")
        try:
            os.replace(tmp, folder)  # atomic: never a half-written folder
        except OSError:
            if _converted(folder) is None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    done = _converted(folder)
    assert done is not None
    return done


# Resolved names of this process, by name and caches: the check before a command and its loads see one revision,
# and SAELens loads a release once (online, each resolution of an unpinned name would ask the hub again).
_RESOLVED: dict[tuple[str, str, str], HubSAE] = {}


def resolve_sae(name: str) -> HubSAE:
    """An `hf://` or `saelens:` name as its local folder, fetched (and for SAELens converted) once; every failure
    an SAEFormatError naming it."""
    from autointerp.subject.files import cache_home

    key = (name, str(hub_cache()), str(cache_home()))
    if key in _RESOLVED and _RESOLVED[key].local.is_dir():
        return _RESOLVED[key]
    if name.startswith(HF_SCHEME):
        found = _resolve_hf(name)
    elif name.startswith(SAELENS_SCHEME):
        found = _resolve_saelens(name)
    else:
        _sae_error(f"{name!r} is not an hf:// or saelens: name")
    _RESOLVED[key] = found
    return found


def local_sae_dir(path: str) -> Path:
    """Where the SAE (or folder of SAEs) a config names lies on disk: a hub name resolved, any other path as given."""
    return resolve_sae(path).local if is_hub_sae(path) else Path(path).expanduser()


def sae_name(spec_path: str, base: Path, root: Path) -> str:
    """The name to store for SAE directory `root`, found under `base` = local_sae_dir(spec_path): a local directory
    as found, a hub SAE as its pinned name (a subfolder of an hf:// folder of several named by its own path)."""
    if not is_hub_sae(spec_path):
        return str(root)
    pinned = resolve_sae(spec_path).name
    rel = root.relative_to(base).as_posix()
    if rel == ".":
        return pinned
    body, rev = _split_rev(pinned)
    return f"{body.rstrip('/')}/{rel}" + (f"@{rev}" if rev else "")


def sae_origin(name: str) -> dict[str, Any]:
    """What the store keeps of a hub SAE's origin (empty for a local directory)."""
    return dict(resolve_sae(name).origin) if is_hub_sae(name) else {}
