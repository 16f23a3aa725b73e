"""`autointerp export` from PostgreSQL: the same records as from SQLite for the same collected and seeded rows, and
every score in the database in the export."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from autointerp.store import open_store
from autointerp.store.engine import Store


def test_same_export_from_postgresql(
    seeded: tuple[Store, dict[str, int]],
    seed: Any,
    export_lines: Any,
    postgres_db: str,
    collect_into: Any,
    tmp_path: Path,
    db_scores: Any,
    exported_scores: Any,
) -> None:
    collect_into(postgres_db, tmp_path)
    pg = open_store(postgres_db)
    seed(pg)

    def comparable(objs: list[dict[str, Any]]) -> list[Any]:
        drop = {"id", "created_at"}
        return [
            {**{k: v for k, v in o.items() if k != "explanations"},
             "explanations": [{k: v for k, v in e.items() if k not in drop | {"scores", "verdict"}}
                              | {"scores": [{k: v for k, v in s.items() if k != "id"} for s in e["scores"]],
                                 "verdict": e["verdict"] and {k: v for k, v in e["verdict"].items() if k not in drop}}
                              for e in o["explanations"]]}
            for o in objs
        ]  # fmt: skip

    a, b = comparable(export_lines(seeded[0])), comparable(export_lines(pg))
    assert a == b
    assert exported_scores(export_lines(pg)) == db_scores(pg)
