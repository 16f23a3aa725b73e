"""What the CLI says of a PostgreSQL database that does not exist: its name, no traceback (a real server,
tests/conftest.py starts one)."""

from __future__ import annotations

from typing import Any


def test_a_postgresql_database_that_does_not_exist_is_named(postgres_server: str, run_cli: Any) -> None:
    url = postgres_server.rsplit("/", 1)[0] + "/no_such_db"
    code, text = run_cli(["features", "list", "--db", url])
    assert code == 2 and "no_such_db" in text and "does not exist" in text and "Traceback" not in text, text
    assert "sqlalche.me" not in text
