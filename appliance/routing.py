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

from . import metrics
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
    rows = index.query("SELECT series_uid, modality, body_part, sop_class_uid FROM series "
                       "WHERE state = 'ready' ORDER BY ready_at")
    for row in rows:
        attributes = {"Modality": row["modality"], "BodyPartExamined": row["body_part"],
                      "SOPClassUID": row["sop_class_uid"]}
        route = choose(routes, attributes)
        now = time.time()
        with index.transaction() as db:
            if route is None:
                db.execute("UPDATE series SET state = 'unrouted' WHERE series_uid = ?", (row["series_uid"],))
            else:
                db.execute("UPDATE series SET state = 'routed', route = ? WHERE series_uid = ?",
                           (route.name, row["series_uid"]))
                for model in route.models:
                    db.execute("INSERT OR IGNORE INTO jobs (series_uid, model, priority, state, created_at) "
                               "VALUES (?, ?, ?, 'pending', ?)", (row["series_uid"], model, route.priority, now))
                jobs += len(route.models)
        if route is None:
            metrics.SERIES_UNROUTED.inc()
            log.info("series unrouted: modality=%s body_part=%s sop_class=%s; kept, not processed",
                     row["modality"] or "-", row["body_part"] or "-", row["sop_class_uid"])
        else:
            log.info("series routed: route=%s models=%s", route.name, ",".join(route.models))
    return jobs
