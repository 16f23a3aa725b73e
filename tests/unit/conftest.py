"""Unit tests: fakes and tiny modules, no server, no real model, so the folder runs fast. The rule holds by
construction: here the fixtures that start PostgreSQL or load SmolLM2 fail, and while a unit test runs (its setup,
call and teardown, session fixtures included) the loader of model files refuses SmolLM2, the default model: whether
through load_subject, the local LLM backend or materialize itself. SmolLM2's tokenizer alone is allowed (the tiny
GPT-2 and `smol_tokenizer_dir` carry it); its weights are not. A test that needs the server or the model belongs in
tests/integration. Plus the fixtures only unit tests share: golden prompt files and the pooled correlation's
reference computation."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

NO_SERVER = "unit tests use no server (PostgreSQL): move this test to tests/integration"
NO_MODEL = "unit tests use no real model (SmolLM2's weights): move this test to tests/integration"
GOLDEN = Path(__file__).parents[1] / "golden"

# True while a unit test's setup, call or teardown runs. These hooks are called for the items of this folder only,
# so a test of tests/integration run in the same session (before or after) loads what it likes.
_in_unit_test = False


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:  # noqa: ARG001
    global _in_unit_test
    _guard_the_model_loader()
    _in_unit_test = True
    return (yield)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:  # noqa: ARG001
    global _in_unit_test
    try:
        return (yield)
    finally:
        _in_unit_test = False


def _is_default_model(resolved: Any) -> bool:
    from autointerp.subject.files import DEFAULT_MODEL, converted_dir, resolve

    if resolved.name == DEFAULT_MODEL:
        return True
    try:  # its converted copy, named by its path
        return bool(resolved.path.resolve() == converted_dir(resolve(DEFAULT_MODEL)).resolve())
    except Exception:  # noqa: BLE001 (the model package is missing: nothing to guard)
        return False


def _guard_the_model_loader() -> None:
    """Wrap materialize, which every load of a model's weights goes through (load_subject, the local LLM backend,
    the run estimate), once per session: a unit test that asks it for SmolLM2 fails. The wrapper stays for the
    session and only bites while a unit test runs; model.py binds materialize at import, so its name is wrapped
    too (or binds the wrapper when imported later)."""
    import sys

    from autointerp.subject import files

    if getattr(files.materialize, "unit_guard", False):
        return
    original = files.materialize

    def materialize(resolved: Any) -> Path:
        if _in_unit_test and _is_default_model(resolved):
            pytest.fail(f"{NO_MODEL} (it loads {resolved.name} from {resolved.path})", pytrace=False)
        return original(resolved)

    materialize.unit_guard = True  # type: ignore[attr-defined]
    files.materialize = materialize  # type: ignore[assignment]
    model = sys.modules.get("autointerp.subject.model")
    if model is not None and getattr(model, "materialize", None) is original:
        model.materialize = materialize  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def postgres_server() -> str:
    pytest.fail(NO_SERVER, pytrace=False)


@pytest.fixture(scope="session")
def smol_dir() -> Path:
    pytest.fail(f"{NO_MODEL} (smol_dir; for SmolLM2's tokenizer alone use smol_tokenizer_dir)", pytrace=False)


@pytest.fixture(scope="session")
def smol_subject() -> Any:
    pytest.fail(f"{NO_MODEL} (smol_subject; a tiny model: tiny_subject)", pytrace=False)


def _golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("AUTOINTERP_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert text == path.read_text(encoding="utf-8"), f"rendered prompt differs from {path}"


@pytest.fixture(scope="session")
def golden() -> Callable[[str, str], None]:
    """golden(name, text): the rendered prompt `text` equals tests/golden/NAME (AUTOINTERP_UPDATE_GOLDEN=1 rewrites
    the file instead)."""
    return _golden


def _pooled_reference(
    real: list[np.ndarray], pred: list[np.ndarray], *, n_boot: int, seed: int, alpha: float = 0.05
) -> tuple[float, float, float, int]:
    x, y = np.concatenate(real), np.concatenate(pred)
    r = float(np.corrcoef(x, y)[0, 1])
    n = len(real)
    counts = np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=n_boot)
    boots = []
    for c in counts:
        xs = np.concatenate([np.tile(a, k) for a, k in zip(real, c, strict=True)])
        ys = np.concatenate([np.tile(b, k) for b, k in zip(pred, c, strict=True)])
        if np.ptp(xs) > 0 and np.ptp(ys) > 0:
            boots.append(np.corrcoef(xs, ys)[0, 1])
    q_lo, q_hi = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
    return r, max(-1.0, min(float(q_lo), r)), min(1.0, max(float(q_hi), r)), len(boots)


@pytest.fixture(scope="session")
def pooled_reference() -> Callable[..., tuple[float, float, float, int]]:
    """pooled_reference(real, pred, *, n_boot, seed, alpha=0.05) -> (r, ci_low, ci_high, usable resamples): the
    pooled Pearson r and its record-bootstrap interval computed directly: np.corrcoef over the tokens of the
    resampled records (each repeated as often as drawn), resamples with a constant side dropped, percentiles
    widened to contain r. Coupled to the metric's draw only: one multinomial of record counts per resample."""
    return _pooled_reference
