"""The spool: every received instance, durable, byte for byte as it arrived.

A C-STORE is answered 0x0000 only after :meth:`Spool.store` returns: the encoded data set (with
its File Meta Information) is written to a temporary file, fsync'd, renamed into place, its
directory fsync'd, and the instance indexed in a committed SQLite transaction.  File names are the
node's own (random), never a UID taken from the wire.
"""

from __future__ import annotations

import os
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from . import audit
from .index import Index

#: PS3.5 9.1: a UID is digit components separated by dots, at most 64 characters.
UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")


def valid_uid(value: str) -> bool:
    return len(value) <= 64 and UID_RE.match(value) is not None


@dataclass(frozen=True)
class InstanceInfo:
    """What the index keeps of an instance: identifiers and routing attributes, no patient data."""

    sop_instance_uid: str
    sop_class_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax: str
    modality: str
    body_part: str
    study_date: str
    study_time: str


@dataclass(frozen=True)
class Stored:
    """Identifiers the node assigned to a stored instance and its series (rows of the index)."""

    instance_id: int
    series_id: int


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(folder: Path, name: str, data: bytes | memoryview) -> Path:
    """Write ``data`` to ``folder/name`` so that it exists whole or not at all after a crash."""
    final = folder / name
    tmp = folder / f".{name}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, final)
    fsync_dir(folder)
    return final


class Spool:
    def __init__(self, data_dir: Path, index: Index):
        self.root = Path(data_dir) / "spool"
        self.root.mkdir(parents=True, exist_ok=True)
        self.index = index
        self._dirs: set[Path] = set()

    def contains(self, sop_instance_uid: str) -> bool:
        return bool(self.index.query("SELECT 1 FROM instances WHERE sop_instance_uid = ?", (sop_instance_uid,)))

    def _folder(self, name: str) -> Path:
        # Two levels of 256 folders keep directories small over months of studies.
        folder = self.root / name[:2] / name[2:4]
        if folder not in self._dirs:
            folder.mkdir(parents=True, exist_ok=True)
            self._dirs.add(folder)
        return folder

    def free_mb(self) -> float:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize / 2**20

    def store(self, encoded: bytes, info: InstanceInfo, calling_ae: str) -> Stored | None:
        """Make the instance durable.  Returns None if it was already stored (idempotent)."""
        if self.contains(info.sop_instance_uid):
            return None
        name = uuid.uuid4().hex
        path = write_durably(self._folder(name), name + ".dcm", encoded)
        now = time.time()
        try:
            with self.index.transaction() as db:
                cur = db.execute(
                    "INSERT OR IGNORE INTO instances VALUES (?,?,?,?,?,?,?,?,?)",
                    (info.sop_instance_uid, info.sop_class_uid, info.study_uid, info.series_uid,
                     info.transfer_syntax, str(path.relative_to(self.root)), len(encoded), calling_ae, now))
                stored = None
                if cur.rowcount == 1:
                    instance_id = cur.lastrowid
                    series_id = db.execute(
                        """INSERT INTO series (series_uid, study_uid, modality, body_part, sop_class_uid,
                                               study_date, study_time, state, instance_count,
                                               first_received, last_received)
                           VALUES (?,?,?,?,?,?,?,'receiving',1,?,?)
                           ON CONFLICT(series_uid) DO UPDATE SET
                               instance_count = instance_count + 1, last_received = excluded.last_received
                           RETURNING rowid""",
                        (info.series_uid, info.study_uid, info.modality, info.body_part, info.sop_class_uid,
                         info.study_date, info.study_time, now, now)).fetchone()[0]
                    audit.record(db, "received", calling_ae=calling_ae, sop_class_uid=info.sop_class_uid,
                                 study_uid=info.study_uid, series_uid=info.series_uid,
                                 sop_instance_uid=info.sop_instance_uid)
                    stored = Stored(instance_id, series_id)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        if stored is None:  # a concurrent association stored the same instance first
            path.unlink(missing_ok=True)
        return stored

    def instance_paths(self, series_uid: str) -> list[Path]:
        rows = self.index.query(
            "SELECT path FROM instances WHERE series_uid = ? ORDER BY received_at", (series_uid,))
        return [self.root / r["path"] for r in rows]
