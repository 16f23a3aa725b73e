"""Work units and their leases: how several workers share one database without doing a unit twice.

A unit is (stage, identity, feature): a feature for one explainer, scorer set or judge identity (the identity is a
hash of what keys the stage's result rows). `autointerp run` registers the pending units of every stage it runs;
workers then claim them in short transactions and hold them under a lease (worker, expiry, heartbeat):
- PostgreSQL: `SELECT ... FOR UPDATE SKIP LOCKED`, so concurrent claims pass each other without waiting;
- SQLite: one `BEGIN IMMEDIATE` transaction (the database's single writer lock, WAL mode, busy timeout), held for
  the few milliseconds of the claim.
A unit is claimable when it is pending, or leased under an expired lease (its worker died), and when every unit of
the same feature that it requires (the earlier stages of the job) is finished, so features flow through the
stages. A finished unit keeps the outcome of its rows (ok / failed / skipped) for `autointerp status`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, func, text, tuple_, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select

from autointerp.store.dialect import Dialect
from autointerp.store.engine import Store
from autointerp.store.tables import Unit, utcnow
from autointerp.store.upsert import insert_missing

PENDING, LEASED, DONE = "pending", "leased", "done"

__all__ = ["Unit"]


def _aware(t: datetime) -> datetime:
    """SQLite hands timestamps back without their zone (they were written in UTC)."""
    return t if t.tzinfo is not None else t.replace(tzinfo=utcnow().tzinfo)


@dataclass(frozen=True)
class Claimed:
    id: int
    feature_id: int


def register_units(store: Store, stage: str, identity: str, pending: Sequence[int], finished: Sequence[int],
                   since: datetime | None = None) -> None:  # fmt: skip
    """Record a stage's units for one identity: `pending` feature ids (in claim order) and those already finished.

    Idempotent and safe beside running workers: a unit another worker holds is left alone; a unit that is done
    but whose rows the stage now counts as pending (a failure to retry) becomes pending again, unless it is held
    or it was finished after `since` (when the caller read the rows: another worker finished it meanwhile).
    Two workers planning at once: one transaction at a time on SQLite; on PostgreSQL the loser of an insert race
    retries and finds the winner's rows.
    """
    for attempt in range(5):
        try:
            _register(store, stage, identity, pending, finished, since)
            return
        except IntegrityError:
            if attempt == 4:
                raise


def _register(store: Store, stage: str, identity: str, pending: Sequence[int], finished: Sequence[int],
              since: datetime | None) -> None:  # fmt: skip
    now = utcnow()
    with store.session() as s:
        store.dialect.begin_write(s.connection())  # it reads, then writes
        have = {u.feature_id: u for u in s.exec(select(Unit).where(Unit.stage == stage, Unit.identity == identity))}
        for rank, fid in enumerate(pending):
            u = have.get(fid)
            if u is None:
                s.add(Unit(stage=stage, identity=identity, feature_id=fid, rank=rank, updated_at=now))
            elif u.status == DONE and (since is None or _aware(u.updated_at) < since):
                u.status, u.outcome, u.rank, u.updated_at = PENDING, None, rank, now
                s.add(u)
        for fid in finished:
            u = have.get(fid)
            if u is None:
                s.add(Unit(stage=stage, identity=identity, feature_id=fid, rank=-1, status=DONE, outcome="ok",
                           updated_at=now))  # fmt: skip
            elif u.status == PENDING:
                u.status, u.outcome, u.updated_at = DONE, "ok", now
                s.add(u)
        s.commit()


def _claim_sql(requires: Sequence[tuple[str, str]], dialect: Dialect) -> tuple[str, dict[str, Any]]:
    """The claimable units of a stage, in claim order, as SQL text: the claim runs once per chunk of every stage,
    and building the same statement with the expression language cost more than running it."""
    sql = ("SELECT u.id, u.feature_id FROM unit u WHERE u.stage = :stage AND u.identity = :identity AND "
           "(u.status = 'pending' OR (u.status = 'leased' AND u.lease_expires_at < :now))")  # fmt: skip
    params: dict[str, Any] = {}
    if requires:  # a unit this one requires, of the same feature, is not finished yet
        pairs = " OR ".join(f"(b.stage = :rs{k} AND b.identity = :ri{k})" for k in range(len(requires)))
        sql += (
            " AND NOT EXISTS (SELECT 1 FROM unit b WHERE b.feature_id = u.feature_id AND b.status <> 'done' "
            f"AND ({pairs}))"
        )
        for k, (stage, ident) in enumerate(requires):
            params[f"rs{k}"], params[f"ri{k}"] = stage, ident
    return sql + " ORDER BY u.rank LIMIT :n" + dialect.skip_locked("u"), params


_WHEN = Unit.__table__.c.lease_expires_at.type  # type: ignore[attr-defined]  # how the store writes times


def claim(store: Store, stage: str, identity: str, worker: str, n: int, lease_s: float, *,
          requires: Sequence[tuple[str, str]] = (), run_id: int | None = None) -> list[Claimed]:  # fmt: skip
    """Lease up to `n` claimable units of a stage to `worker`, in claim order: pending or under an expired lease,
    with every unit of the same feature in `requires` (stage, identity) finished; none that another worker holds."""
    now = utcnow()
    dialect = store.dialect
    sql, params = _claim_sql(requires, dialect)
    params |= {"stage": stage, "identity": identity, "n": n}
    pick = text(sql).bindparams(bindparam("now", type_=_WHEN))
    lease = text(
        "UPDATE unit SET status = 'leased', worker = :worker, lease_expires_at = :expires, heartbeat_at = :now, "
        "attempts = attempts + 1, run_id = :run_id, updated_at = :now WHERE id IN :ids"
    ).bindparams(bindparam("now", type_=_WHEN), bindparam("expires", type_=_WHEN), bindparam("ids", expanding=True))
    with store.engine.connect() as conn:
        if not dialect.row_locks:
            # Look first without the write lock: a stage with nothing claimable (the runner asks the later stages
            # first) then costs a read, not a write transaction that waits for and blocks every other worker.
            if conn.execute(pick, {**params, "now": now, "n": 1}).first() is None:
                conn.rollback()
                return []
            conn.rollback()
            dialect.begin_write(conn)
        rows = conn.execute(pick, {**params, "now": now}).all()
        if rows:
            conn.execute(lease, {"worker": worker, "expires": now + timedelta(seconds=lease_s), "now": now,
                                 "run_id": run_id, "ids": [int(r[0]) for r in rows]})  # fmt: skip
        conn.commit()
    return [Claimed(int(r[0]), int(r[1])) for r in rows]


def finish_units(store: Store, outcomes: dict[int, str], worker: str) -> int:
    """Mark leased units done with their outcome; returns how many this worker still held (a unit whose lease
    expired and went to another worker is left to it)."""
    now = utcnow()
    n = 0
    by_outcome: dict[str, list[int]] = {}
    for uid, outcome in outcomes.items():
        by_outcome.setdefault(outcome, []).append(uid)
    done = text(
        "UPDATE unit SET status = 'done', outcome = :outcome, lease_expires_at = NULL, updated_at = :now "
        "WHERE id IN :ids AND worker = :worker AND status = 'leased'"
    ).bindparams(bindparam("now", type_=_WHEN), bindparam("ids", expanding=True))
    with store.engine.begin() as conn:
        for outcome, ids in by_outcome.items():  # one statement per outcome, not per unit
            res = conn.execute(done, {"outcome": outcome, "now": now, "ids": ids, "worker": worker})
            n += int(res.rowcount or 0)
    return n


def release_units(store: Store, ids: Sequence[int], worker: str) -> None:
    """Give leased units back (a worker stopping before it started them)."""
    if not ids:
        return
    with store.session() as s:
        s.exec(
            update(Unit)
            .where(col(Unit.id).in_(list(ids)), col(Unit.worker) == worker, col(Unit.status) == LEASED)
            .values(status=PENDING, worker=None, lease_expires_at=None, updated_at=utcnow())
        )
        s.commit()


def heartbeat(store: Store, worker: str, lease_s: float) -> None:
    """Extend every lease `worker` holds."""
    now = utcnow()
    with store.session() as s:
        s.exec(
            update(Unit)
            .where(col(Unit.worker) == worker, col(Unit.status) == LEASED)
            .values(lease_expires_at=now + timedelta(seconds=lease_s), heartbeat_at=now)
        )
        s.commit()


def expire_worker(store: Store, worker: str) -> int:
    """Give back the leases of a worker of this name (a restarted worker after kill -9): claimable at once.

    Released, not just expired: this process's heartbeat renews every lease held under its name, and would
    otherwise renew the dead process's too, which then nobody could claim."""
    with store.session() as s:
        res = s.exec(
            update(Unit)
            .where(col(Unit.worker) == worker, col(Unit.status) == LEASED)
            .values(status=PENDING, worker=None, lease_expires_at=None, updated_at=utcnow())
        )
        s.commit()
        return int(res.rowcount or 0)


