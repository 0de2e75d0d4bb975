"""The outbox: results that exist durably and are owed to destinations.

The pipeline writes a result's file durably, then in one transaction records the result, one
outbox row per destination and the job's completion.  Delivery sends what the outbox holds until
each destination says 0x0000.  Keyed by the result's SOP Instance UID, so a job that runs twice
adds nothing the second time.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .index import Index
from .postprocessing import Finding


@dataclass(frozen=True)
class ResultRecord:
    sop_instance_uid: str
    series_uid: str
    study_uid: str
    source_series_uid: str
    model: str
    model_version: str
    path: Path
    modality: str
    study_date: str
    study_time: str
    findings: Sequence[Finding]
    ready_at: float


def findings_json(findings: Sequence[Finding]) -> str:
    return json.dumps([{"name": f.output.name, "finding": f.output.finding.meaning,
                        "probability": round(f.probability, 6), "present": f.present, "critical": f.critical}
                       for f in findings])


def add(db, result: ResultRecord, destinations: Sequence[str]) -> int | None:
    """Record a result and its deliveries in the caller's transaction.  None if it was already there."""
    cur = db.execute(
        """INSERT OR IGNORE INTO results (sop_instance_uid, series_uid, study_uid, source_series_uid, model,
               model_version, path, modality, study_date, study_time, findings, ready_at, produced_at)
           VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)""",
        (result.sop_instance_uid, result.series_uid, result.study_uid, result.source_series_uid, result.model,
         result.model_version, str(result.path), result.modality, result.study_date, result.study_time,
         findings_json(result.findings), result.ready_at, time.time()))
    if cur.rowcount == 0:
        return None
    result_id = cur.lastrowid
    now = time.time()
    for name in destinations:
        db.execute("INSERT OR IGNORE INTO outbox (result_id, destination, state, next_attempt) "
                   "VALUES (?, ?, 'pending', ?)", (result_id, name, now))
    return result_id


def depth(index: Index) -> int:
    return index.query("SELECT count(*) AS n FROM outbox WHERE state = 'pending'")[0]["n"]
