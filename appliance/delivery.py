"""Delivery: C-STORE SCU of outbox results to every configured destination.

A row leaves the outbox only when its destination answers a success status (0x0000, or a
warning status, which PS3.4 B.2.3 counts as stored).  A destination that cannot be reached is
retried with exponential backoff for as long as it takes: a PACS outage must not drop a result.
A destination that refuses the object is retried ``refused_attempts`` times, then the row is
marked dead and counted.  The schedule lives in the index, so it survives a restart.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import (Comprehensive3DSRStorage, ComprehensiveSRStorage, EnhancedSRStorage,
                                  SegmentationStorage)

from . import audit, metrics
from .config import Config, Destination
from .index import Index

log = logging.getLogger("appliance.delivery")

RESULT_SOP_CLASSES = (Comprehensive3DSRStorage, ComprehensiveSRStorage, EnhancedSRStorage, SegmentationStorage)
#: PS3.4 B.2.3: warning statuses mean the instance was stored.
STORED = {0x0000, 0xB000, 0xB006, 0xB007}


class Delivery:
    def __init__(self, cfg: Config, index: Index, results_dir: Path):
        self.cfg = cfg
        self.index = index
        self.results_dir = results_dir
        self.destinations = {d.name: d for d in cfg.destinations}
        self.ae = AE(ae_title=cfg.ae_title)
        self.ae.acse_timeout = cfg.delivery_timeout
        self.ae.dimse_timeout = cfg.delivery_timeout
        self.ae.network_timeout = cfg.delivery_timeout
        for sop_class in RESULT_SOP_CLASSES:
            self.ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])

    def _backoff(self, attempts: int) -> float:
        return min(self.cfg.retry_max_seconds, self.cfg.retry_initial_seconds * 2 ** max(attempts - 1, 0))

    def send_due(self, now: float | None = None) -> float | None:
        """Send every due outbox row; return when the next one is due (None if none is pending)."""
        now = time.time() if now is None else now
        rows = self.index.query(
            """SELECT o.id, o.destination, o.attempts, o.refusals, o.result_id, r.path, r.ready_at,
                      r.sop_instance_uid, r.study_uid, r.model
               FROM outbox o JOIN results r ON r.id = o.result_id
               WHERE o.state = 'pending' AND o.next_attempt <= ? ORDER BY o.id""", (now,))
        by_destination: dict[str, list] = {}
        for row in rows:
            by_destination.setdefault(row["destination"], []).append(row)
        for name, batch in by_destination.items():
            dest = self.destinations.get(name)
            if dest is None:
                # The destination was removed from the configuration: keep the rows, retry later.
                self._failed(batch, "destination not configured", refused=False)
                continue
            self._send(dest, batch)
        nxt = self.index.query("SELECT min(next_attempt) AS t FROM outbox WHERE state = 'pending'")[0]["t"]
        return nxt

    def _send(self, dest: Destination, batch: list) -> None:
        assoc = self.ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
        if not assoc.is_established:
            why = "association rejected" if assoc.is_rejected else "association not established"
            log.warning("delivery to %s failed: %s; %d result(s) will be retried", dest.name, why, len(batch),
                        extra={"event": "delivery.failed", "destination": dest.name, "reason": why})
            self._failed(batch, why, refused=False)
            return
        try:
            for row in batch:
                if not assoc.is_established:
                    self._failed([row], "association lost", refused=False)
                    continue
                start = time.perf_counter()
                status = assoc.send_c_store(self.results_dir / row["path"])
                metrics.DELIVERY_SECONDS.labels(dest.name).observe(time.perf_counter() - start)
                code = getattr(status, "Status", None)
                if code in STORED:
                    self._sent(row, dest, f"0x{code:04X}")
                elif code is None:
                    self._failed([row], "no response", refused=False)
                else:
                    log.warning("delivery to %s refused with status 0x%04X", dest.name, code,
                                extra={"event": "delivery.refused", "destination": dest.name,
                                       "result": row["result_id"], "status": f"0x{code:04X}"})
                    self._failed([row], f"0x{code:04X}", refused=True)
        finally:
            if assoc.is_established:
                assoc.release()

    def _sent(self, row, dest: Destination, status: str) -> None:
        now = time.time()
        with self.index.transaction() as db:
            db.execute("UPDATE outbox SET state = 'sent', sent_at = ?, last_status = ?, attempts = attempts + 1 "
                       "WHERE id = ?", (now, status, row["id"]))
            left = db.execute("SELECT count(*) FROM outbox WHERE result_id = ? AND state != 'sent'",
                              (row["result_id"],)).fetchone()[0]
            if left == 0:
                db.execute("UPDATE results SET delivered_at = ? WHERE id = ?", (now, row["result_id"]))
            audit.record(db, "delivered", study_uid=row["study_uid"], sop_instance_uid=row["sop_instance_uid"],
                         model=row["model"], destination=dest.name, status=status)
        metrics.DELIVERIES.labels(dest.name, "success").inc()
        if left == 0:
            metrics.END_TO_END.observe(max(0.0, now - row["ready_at"]))
        log.info("result delivered to %s (status %s)", dest.name, status,
                 extra={"event": "result.delivered", "result": row["result_id"], "destination": dest.name,
                        "end_to_end_s": round(now - row["ready_at"], 3) if left == 0 else None})

    def _failed(self, rows: list, why: str, refused: bool) -> None:
        now = time.time()
        with self.index.transaction() as db:
            for row in rows:
                attempts = row["attempts"] + 1
                refusals = row["refusals"] + (1 if refused else 0)
                state = "dead" if refusals >= self.cfg.refused_attempts else "pending"
                db.execute("UPDATE outbox SET attempts = ?, refusals = ?, state = ?, next_attempt = ?, "
                           "last_status = ? WHERE id = ?",
                           (attempts, refusals, state, now + self._backoff(attempts), why, row["id"]))
                if attempts == 1 or state == "dead":  # the trail records the first failure and the end,
                    # not every retry of a weekend-long PACS outage; the outbox counts the attempts
                    audit.record(db, "dead_lettered" if state == "dead" else "delivery_failed",
                                 study_uid=row["study_uid"], sop_instance_uid=row["sop_instance_uid"],
                                 model=row["model"], destination=row["destination"], status=why)
                if state == "dead":
                    log.error("result dead-lettered for %s after %d refusals (%s)", row["destination"],
                              refusals, why, extra={"event": "result.dead_lettered", "result": row["result_id"],
                                                    "destination": row["destination"]})
        for row in rows:
            metrics.DELIVERIES.labels(row["destination"], "refused" if refused else "failure").inc()
