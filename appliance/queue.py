"""The persistent job queue: triage priority first, leases that survive a crash.

A worker takes a job with a lease; if the worker dies (or the node is killed) the lease runs out
and the job is taken again.  The pipeline's result for a job is idempotent (deterministic UIDs,
unique keys), so running a job twice never makes two reports.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from .index import Index


@dataclass(frozen=True)
class Job:
    id: int
    series_uid: str
    model: str
    priority: int
    attempts: int
    created_at: float


def take(index: Index, lease_seconds: float, now: float | None = None) -> Job | None:
    """Lease the most urgent job that is due: pending, or running with an expired lease."""
    now = time.time() if now is None else now
    with index.transaction() as db:
        row = db.execute(
            """SELECT id FROM jobs
               WHERE (state = 'pending' AND not_before <= ?) OR (state = 'running' AND lease_until < ?)
               ORDER BY priority, id LIMIT 1""", (now, now)).fetchone()
        if row is None:
            return None
        job = db.execute(
            "UPDATE jobs SET state = 'running', attempts = attempts + 1, lease_until = ? WHERE id = ? "
            "RETURNING id, series_uid, model, priority, attempts, created_at",
            (now + lease_seconds, row["id"])).fetchone()
    return Job(job["id"], job["series_uid"], job["model"], job["priority"], job["attempts"], job["created_at"])


def release_leases(index: Index) -> int:
    """At start-up no job can be running: put every leased job back as pending."""
    with index.transaction() as db:
        return db.execute("UPDATE jobs SET state = 'pending', lease_until = NULL WHERE state = 'running'").rowcount


def finish(db, job: Job, state: str, reason: str | None = None) -> None:
    """Close a job inside the caller's transaction (so the result and the close commit together)."""
    db.execute("UPDATE jobs SET state = ?, reason = ?, finished_at = ?, lease_until = NULL WHERE id = ?",
               (state, reason, time.time(), job.id))


def retry_later(index: Index, job: Job, delay: float, reason: str) -> None:
    with index.transaction() as db:
        db.execute("UPDATE jobs SET state = 'pending', not_before = ?, reason = ?, lease_until = NULL "
                   "WHERE id = ?", (time.time() + delay, reason, job.id))


def depth(index: Index) -> dict[int, int]:
    """Jobs waiting or running, by priority."""
    rows = index.query("SELECT priority, count(*) AS n FROM jobs WHERE state IN ('pending', 'running') "
                       "GROUP BY priority")
    return {r["priority"]: r["n"] for r in rows}
