"""The spool: every received instance, durable, byte for byte as it arrived.

A C-STORE is answered 0x0000 only after :meth:`Spool.commit` returns. An instance is streamed,
as its P-DATA arrive, into ``spool/<YYYYMMDD>/<HH>/.<name>.part`` (UTC hour of arrival; the name is
the node's own, random, never a UID from the wire): the File Meta Information the node writes
(PS3.10 7.1), then the data set exactly as received. When the last fragment is in, the file is
renamed to ``<name>.dcm``, indexed in a SQLite transaction, and made durable together with its
index row by a group commit: one ``syncfs()`` of the spool's file system covers every instance
that was renamed and indexed before it started, so several associations share one flush of the
disk instead of queueing for one each.

The order on disk is not guaranteed by that one flush (the kernel may write the index row before
the file's data), so :meth:`Spool.recover`, run when the spool opens, checks the instances indexed
in the last minutes before the newest one: an index row whose file is missing or shorter than
indexed was never acknowledged (the crash came before its flush returned) and is removed; so are
``.part`` files (receptions cut short) and files no row names. Nothing that was answered 0x0000
is ever removed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import re
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from . import __version__, audit, encoding, uids
from .index import Index

log = logging.getLogger("appliance.spool")

#: PS3.5 9.1: a UID is digit components separated by dots, at most 64 characters.
UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")

#: The node's Implementation Class UID and Version Name in the File Meta Information (PS3.7 D.3.3.2).
IMPLEMENTATION_CLASS_UID = uids.derived_uid("implementation class")
IMPLEMENTATION_VERSION_NAME = f"APPLIANCE_{__version__}"[:16]

#: Instances indexed this many seconds before the newest one are checked by :meth:`Spool.recover`.
RECOVERY_WINDOW_SECONDS = 300.0

#: Start writing a reception back to disk every this many bytes, so its final flush finds little left.
WRITE_BEHIND_BYTES = 1 << 20

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_SYNCFS = getattr(_libc, "syncfs", None)
_SYNC_FILE_RANGE = getattr(_libc, "sync_file_range", None)
if _SYNC_FILE_RANGE is not None:
    _SYNC_FILE_RANGE.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
_SYNC_FILE_RANGE_WRITE = 2


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


def file_meta(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, source_ae: str) -> bytes:
    """Preamble, ``DICM`` and the File Meta Information group of a Part 10 file (PS3.10 7.1)."""
    return encoding.file_meta(sop_class_uid, sop_instance_uid, transfer_syntax, source_ae,
                              IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME)


class Flusher:
    """Group commit: one flush of the file system makes durable everything written before it began.

    Callers that arrive while a flush runs wait for the next one, which covers all of them; the
    disk sees one cache flush per round however many associations are storing.
    """

    def __init__(self, folder: Path):
        self._fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        self._cond = threading.Condition()
        self._issued = 0    # tickets handed out
        self._durable = 0   # every ticket up to this one is durable
        self._busy = False

    def flush(self) -> None:
        """Return once everything written before the call is on disk; OSError if the disk says no."""
        with self._cond:
            self._issued += 1
            ticket = self._issued
            while self._durable < ticket:
                if self._busy:
                    self._cond.wait()
                    continue
                self._busy, covered = True, self._issued
                self._cond.release()
                try:
                    self._sync()
                finally:
                    self._cond.acquire()
                    self._busy = False
                    self._cond.notify_all()
                self._durable = max(self._durable, covered)

    def _sync(self) -> None:
        if _SYNCFS is None:
            os.sync()  # Linux's sync() waits for the writes, as syncfs() does
            return
        if _SYNCFS(self._fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs of the spool failed: {os.strerror(err)}")

    def close(self) -> None:
        os.close(self._fd)


class Reception:
    """One instance arriving: the File Meta Information, then the data set fragment by fragment."""

    def __init__(self, folder: Path, name: str, meta: bytes):
        self.folder, self.name = folder, name
        self.part = folder / f".{name}.part"
        self.fd = os.open(self.part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        self.size = 0
        self._written_back = 0
        try:
            self.write(meta)
        except BaseException:
            self.discard()
            raise

    def write(self, data: bytes | memoryview) -> None:
        """Append ``data``; OSError (ENOSPC, EIO) if the disk cannot take it."""
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
            self.size += n
        if _SYNC_FILE_RANGE is not None and self.size - self._written_back >= WRITE_BEHIND_BYTES:
            # Start writing back what is there; the flush at the end then waits for less.
            _SYNC_FILE_RANGE(self.fd, self._written_back, self.size - self._written_back, _SYNC_FILE_RANGE_WRITE)
            self._written_back = self.size

    def write_back(self) -> None:
        """Start writing back what is not yet on its way (the end of the data set), without waiting."""
        if _SYNC_FILE_RANGE is not None and self.fd >= 0 and self.size > self._written_back:
            _SYNC_FILE_RANGE(self.fd, self._written_back, self.size - self._written_back, _SYNC_FILE_RANGE_WRITE)
            self._written_back = self.size

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def discard(self) -> None:
        """Forget the reception: nothing of it stays on disk."""
        self.close()
        self.part.unlink(missing_ok=True)


class Spool:
    def __init__(self, data_dir: Path, index: Index):
        self.root = Path(data_dir) / "spool"
        self.root.mkdir(parents=True, exist_ok=True)
        self.index = index
        self._dirs: set[Path] = set()
        self._dirs_lock = threading.Lock()
        self._relaxed = threading.local()
        self._index_lock = threading.Lock()
        self.flusher = Flusher(self.root)
        self.recover()

    def contains(self, sop_instance_uid: str) -> bool:
        return bool(self.index.query("SELECT 1 FROM instances WHERE sop_instance_uid = ?", (sop_instance_uid,)))

    def _bucket(self) -> Path:
        # One folder per hour of arrival: recovery after a crash reads only the last few.
        folder = self.root / datetime.now(timezone.utc).strftime("%Y%m%d/%H")
        if folder not in self._dirs:
            with self._dirs_lock:
                folder.mkdir(parents=True, exist_ok=True)
                fsync_dir(folder.parent)
                fsync_dir(self.root)
                self._dirs.add(folder)
        return folder

    def free_mb(self) -> float:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize / 2**20

    def receive(self, meta: bytes) -> Reception:
        """Start an instance; write its data set with :meth:`Reception.write`, then :meth:`commit` it."""
        return Reception(self._bucket(), uuid.uuid4().hex, meta)

    def _connection(self):
        # The group commit makes the index row durable, so this thread's commits need not flush
        # on their own (WAL + synchronous=NORMAL stays consistent after a crash).
        db = self.index.connection()
        if getattr(self._relaxed, "db", None) is not db:
            db.execute("PRAGMA synchronous=NORMAL")
            self._relaxed.db = db
        return db

    def commit(self, reception: Reception, info: InstanceInfo, calling_ae: str) -> Stored | None:
        """Make a received instance durable and indexed.  None if it was already stored (idempotent)."""
        reception.write_back()
        reception.close()
        final = reception.folder / f"{reception.name}.dcm"
        try:
            os.rename(reception.part, final)
        except BaseException:
            reception.discard()
            raise
        now = time.time()
        db = self._connection()
        try:
            # Associations take turns here, briefly: waiting on SQLite's own lock would sleep
            # 1, 2, 5, 10... ms in its busy handler instead of waking when the lock is free.
            with self._index_lock:
                db.execute("BEGIN IMMEDIATE")
                try:
                    stored = self._index(db, info, final, reception.size, calling_ae, now)
                    db.execute("COMMIT")
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
            if stored is None:  # already there (a second copy, or a concurrent association)
                final.unlink(missing_ok=True)
                return None
            self.flusher.flush()
        except BaseException:
            self._forget(info, final)
            raise
        return stored

    def _index(self, db, info: InstanceInfo, path: Path, size: int, calling_ae: str, now: float) -> Stored | None:
        cur = db.execute(
            "INSERT OR IGNORE INTO instances VALUES (?,?,?,?,?,?,?,?,?)",
            (info.sop_instance_uid, info.sop_class_uid, info.study_uid, info.series_uid,
             info.transfer_syntax, str(path.relative_to(self.root)), size, calling_ae, now))
        if cur.rowcount != 1:
            return None
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
                     study_uid=info.study_uid, series_uid=info.series_uid, sop_instance_uid=info.sop_instance_uid)
        return Stored(instance_id, series_id)

    def _forget(self, info: InstanceInfo, path: Path) -> None:
        """Undo an instance whose flush failed: it is refused, so it must not look stored."""
        try:
            with self.index.transaction() as db:
                self._unindex(db, info.sop_instance_uid, info.series_uid, str(path.relative_to(self.root)))
        except Exception:
            log.exception("could not remove the index row of an instance that is not durable",
                          extra={"event": "spool.undo_failed"})
        path.unlink(missing_ok=True)

    @staticmethod
    def _unindex(db, sop_instance_uid: str, series_uid: str, relative_path: str) -> None:
        if db.execute("DELETE FROM instances WHERE sop_instance_uid = ? AND path = ?",
                      (sop_instance_uid, relative_path)).rowcount:
            db.execute("UPDATE series SET instance_count = instance_count - 1 WHERE series_uid = ?", (series_uid,))
            db.execute("DELETE FROM series WHERE series_uid = ? AND instance_count <= 0 AND state = 'receiving'",
                       (series_uid,))

    def store(self, encoded: bytes | memoryview, info: InstanceInfo, calling_ae: str) -> Stored | None:
        """Make a whole encoded Part 10 file durable and indexed.  None if it was already stored."""
        if self.contains(info.sop_instance_uid):
            return None
        reception = self.receive(b"")
        try:
            reception.write(encoded)
        except BaseException:
            reception.discard()
            raise
        return self.commit(reception, info, calling_ae)

    def recover(self) -> None:
        """Drop what a crash left that was never acknowledged (see the module's docstring)."""
        newest = self.index.query("SELECT received_at FROM instances ORDER BY rowid DESC LIMIT 1")
        since = newest[0]["received_at"] - RECOVERY_WINDOW_SECONDS if newest else None
        recent = self._indexed_since(since - 7200) if since is not None else []
        lost = []
        for row in recent:
            if row["received_at"] >= since:
                try:
                    complete = (self.root / row["path"]).stat().st_size == row["size"]
                except OSError:
                    complete = False
                if not complete:
                    lost.append(row)
        if lost:
            with self.index.transaction() as db:
                for row in lost:
                    self._unindex(db, row["sop_instance_uid"], row["series_uid"], row["path"])
                    audit.record(db, "refused", series_uid=row["series_uid"], sop_instance_uid=row["sop_instance_uid"],
                                 status="0xA700", detail="not on disk after a crash; it was never acknowledged")
            log.warning("%d instance(s) indexed just before a crash were not on disk; removed (never acknowledged)",
                        len(lost), extra={"event": "spool.recovered", "instances": len(lost)})
        removed = 0
        # Files in the buckets read below were all indexed (if at all) within two hours of ``since``.
        known = {row["path"] for row in recent} - {row["path"] for row in lost}
        for folder in self._recent_buckets(since):
            for entry in os.scandir(folder):
                if entry.name.endswith(".part"):
                    os.unlink(entry.path)
                    removed += 1
                elif since is not None and entry.name.endswith(".dcm"):
                    if str(Path(entry.path).relative_to(self.root)) not in known:
                        os.unlink(entry.path)
                        removed += 1
        if removed:
            log.warning("%d file(s) of receptions a stop cut short were removed", removed,
                        extra={"event": "spool.cleaned", "files": removed})

    def _indexed_since(self, since: float) -> list:
        """Rows indexed at or after ``since``, newest first, reading no older rows than needed."""
        rows = []
        cursor = self.index.connection().execute(
            "SELECT sop_instance_uid, series_uid, path, size, received_at FROM instances ORDER BY rowid DESC")
        for row in cursor:
            if row["received_at"] < since - 3600:  # an hour's slack for a clock set back meanwhile
                break
            if row["received_at"] >= since:
                rows.append(row)
        cursor.close()
        return rows

    def _recent_buckets(self, since: float | None) -> list[Path]:
        """Hour folders that may hold files written at or after ``since`` (all of them if None)."""
        first = "" if since is None else datetime.fromtimestamp(since - 3600, timezone.utc).strftime("%Y%m%d/%H")
        buckets = []
        for day in sorted(self.root.iterdir()):
            if not (day.is_dir() and len(day.name) == 8 and day.name.isdigit()) or day.name < first[:8]:
                continue
            for hour in sorted(day.iterdir()):
                if hour.is_dir() and f"{day.name}/{hour.name}" >= first:
                    buckets.append(hour)
        return buckets

    def instance_paths(self, series_uid: str) -> list[Path]:
        rows = self.index.query(
            "SELECT path FROM instances WHERE series_uid = ? ORDER BY received_at", (series_uid,))
        return [self.root / r["path"] for r in rows]
