"""Routing: which model packages a complete series goes to.

Routes are tried in the order the configuration lists them; the first whose every attribute
matches sends the series to its packages.  A series no route matches is kept in the spool and
counted, not processed.  Matching uses the series' first instance's Modality, Body Part Examined
and SOP Class UID.
"""

from __future__ import annotations

import logging
import time
from typing import Sequence

from . import audit, metrics
from .config import Route
from .index import Index

log = logging.getLogger("appliance.routing")


def choose(routes: Sequence[Route], attributes: dict[str, str]) -> Route | None:
    for route in routes:
        if route.matches(attributes):
            return route
    return None


def route_ready(index: Index, routes: Sequence[Route]) -> int:
    """Route every ready series: enqueue a job per model, or mark it unrouted.  Returns jobs made."""
    jobs = 0
    rows = index.query("SELECT rowid AS id, series_uid, study_uid, modality, body_part, sop_class_uid, ready_by "
                       "FROM series WHERE state = 'ready' ORDER BY ready_at")
    for row in rows:
        attributes = {"Modality": row["modality"], "BodyPartExamined": row["body_part"],
                      "SOPClassUID": row["sop_class_uid"]}
        route = choose(routes, attributes)
        now = time.time()
        with index.transaction() as db:
            uids = {"study_uid": row["study_uid"], "series_uid": row["series_uid"]}
            if route is None:
                db.execute("UPDATE series SET state = 'unrouted' WHERE series_uid = ?", (row["series_uid"],))
                audit.record(db, "unrouted", sop_class_uid=row["sop_class_uid"], **uids)
            else:
                db.execute("UPDATE series SET state = 'routed', route = ? WHERE series_uid = ?",
                           (route.name, row["series_uid"]))
                for model in route.models:
                    db.execute("INSERT OR IGNORE INTO jobs (series_uid, model, priority, state, created_at) "
                               "VALUES (?, ?, ?, 'pending', ?)", (row["series_uid"], model, route.priority, now))
                jobs += len(route.models)
                audit.record(db, "routed", model=",".join(route.models), detail=f"route {route.name}", **uids)
        fields = {"series": row["id"], "completed_by": row["ready_by"], "modality": row["modality"] or "-",
                  "body_part": row["body_part"] or "-", "sop_class": row["sop_class_uid"]}
        if route is None:
            metrics.SERIES_UNROUTED.inc()
            log.info("series complete, no route matches: kept, not processed",
                     extra={"event": "series.unrouted", **fields})
        else:
            metrics.SERIES_ROUTED.inc()
            log.info("series complete, routed to %s", ",".join(route.models),
                     extra={"event": "series.routed", "route": route.name, **fields})
    return jobs
