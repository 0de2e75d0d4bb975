"""The receive journal: an acknowledged instance is durable without flushing the file system.

Making a new file durable costs a journal commit of the file system (its inode, its blocks, its
directory entry) and a flush of the disk's cache; ``syncfs`` also writes whatever every other
program on that file system has in flight.  On these machines that was a millisecond per CT slice
with the machine quiet and several under load, as much as dcmtk's whole receive cycle.

Databases meet the same problem with a write-ahead log in preallocated files, and so does this:

* Journal files (``data_dir/journal/jNNN.wal``) are written full of zeros once, when created, so
  their blocks are allocated and written: overwriting them later changes no metadata, and a
  ``fdatasync`` of one only waits for its own data blocks and the disk cache flush.
* While an instance arrives, its bytes go both to its spool file (the page cache, as before) and,
  through an aligned buffer with ``O_DIRECT``, into a record of a journal file that this reception
  holds alone.  When the last byte is in and the instance is renamed and indexed, the record's
  data are flushed (``fdatasync``), then its header block is written with ``O_DSYNC``: only a
  record whose header is on disk counts, and the header goes to disk after the data it describes,
  so a crash between the two leaves a record that recovery ignores.  The C-STORE is answered
  0x0000 after the header is written.
* A checkpoint, in a background thread, makes the spool files and the index durable the ordinary
  way (``syncfs``) and then records, durably, an epoch number: every record older than it is
  covered and its journal space may be reused.  A record carries the epoch current when it was
  committed, read after its spool file was renamed and indexed, so a checkpoint's ``syncfs``,
  which starts after the epoch moved on, covers every record of the older epochs.
* After a crash, :meth:`Journal.records` gives every record at or after the checkpointed epoch;
  the spool writes each one's file again from the journal and indexes it if the row is missing.

A header is valid only with the journal's random key (kept in the checkpoint file), the epoch and
a CRC-32 of the header: a data set that happens to contain, or was made to contain, bytes that
look like a header is never taken for one.  A file system that refuses ``O_DIRECT`` (tmpfs) gets
no journal and the spool flushes the file system per instance instead.
"""

from __future__ import annotations

import errno
import json
import logging
import mmap
import os
import secrets
import struct
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

log = logging.getLogger("appliance.journal")

#: Alignment of O_DIRECT offsets, lengths and buffers; also the size of a record's header block.
BLOCK = 4096
#: Bytes gathered before one O_DIRECT write.
STAGE_BYTES = 1 << 20
MAGIC = b"APPLJRN1"
#: magic, key, CRC-32 of what follows it in the block, epoch, data length, metadata length.
_HEADER = struct.Struct("<8s16sIQQI")
#: Start a checkpoint once a journal file is this full, so it can be reused soon.
CHECKPOINT_FILL = 0.5
#: Larger instances (radiographs, mammograms) are not journalled: their flush is bound by the
#: disk's bandwidth, not by the file system's commit, and the journal would write them twice.
MAX_RECORD_BYTES = 4 << 20


def _align(n: int) -> int:
    return (n + BLOCK - 1) // BLOCK * BLOCK