def leased_workers(store: Store) -> list[str]:
    """The names of the workers that hold leases now."""
    with store.session() as s:
        return sorted({w for w in s.exec(select(Unit.worker).where(col(Unit.status) == LEASED)) if w})


def unit_counts(store: Store) -> dict[str, dict[str, int]]:
    """Per stage: pending, in progress (leased), and done units by outcome."""
    with store.session() as s:
        rows = s.exec(
            select(Unit.stage, Unit.status, Unit.outcome, func.count()).group_by(
                col(Unit.stage), col(Unit.status), col(Unit.outcome)
            )
        ).all()
    out: dict[str, dict[str, int]] = {}
    for stage, status, outcome, n in rows:
        key = {PENDING: "pending", LEASED: "in_progress"}.get(status, outcome or "done")
        out.setdefault(stage, {})
        out[stage][key] = out[stage].get(key, 0) + int(n)
    return out


def done_since(store: Store, since: datetime) -> dict[str, int]:
    """Units finished since `since`, per stage (the rate `status` reports)."""
    with store.session() as s:
        rows = s.exec(
            select(Unit.stage, func.count())
            .where(col(Unit.status) == DONE, col(Unit.updated_at) >= since, col(Unit.rank) >= 0)
            .group_by(Unit.stage)
        ).all()
    return {stage: int(n) for stage, n in rows}


def lease_heartbeats(store: Store) -> dict[str, datetime]:
    """The latest lease heartbeat of each worker that holds leases (what `status` also counts as alive)."""
    with store.session() as s:
        rows = s.exec(
            select(Unit.worker, func.max(Unit.heartbeat_at))
            .where(col(Unit.status) == LEASED, col(Unit.worker).is_not(None), col(Unit.heartbeat_at).is_not(None))
            .group_by(Unit.worker)
        ).all()
    return {str(w): t for w, t in rows if t is not None}


def ensure_unit(store: Store, stage: str, identity: str, feature_id: int) -> None:
    """A pending unit, unless one exists already (finished or not): the job's one collection unit."""
    insert_missing(
        store, [Unit(stage=stage, identity=identity, feature_id=feature_id)], ("stage", "identity", "feature_id")
    )


def count_open(store: Store, parts: Sequence[tuple[str, str]]) -> int:
    """Units of these (stage, identity) parts that are not finished: pending or held."""
    if not parts:
        return 0
    with store.session() as s:
        n = s.exec(
            select(func.count())
            .select_from(Unit)
            .where(tuple_(Unit.stage, Unit.identity).in_(list(parts)), col(Unit.status) != DONE)
        ).one()
    return int(n)
