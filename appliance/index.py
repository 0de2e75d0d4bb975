"""The node's durable index: one SQLite database (WAL, synchronous=FULL) shared by every stage.

Each stage owns its tables and only writes its own: the spool writes ``instances`` and ``series``
as instances arrive, assembly and routing move ``series`` on, the queue owns ``jobs``, the
pipeline writes ``results`` and the outbox, delivery updates the outbox.  A commit here is the
moment a hand-over becomes durable; no stage acknowledges anything before its commit returns.
"""

from __future__ import annotations

import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY,
    sop_class_uid    TEXT NOT NULL,
    study_uid        TEXT NOT NULL,
    series_uid       TEXT NOT NULL,
    transfer_syntax  TEXT NOT NULL,
    path             TEXT NOT NULL,
    size             INTEGER NOT NULL,
    calling_ae       TEXT NOT NULL,
    received_at      REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_series ON instances(series_uid);

CREATE TABLE IF NOT EXISTS series (
    series_uid      TEXT PRIMARY KEY,
    study_uid       TEXT NOT NULL,
    modality        TEXT NOT NULL,
    body_part       TEXT NOT NULL,
    sop_class_uid   TEXT NOT NULL,
    study_date      TEXT NOT NULL,
    study_time      TEXT NOT NULL,
    state           TEXT NOT NULL,          -- receiving, ready, routed, unrouted
    instance_count  INTEGER NOT NULL,
    first_received  REAL NOT NULL,
    last_received   REAL NOT NULL,
    ready_at        REAL,
    ready_by        TEXT,                   -- release, quiet
    route           TEXT
);
CREATE INDEX IF NOT EXISTS series_state ON series(state, last_received);

CREATE TABLE IF NOT EXISTS jobs (
    id           INTEGER PRIMARY KEY,
    series_uid   TEXT NOT NULL,
    model        TEXT NOT NULL,
    priority     INTEGER NOT NULL,
    state        TEXT NOT NULL,             -- pending, running, done, rejected, failed
    attempts     INTEGER NOT NULL DEFAULT 0,
    not_before   REAL NOT NULL DEFAULT 0,
    lease_until  REAL,
    created_at   REAL NOT NULL,
    finished_at  REAL,
    reason       TEXT,
    UNIQUE (series_uid, model)
);
CREATE INDEX IF NOT EXISTS jobs_ready ON jobs(state, priority, id);

CREATE TABLE IF NOT EXISTS results (
    id                INTEGER PRIMARY KEY,
    sop_instance_uid  TEXT NOT NULL UNIQUE,
    series_uid        TEXT NOT NULL,
    study_uid         TEXT NOT NULL,
    source_series_uid TEXT NOT NULL,
    model             TEXT NOT NULL,
    model_version     TEXT NOT NULL,
    path              TEXT NOT NULL,
    modality          TEXT NOT NULL,
    study_date        TEXT NOT NULL,
    study_time        TEXT NOT NULL,
    findings          TEXT NOT NULL,        -- JSON: name, probability, present, critical
    ready_at          REAL NOT NULL,
    produced_at       REAL NOT NULL,
    delivered_at      REAL
);

CREATE TABLE IF NOT EXISTS outbox (
    id           INTEGER PRIMARY KEY,
    result_id    INTEGER NOT NULL REFERENCES results(id),
    destination  TEXT NOT NULL,
    state        TEXT NOT NULL,             -- pending, sent, dead
    attempts     INTEGER NOT NULL DEFAULT 0,
    refusals     INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL,
    last_status  TEXT,
    sent_at      REAL,
    UNIQUE (result_id, destination)
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox(state, next_attempt);

CREATE TABLE IF NOT EXISTS audit (
    id               INTEGER PRIMARY KEY,
    ts               REAL NOT NULL,
    event            TEXT NOT NULL,
    calling_ae       TEXT,
    sop_class_uid    TEXT,
    study_uid        TEXT,
    series_uid       TEXT,
    sop_instance_uid TEXT,
    model            TEXT,
    findings         TEXT,
    destination      TEXT,
    status           TEXT,
    detail           TEXT
);
CREATE INDEX IF NOT EXISTS audit_ts ON audit(ts);
"""


class Index:
    """One SQLite file; each thread gets its own connection."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self.connection().executescript(SCHEMA)  # executescript manages its own transaction

    def connection(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=True)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            # FULL: a committed transaction survives power loss, which is what 0x0000 promises.
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            self._local.conn = conn
        return conn

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT``; rolled back if the block raises."""
        conn = self.connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def query(self, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
        return self.connection().execute(sql, params).fetchall()

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
