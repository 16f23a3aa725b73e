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

from sqlalchemy import and_, exists, func, or_, tuple_, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import aliased
from sqlmodel import col, select

from autointerp.store.engine import Store
from autointerp.store.tables import Unit, utcnow

PENDING, LEASED, DONE = "pending", "leased", "done"

__all__ = ["Unit"]
STAGE_ORDER = ("collect", "explain", "score", "intervene")


def _aware(t: datetime) -> datetime:
    """SQLite hands timestamps back without their zone (they were written in UTC)."""
    return t if t.tzinfo is not None else t.replace(tzinfo=utcnow().tzinfo)


@dataclass(frozen=True)
class Claimed:
    id: int
    feature_id: int


def _immediate(store: Store, s: Any) -> None:
    """On SQLite, take the write lock now: a transaction that reads and then writes would otherwise fail at once
    with "database is locked" when another writer got there between its read and its write (no busy wait)."""
    if store.engine.dialect.name == "sqlite":
        s.connection().exec_driver_sql("BEGIN IMMEDIATE")


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
        _immediate(store, s)
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


def _claimable(stage: str, identity: str, requires: Sequence[tuple[str, str]], now: datetime) -> Any:
    live = or_(col(Unit.status) == PENDING, and_(col(Unit.status) == LEASED, col(Unit.lease_expires_at) < now))
    q = select(Unit.id, Unit.feature_id).where(col(Unit.stage) == stage, col(Unit.identity) == identity, live)
    if requires:
        before = aliased(Unit)
        waiting = exists().where(  # a unit this one requires, of the same feature, is not finished yet
            col(before.feature_id) == Unit.feature_id,
            tuple_(before.stage, before.identity).in_(list(requires)),
            col(before.status) != DONE,
        )
        q = q.where(~waiting)
    return q


def claim(store: Store, stage: str, identity: str, worker: str, n: int, lease_s: float, *,
          requires: Sequence[tuple[str, str]] = (), run_id: int | None = None) -> list[Claimed]:  # fmt: skip
    """Lease up to `n` claimable units of a stage to `worker`, in claim order: pending or under an expired lease,
    with every unit of the same feature in `requires` (stage, identity) finished; none that another worker holds."""
    now = utcnow()
    q = _claimable(stage, identity, requires, now).order_by(col(Unit.rank)).limit(n)
    postgres = store.engine.dialect.name == "postgresql"
    with store.session() as s:
        if postgres:
            q = q.with_for_update(skip_locked=True, of=Unit)
        else:
            # Look first without the write lock: a stage with nothing claimable (the runner asks the later stages
            # first) then costs a read, not a write transaction that waits for and blocks every other worker.
            if s.exec(q.with_only_columns(Unit.id).limit(1)).first() is None:
                return []
            s.rollback()
            _immediate(store, s)
        rows = s.exec(q).all()
        ids = [int(r[0]) for r in rows]
        if ids:
            s.exec(
                update(Unit)
                .where(col(Unit.id).in_(ids))
                .values(
                    status=LEASED,
                    worker=worker,
                    lease_expires_at=now + timedelta(seconds=lease_s),
                    heartbeat_at=now,
                    attempts=Unit.attempts + 1,
                    run_id=run_id,
                    updated_at=now,
                )  # fmt: skip
            )
        s.commit()
    return [Claimed(int(r[0]), int(r[1])) for r in rows]


def finish_units(store: Store, outcomes: dict[int, str], worker: str) -> int:
    """Mark leased units done with their outcome; returns how many this worker still held (a unit whose lease
    expired and went to another worker is left to it)."""
    now = utcnow()
    n = 0
    by_outcome: dict[str, list[int]] = {}
    for uid, outcome in outcomes.items():
        by_outcome.setdefault(outcome, []).append(uid)
    with store.session() as s:
        for outcome, ids in by_outcome.items():  # one statement per outcome, not per unit
            res = s.exec(
                update(Unit)
                .where(col(Unit.id).in_(ids), col(Unit.worker) == worker, col(Unit.status) == LEASED)
                .values(status=DONE, outcome=outcome, lease_expires_at=None, updated_at=now)
            )
            n += int(res.rowcount or 0)
        s.commit()
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
    """Make the leases of a worker of this name claimable at once (a restarted worker after kill -9)."""
    with store.session() as s:
        res = s.exec(
            update(Unit)
            .where(col(Unit.worker) == worker, col(Unit.status) == LEASED)
            .values(lease_expires_at=utcnow() - timedelta(seconds=1))
        )
        s.commit()
        return int(res.rowcount or 0)


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


def ensure_unit(store: Store, stage: str, identity: str, feature_id: int) -> None:
    """A pending unit, unless one exists already (finished or not): the job's one collection unit."""
    with store.session() as s:
        found = s.exec(
            select(Unit).where(
                col(Unit.stage) == stage, col(Unit.identity) == identity, col(Unit.feature_id) == feature_id
            )
        ).first()
        if found is None:
            s.add(Unit(stage=stage, identity=identity, feature_id=feature_id))
            try:
                s.commit()
            except IntegrityError:  # another worker registered it first
                s.rollback()


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
