#!/usr/bin/env bash
# Idempotently build a CPU-only venv with EleutherAI delphi (eai-delphi 0.1.3) at
# bench/.venv-delphi, for bench/delphi_worker.py.
#
# eai-delphi declares vllm (and through it a multi-GB CUDA torch) as a dependency, so it
# is installed with --no-deps next to the CPU torch and only the packages that
# `delphi.latents` (LatentCache, LatentDataset, constructor, sampler) needs to import
# and run on CPU. Every install command repeats the torch pin so nothing can pull a
# CUDA build.
#
# Usage: bash bench/setup_delphi.sh        (rerun is a no-op once the stamp exists
#                                           and the import check passes)
#        FORCE=1 bash bench/setup_delphi.sh (reinstall into the existing venv)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$HERE/.venv-delphi"
PY="${PYTHON:-python3}"
TORCH_PIN="torch==2.13.0"
DELPHI_PIN="eai-delphi==0.1.3"
STAMP="$VENV/.stamp-delphi-0.1.3-torch-2.13.0"
# Minimal working set for `from delphi.latents import ...` + LatentCache/LatentDataset on
# CPU (found by trial; fire, flask, datasets, aiofiles, beartype, eai-sparsify, vllm and
# bitsandbytes are not needed for this path).
DEPS=(transformers safetensors numpy tqdm jaxtyping orjson blobfile asyncer anyio
      simple_parsing faiss-cpu sentence_transformers)

check() {
    "$VENV/bin/python" - <<'EOF'
import torch, delphi
from delphi.latents import LatentCache, LatentDataset, constructor, sampler  # noqa: F401
from delphi.config import CacheConfig, ConstructorConfig, SamplerConfig  # noqa: F401
assert delphi.__version__ == "0.1.3", delphi.__version__
assert torch.version.cuda is None, f"CUDA torch installed: {torch.__version__}"
print(f"delphi {delphi.__version__} torch {torch.__version__} OK")
EOF
}

if [[ -z "${FORCE:-}" && -f "$STAMP" && -x "$VENV/bin/python" ]] && check; then
    echo "setup_delphi: already set up ($VENV)"
    exit 0
fi

rm -f "$STAMP"
if [[ ! -x "$VENV/bin/python" ]]; then
    echo "setup_delphi: creating venv $VENV"
    "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
# pip prints one "Location ... is ignored" warning per missing local index entry; hide them.
quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

echo "setup_delphi: installing $TORCH_PIN (CPU)"
quiet "${PIP[@]}" "$TORCH_PIN"
echo "setup_delphi: installing $DELPHI_PIN --no-deps"
quiet "${PIP[@]}" --no-deps "$DELPHI_PIN"
echo "setup_delphi: installing deps: ${DEPS[*]}"
quiet "${PIP[@]}" "$TORCH_PIN" "${DEPS[@]}"

if "$VENV/bin/python" -m pip list 2>/dev/null | grep -iE '^(nvidia-|triton |vllm )'; then
    echo "setup_delphi: ERROR: CUDA/vllm packages ended up in $VENV" >&2
    exit 1
fi
check
touch "$STAMP"
echo "setup_delphi: done ($VENV)"
