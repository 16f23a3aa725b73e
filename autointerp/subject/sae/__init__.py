"""Sparse autoencoders: one torch module (module.py) for every architecture and on-disk format.

specs.py      the registry entry types: ArchSpec (an architecture), DiskFormat (a file format)
registry.py   SAE_ARCHITECTURES: relu.py, topk.py, jumprelu.py, groupmax.py, one activation function each
config.py     SAEConfig, SAEFormatError, site-name helpers
module.py     SAE (encode / decode / forward / encode_sparse), tensor checks
saelens.py    SAELens cfg.json + sae_weights.safetensors: parse, load, save (save_sae always writes this)
sparsify.py   EleutherAI sparsify hookpoint folders (cfg.json + sae.safetensors): hookpoint -> site, load
gemmascope.py Gemma Scope params.npz folders (site from the path: res / mlp / att SAEs, transcoders)
gemmascope2.py Gemma Scope 2 config.json + params.safetensors (Hugging Face module paths, affine skip)
circuit_tracer.py circuit-tracer transcoder sets and cross-layer transcoders (config.yaml, one part per layer)
formats.py    FORMATS, load_sae (detects the format), sae_dirs / load_saes / sae_parts (folders of several), stable_id

Transcoders are SAE modules whose cfg has write_sites (and d_out, skip): they encode their read site like an SAE
and decode into their write site(s); see module.py.
"""

from autointerp.subject.sae.config import (
    Normalization,
    SAEConfig,
    SAEFormatError,
    site_to_tl_hook,
    tl_hook_to_site,
)
from autointerp.subject.sae.formats import FORMATS, format_of, load_sae, load_saes, sae_dirs, sae_parts, stable_id
from autointerp.subject.sae.module import SAE
from autointerp.subject.sae.registry import SAE_ARCHITECTURES, SAEArchitecture
from autointerp.subject.sae.saelens import CFG_FILE, WEIGHTS_FILE, parse_sae_cfg, sae_cfg_dict, save_sae
from autointerp.subject.sae.sparsify import hookpoint_site, parse_sparsify_cfg
from autointerp.subject.sae.specs import ArchSpec, DiskFormat

__all__ = [
    "CFG_FILE",
    "FORMATS",
    "SAE",
    "SAE_ARCHITECTURES",
    "WEIGHTS_FILE",
    "ArchSpec",
    "DiskFormat",
    "Normalization",
    "SAEArchitecture",
    "SAEConfig",
    "SAEFormatError",
    "format_of",
    "hookpoint_site",
    "load_sae",
    "load_saes",
    "parse_sae_cfg",
    "parse_sparsify_cfg",
    "sae_cfg_dict",
    "sae_dirs",
    "sae_parts",
    "save_sae",
    "site_to_tl_hook",
    "stable_id",
    "tl_hook_to_site",
]
