"""Bad input on the command line: a clear message that names the input, exit code 2, no traceback, and nothing
written. Each row of the README's bad-input table that the CLI answers is one case here."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture()
def files(tmp_path: Path) -> dict[str, Path]:
    bad_syntax = tmp_path / "syntax.toml"
    bad_syntax.write_text('db = "sqlite:///x.sqlite"\n[collect\nsites = 1\n', encoding="utf-8")
    bad_type = tmp_path / "type.toml"
    bad_type.write_text("[collect]\nbatch_size = 'lots'\n", encoding="utf-8")
    typo = tmp_path / "typo.toml"
    typo.write_text("[explain]\nlimt = 3\n", encoding="utf-8")
    empty = tmp_path / "empty-corpus"
    empty.mkdir()
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes('db = "caf\xe9"\n'.encode("latin-1"))
    section = tmp_path / "section.toml"
    section.write_text("explain = 5\n", encoding="utf-8")
    return {"syntax": bad_syntax, "type": bad_type, "typo": typo, "empty": empty, "missing": tmp_path / "nope.toml",
            "latin1": latin1, "section": section}  # fmt: skip


@pytest.mark.parametrize(
    ("case", "args", "expect"),
    [
        ("missing config", ["features", "list", "--config", "{missing}"], ["config file", "nope.toml", "not found"]),
        ("TOML syntax", ["features", "list", "--config", "{syntax}"], ["syntax.toml", "is not valid TOML", "line 2"]),
        ("TOML type", ["features", "list", "--config", "{type}"], ["collect.batch_size", "'lots'"]),
        ("TOML typo", ["features", "list", "--config", "{typo}"], ["explain.limt", "unknown key"]),
        ("config directory", ["features", "list", "--config", "{empty}"], ["empty-corpus", "is a directory"]),
        ("config not UTF-8", ["features", "list", "--config", "{latin1}"], ["latin1.toml", "not UTF-8 text (byte 9)"]),
        ("config a device", ["features", "list", "--config", "/dev/zero"], ["/dev/zero", "is a device"]),
        ("section not a table", ["explain", "--config", "{section}", "--limit", "3"], ["explain: must be a table"]),
        (
            "a URI file name",
            ["features", "list", "--db", "sqlite:///file:/tmp/x.sqlite?mode=rwc&uri=true"],
            ["URI file names (file:...) are not supported"],
        ),
        ("huge limit", ["features", "list", "--db", "{db}", "--limit", "99999999999999999999"], ["limit must be"]),
        ("unknown LLM", ["explain", "--db", "{db}", "--llm", "nosuch"], ["no LLM named 'nosuch'", "[llm.nosuch]"]),
        ("empty corpus", ["collect", "--db", "{db}", "--corpus", "{empty}"], ["empty-corpus", "holds no"]),
        ("unique suffix", ["features", "show", "neurons/1", "--db", "{db}"], []),  # not an error: shows it
        ("unknown id", ["features", "show", "neurons/99999", "--db", "{db}"], ["no feature 'neurons/99999'"]),
    ],
)
def test_bad_input_gets_a_clear_error(
    case: str,
    args: list[str],
    expect: list[str],
    files: dict[str, Path],
    collected_db: str,
    run_cli: Any,
) -> None:
    values = {k: str(v) for k, v in files.items()} | {"db": collected_db}
    code, text = run_cli([a.format(**values) for a in args])
    if not expect:
        assert code == 0, text
        return
    assert code == 2, (case, text)
    assert "Traceback" not in text and "errors.pydantic.dev" not in text, text
    for fragment in expect:
        assert fragment in text, (case, fragment, text)


def test_an_ambiguous_suffix_names_the_candidates(collected_db: str, run_cli: Any) -> None:
    from sqlmodel import select

    from autointerp.store import open_store
    from autointerp.store.tables import Feature

    store = open_store(collected_db)
    with store.session() as s:  # a second source with the same index: "neurons/1" stays unique, "1" does not
        f = s.exec(select(Feature).where(Feature.index == 1)).one()
        twin = Feature(**(f.model_dump(exclude={"id", "key", "source"}) | {"source": "sae-x"}))
        twin.key = f.key.replace("/neurons/", "/sae-x/")
        s.add(twin)
        s.commit()
    code, text = run_cli(["features", "show", "1", "--db", collected_db])
    assert code == 2 and "feature id '1' is ambiguous" in text and "give more of the id" in text, text
    assert "/neurons/1" in text and "/sae-x/1" in text
    code, text = run_cli(["features", "show", "neurons/1", "--db", collected_db, "--json"])
    assert code == 0 and '"source": "neurons"' in text


def test_a_bare_number_is_an_index_not_a_row_id(collected_db: str, run_cli: Any) -> None:
    # The collected database has one source, so "12" names exactly neurons/12 (row 12 is neurons/11).
    code, text = run_cli(["features", "show", "12", "--db", collected_db, "--json"])
    assert code == 0, text
    assert '"index": 12' in text and "/neurons/12" in text


def test_postgres_without_its_driver_says_how_to_get_it(run_cli: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("psycopg", "psycopg_binary", "psycopg2"):
        monkeypatch.setitem(sys.modules, name, None)  # an import of it now fails as if it were not installed
    code, text = run_cli(["features", "list", "--db", "postgresql://me:secret@127.0.0.1:1/x"])
    assert code == 2 and "PostgreSQL needs its driver" in text and "autointerp[postgres]" in text, text
    assert "secret" not in text and "Traceback" not in text
