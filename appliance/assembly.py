"""Series completion: when has a sender finished sending a series?

DICOM has no "series complete" message, so the node decides: a series is ready when the
association that brought its instances is released, or when ``quiet_seconds`` pass with no new
instance of it, whichever comes first.  An aborted association does not complete anything (the
sender may retry); the quiet timer does.  The state lives in the index, so a series whose
association was cut by a crash is completed by the quiet timer after restart.
"""

from __future__ import annotations

import time

from . import metrics
from .index import Index


def complete_released(index: Index, series_uids: set[str], now: float | None = None) -> list[str]:
    """Mark the series an association brought ready, as it was released.  Returns those marked."""
    return _mark(index, series_uids, "release", now)


def complete_quiet(index: Index, quiet_seconds: float, now: float | None = None) -> list[str]:
    """Mark ready every series that has had no new instance for ``quiet_seconds``."""
    now = time.time() if now is None else now
    rows = index.query("SELECT series_uid FROM series WHERE state = 'receiving' AND last_received <= ?",
                       (now - quiet_seconds,))
    return _mark(index, {r["series_uid"] for r in rows}, "quiet", now)


def _mark(index: Index, series_uids: set[str], trigger: str, now: float | None) -> list[str]:
    if not series_uids:
        return []
    now = time.time() if now is None else now
    marked = []
    with index.transaction() as db:
        for uid in sorted(series_uids):
            cur = db.execute("UPDATE series SET state = 'ready', ready_at = ?, ready_by = ? "
                             "WHERE series_uid = ? AND state = 'receiving'", (now, trigger, uid))
            if cur.rowcount:
                marked.append(uid)
    metrics.SERIES_COMPLETED.labels(trigger).inc(len(marked))
    return marked