def _write_durably(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


@dataclass(frozen=True)
class Record:
    """One committed reception found in the journal."""

    meta: dict
    file: Path
    data_offset: int
    data_length: int

    def read(self) -> bytes:
        with open(self.file, "rb") as f:
            f.seek(self.data_offset)
            return f.read(self.data_length)


class _File:
    """One preallocated journal file; held by one reception at a time."""

    def __init__(self, path: Path, size: int):
        self.path, self.size = path, size
        self.fd = os.open(path, os.O_RDWR | os.O_DIRECT)
        self.sync_fd = os.open(path, os.O_RDWR | os.O_DIRECT | os.O_DSYNC)
        self.stage = mmap.mmap(-1, STAGE_BYTES)   # page-aligned, as O_DIRECT requires
        self.header = mmap.mmap(-1, BLOCK)
        self.offset = 0       # where the next record starts
        self.max_epoch = -1   # newest epoch of a record written since the file was last reused

    def close(self) -> None:
        os.close(self.fd)
        os.close(self.sync_fd)
        self.stage.close()
        self.header.close()


class Journal:
    def __init__(self, folder: Path, file_bytes: int, max_files: int, sync: Callable[[], None],
                 reserve_bytes: int = 0):
        """``sync`` makes the spool and index durable (the spool's group flush of the file system);
        a journal file is made only while ``reserve_bytes`` stay free after it."""
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.file_bytes = _align(max(file_bytes, 4 * STAGE_BYTES))
        self.max_files = max_files
        self._sync = sync
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._free: list[_File] = []
        self._count = 0
        self._reserve = reserve_bytes
        self._refused_until = 0.0   # no new file before this time after one could not be made
        self._written = 0       # records committed since the last checkpoint began
        self._stopping = False
        self._thread: threading.Thread | None = None
        checkpoint = self.folder / "checkpoint"
        if checkpoint.exists():
            state = json.loads(checkpoint.read_text())
            self.durable, self.key = int(state["epoch"]), bytes.fromhex(state["key"])
        else:
            self.durable, self.key = 1, secrets.token_bytes(16)
            _write_durably(checkpoint, json.dumps({"epoch": self.durable, "key": self.key.hex()}))
        self.epoch = self.durable
        existing = sorted(self.folder.glob("j*.wal"))
        for path in existing:
            if path.stat().st_size != self.file_bytes:  # journal_mb changed: the old file is replayed, then replaced
                continue
            self._free.append(_File(path, self.file_bytes))
            self._count += 1


    # ------------------------------------------------------------------------------------------
    # Recovery

    def records(self) -> Iterator[Record]:
        """Every committed record not yet covered by a checkpoint, file by file, oldest first."""
        for path in sorted(self.folder.glob("j*.wal")):
            with open(path, "rb") as f:
                offset, size = 0, os.fstat(f.fileno()).st_size
                while offset + BLOCK <= size:
                    f.seek(offset)
                    block = f.read(BLOCK)
                    meta, length = self._parse(block)
                    if meta is None or offset + BLOCK + length > size:
                        break
                    yield Record(meta, path, offset + BLOCK, length)
                    offset += BLOCK + _align(length)

    def _parse(self, block: bytes) -> tuple[dict | None, int]:
        magic, key, crc, epoch, length, meta_length = _HEADER.unpack_from(block)
        if magic != MAGIC or key != self.key or epoch < self.durable or _HEADER.size + meta_length > BLOCK:
            return None, 0
        if zlib.crc32(block[28:_HEADER.size + meta_length]) != crc:
            return None, 0
        try:
            return json.loads(block[_HEADER.size:_HEADER.size + meta_length]), length
        except ValueError:
            return None, 0

    def drop_stale_files(self) -> None:
        """Remove journal files of another size (journal_mb changed), once their records are replayed."""
        for path in self.folder.glob("j*.wal"):
            if path.stat().st_size != self.file_bytes:
                path.unlink()

    # ------------------------------------------------------------------------------------------
    # Receiving

    def _create(self) -> _File:
        """A new journal file, written full of zeros and flushed, so later writes change no metadata."""
        st = os.statvfs(self.folder)
        if st.f_bavail * st.f_frsize < self.file_bytes + self._reserve:
            raise OSError(errno.ENOSPC, "not enough free space for a journal file above the disk watermark")
        index = 0
        while (self.folder / f"j{index:03d}.wal").exists():
            index += 1
        path = self.folder / f"j{index:03d}.wal"
        tmp = path.with_suffix(".new")
        zeros = bytes(STAGE_BYTES)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        try:
            for _ in range(self.file_bytes // STAGE_BYTES):
                os.write(fd, zeros)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        os.replace(tmp, path)
        dfd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        return _File(path, self.file_bytes)

    def acquire(self) -> "Slot | None":
        """A record to write one reception into, or None (every file busy: the caller flushes instead)."""
        with self._lock:
            jfile = self._free.pop() if self._free else None
            create = jfile is None and self._count < self.max_files and time.monotonic() >= self._refused_until
            if create:
                self._count += 1  # reserved while the file is written outside the lock
        if create:
            try:
                jfile = self._create()
            except OSError as e:
                with self._lock:
                    self._count -= 1
                    self._refused_until = time.monotonic() + 60.0
                log.warning("could not make a journal file (%s); flushing per instance instead", e.strerror,
                            extra={"event": "journal.unavailable"})
                return None
        if jfile is None:
            return None
        with self._lock:
            if jfile.max_epoch < self.durable:
                jfile.offset, jfile.max_epoch = 0, -1  # every record in it is covered by a checkpoint
        return Slot(self, jfile)

    def _release(self, jfile: _File, committed: bool) -> None:
        with self._lock:
            self._free.append(jfile)
            if committed:
                self._written += 1
                if jfile.offset >= self.file_bytes * CHECKPOINT_FILL:
                    self._wake.notify_all()

    def _current_epoch(self) -> int:
        with self._lock:
            return self.epoch

    # ------------------------------------------------------------------------------------------
    # Checkpoints

    def checkpoint(self) -> None:
        """Make everything committed so far durable the ordinary way, then let its space be reused."""
        with self._lock:
            covered = self.epoch
            self.epoch = covered + 1
            self._written = 0
        self._sync()
        _write_durably(self.folder / "checkpoint", json.dumps({"epoch": covered + 1, "key": self.key.hex()}))
        with self._lock:
            self.durable = covered + 1

    def start(self, interval: float = 1.0) -> None:
        """Checkpoint in the background: every ``interval`` seconds with records written, or sooner
        when a journal file is filling up."""
        def run() -> None:
            while True:
                with self._lock:
                    self._wake.wait(interval)
                    if self._stopping:
                        return
                    due = self._written > 0
                if due:
                    try:
                        self.checkpoint()
                    except OSError:
                        log.exception("journal checkpoint failed; will retry", extra={"event": "journal.checkpoint_failed"})

        self._thread = threading.Thread(target=run, name="journal-checkpoint", daemon=True)
        self._thread.start()

    def close(self) -> None:
        with self._lock:
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join()
        if self._written:
            self.checkpoint()
        for jfile in self._free:
            jfile.close()
        self._free.clear()


class Slot:
    """One reception's record: data streamed in through an aligned buffer, then committed."""

    def __init__(self, journal: Journal, jfile: _File):
        self.journal, self.file = journal, jfile
        self.start = jfile.offset
        self.pos = jfile.offset + BLOCK   # the data follow the header block
        self.staged = 0
        self.length = 0
        self.open = True

    def write(self, data: bytes | memoryview) -> bool:
        """Append ``data``; False (and the slot is given back) when the record does not fit."""
        if not self.open:
            return False
        view = memoryview(data)
        if self.length + len(view) > MAX_RECORD_BYTES or self.pos + self.staged + len(view) + BLOCK > self.file.size:
            self.abandon()
            return False
        stage = self.file.stage
        while view:
            n = min(len(view), STAGE_BYTES - self.staged)
            stage[self.staged:self.staged + n] = view[:n]
            self.staged += n
            self.length += n
            view = view[n:]
            if self.staged == STAGE_BYTES:
                self._write_stage(STAGE_BYTES)
        return True

    def _write_stage(self, size: int) -> None:
        written = os.pwrite(self.file.fd, memoryview(self.file.stage)[:size], self.pos)
        if written != size:
            raise OSError(errno.EIO, f"short O_DIRECT write to the journal ({written} of {size} bytes)")
        self.pos += size
        self.staged = 0

    def commit(self, meta: dict) -> None:
        """Make the record durable: its data, then its header.  OSError if the disk says no."""
        if not self.open:
            raise OSError(errno.ENOSPC, "the journal record was given up")
        try:
            if self.staged:
                tail = _align(self.staged)
                self.file.stage[self.staged:tail] = bytes(tail - self.staged)
                self._write_stage(tail)
            os.fdatasync(self.file.fd)
            epoch = self.journal._current_epoch()
            body = json.dumps(meta, separators=(",", ":")).encode()
            if _HEADER.size + len(body) > BLOCK:
                raise OSError(errno.EOVERFLOW, "journal record metadata exceeds a block")
            header = self.file.header
            header[:] = bytes(BLOCK)
            header[_HEADER.size:_HEADER.size + len(body)] = body
            _HEADER.pack_into(header, 0, MAGIC, self.journal.key, 0, epoch, self.length, len(body))
            crc = zlib.crc32(header[28:_HEADER.size + len(body)])
            _HEADER.pack_into(header, 0, MAGIC, self.journal.key, crc, epoch, self.length, len(body))
            if os.pwrite(self.file.sync_fd, header, self.start) != BLOCK:
                raise OSError(errno.EIO, "short write of a journal header")
        except BaseException:
            self.abandon()
            raise
        self.file.offset = self.start + BLOCK + _align(self.length)
        self.file.max_epoch = max(self.file.max_epoch, epoch)
        self.open = False
        self.journal._release(self.file, committed=True)

    def abandon(self) -> None:
        """Give the file back without a record (the space is reused by the next reception)."""
        if self.open:
            self.open = False
            self.journal._release(self.file, committed=False)


def supported(folder: Path) -> bool:
    """Whether ``folder``'s file system takes O_DIRECT writes (tmpfs, for one, does not)."""
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / ".odirect-probe"
    try:
        fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o640)
    except OSError:
        return False
    buf = mmap.mmap(-1, BLOCK)
    try:
        os.pwrite(fd, buf, 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        buf.close()
        probe.unlink(missing_ok=True)
