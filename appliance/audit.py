"""The audit trail: what came in, where it went, what was produced and delivered, what failed.

Rows are written inside the same transaction as the hand-over they describe, so the trail is as
durable as the data and costs no extra fsync.  It holds UIDs and AE titles so an operator can
trace a study; it never holds a patient's name, ID or birth date.  ``appliance audit`` reads it.
"""

from __future__ import annotations

import time

from .index import Index

EVENTS = ("received", "refused", "routed", "unrouted", "produced", "rejected", "failed", "delivered",
          "delivery_failed", "dead_lettered")
COLUMNS = ("calling_ae", "sop_class_uid", "study_uid", "series_uid", "sop_instance_uid", "model",
           "findings", "destination", "status", "detail")


def record(db, event: str, **fields: object) -> None:
    """Add one audit row in the caller's transaction."""
    unknown = set(fields) - set(COLUMNS)
    if unknown or event not in EVENTS:
        raise ValueError(f"audit: unknown event {event!r} or fields {sorted(unknown)}")
    db.execute(f"INSERT INTO audit (ts, event, {', '.join(COLUMNS)}) VALUES (?, ?{', ?' * len(COLUMNS)})",
               (time.time(), event, *(None if fields.get(c) is None else str(fields[c]) for c in COLUMNS)))


def record_now(index: Index, event: str, **fields: object) -> None:
    """Add one audit row in a transaction of its own (for events no other write goes with)."""
    with index.transaction() as db:
        record(db, event, **fields)


def query(index: Index, since: float, events: list[str] | None = None, limit: int = 1000) -> list[dict]:
    sql = "SELECT * FROM audit WHERE ts >= ?"
    params: list = [since]
    if events:
        sql += f" AND event IN ({', '.join('?' * len(events))})"
        params += events
    sql += " ORDER BY id LIMIT ?"
    params.append(limit)
    return [dict(r) for r in index.query(sql, tuple(params))]
