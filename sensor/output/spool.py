"""Bounded on-disk spool: what a network sink could not deliver yet, in order, across restarts.

Layout: a directory of append-only segment files ``<seq>.seg`` (12 digits) plus a small
``cursor`` file.  Each record is ``length:u32 crc32:u32 payload`` (big-endian), so a torn
write or a flipped bit is detected and the damaged tail is cut off when the spool is
opened again, instead of being delivered as garbage.

Reading is two-phase, like a message-queue consumer: ``read_next`` hands out a record
and a token without forgetting it; ``commit(token)`` marks everything up to that record as
delivered; ``rewind`` goes back to the last commit after a connection failure.  The sink
commits only once the receiver has the data, which makes delivery at-least-once.

Bounds: ``max_bytes`` caps the files on disk.  When an append would exceed it, whole
segments are dropped from the OLDEST end and the records they held are counted in
``dropped`` (a spool that silently dropped the newest alerts would hide the current state
of the network).  Segments are ``segment_bytes`` (at most a quarter of the cap) so a drop
loses a bounded slice.

Durability (``fsync`` policy):

* ``"interval"`` (default): every record is written to the kernel at once (survives a
  crash of the sensor); the segment is fsync'ed at most once per ``fsync_interval``
  seconds, on segment roll and on close (a power loss can cost the last interval).
* ``"always"``: fsync after every record (slow disks make this expensive).
* ``"never"``: leave it to the kernel.

The cursor is rewritten atomically (temp file + rename) at most every
``CURSOR_INTERVAL`` seconds and on close; after a crash the records committed since the
last cursor write are delivered again (duplicates, never loss).
"""

from __future__ import annotations

import os
import struct
import threading
import time
import zlib

RECORD_HEADER = struct.Struct(">II")
FIRST_SEQ = 10 ** 9  # leaves room below for prepended segments
SEQ_DIGITS = 12
CURSOR_INTERVAL = 0.5
MAX_RECORD = 16 * 1024 * 1024
FSYNC_POLICIES = ("interval", "always", "never")

_SEQ, _SIZE, _RECORDS, _SKIP_OFFSET, _SKIP_RECORDS = range(5)


class Spool:
    def __init__(self, directory: str, max_bytes: int = 64 * 1024 * 1024,
                 segment_bytes: int = 4 * 1024 * 1024, fsync: str = "interval",
                 fsync_interval: float = 1.0):
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"spool fsync policy must be one of {', '.join(FSYNC_POLICIES)}")
        if max_bytes < 4096:
            raise ValueError("spool size cap must be at least 4096 bytes")
        self.directory = directory
        self.max_bytes = max_bytes
        self.segment_bytes = max(1024, min(segment_bytes, max_bytes // 4))
        self.fsync = fsync
        self.fsync_interval = fsync_interval
        self.dropped = 0
        self._unsynced = False
        self._lock = threading.Lock()
        # each: [seq, size, records, committed prefix bytes, committed prefix records]
        self._segments: list[list[int]] = []
        self._writer: int | None = None
        self._last_fsync = time.monotonic()
        self._reader: tuple[int, int] | None = None  # (seq, fd)
        self._read_index = 0  # segment being read
        self._read_offset = 0  # next record's offset in it
        self._read_in_segment = 0  # records of that segment before the offset
        self._read_count = 0  # records handed out and not yet committed
        self._cursor_dirty = False
        self._cursor_written = 0.0
        os.makedirs(directory, exist_ok=True)
        self._recover()

    # -- state ---------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Records not yet committed (includes those handed out by ``read_next``)."""
        with self._lock:
            return self._pending()

    @property
    def size_bytes(self) -> int:
        with self._lock:
            return sum(seg[_SIZE] for seg in self._segments)

    def _pending(self) -> int:
        return sum(seg[_RECORDS] - seg[_SKIP_RECORDS] for seg in self._segments)

    def _path(self, seq: int) -> str:
        return os.path.join(self.directory, f"{seq:0{SEQ_DIGITS}d}.seg")

    # -- writing ---------------------------------------------------------------

    def append(self, payload: bytes) -> None:
        with self._lock:
            if len(payload) + RECORD_HEADER.size > min(self.max_bytes // 2, MAX_RECORD):
                self.dropped += 1
                return
            record = RECORD_HEADER.pack(len(payload), zlib.crc32(payload)) + payload
            self._make_room(len(record))
            if not self._segments or self._segments[-1][_SIZE] >= self.segment_bytes:
                self._roll(self._segments[-1][_SEQ] + 1 if self._segments else FIRST_SEQ)
            elif self._writer is None:
                self._writer = os.open(self._path(self._segments[-1][_SEQ]),
                                       os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            os.write(self._writer, record)
            segment = self._segments[-1]
            segment[_SIZE] += len(record)
            segment[_RECORDS] += 1
            self._unsynced = True
            self._maybe_fsync()

    def prepend(self, payloads: list[bytes]) -> None:
        """Put records in front of everything still pending, in the given order: used when
        records held in memory turn out to be older than what the spool already holds.
        Reading restarts from the new front."""
        if not payloads:
            return
        with self._lock:
            self._rewind()
            seq = self._segments[0][_SEQ] - 1 if self._segments else FIRST_SEQ
            records = [RECORD_HEADER.pack(len(p), zlib.crc32(p)) + p for p in payloads
                       if len(p) + RECORD_HEADER.size <= min(self.max_bytes // 2, MAX_RECORD)]
            self.dropped += len(payloads) - len(records)
            blob = b"".join(records)
            fd = os.open(self._path(seq), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, blob)
                if self.fsync != "never":
                    os.fsync(fd)
            finally:
                os.close(fd)
            self._segments.insert(0, [seq, len(blob), len(records), 0, 0])
            self._rewind()
            self._cursor_dirty = True
            self._make_room(0)

    def _roll(self, seq: int) -> None:
        if self._writer is not None:
            self._sync()
            os.close(self._writer)
        self._writer = os.open(self._path(seq), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._segments.append([seq, 0, 0, 0, 0])

    def _maybe_fsync(self) -> None:
        if self.fsync == "always" or (
                self.fsync == "interval" and time.monotonic() - self._last_fsync >= self.fsync_interval):
            self._sync()

    def _sync(self) -> None:
        if self._unsynced and self._writer is not None and self.fsync != "never":
            os.fsync(self._writer)
        self._unsynced = False
        self._last_fsync = time.monotonic()

    def _make_room(self, incoming: int) -> None:
        """Drop whole segments from the oldest end until ``incoming`` more bytes fit."""
        segments = self._segments
        total = sum(seg[_SIZE] for seg in segments)
        while segments and total + incoming > self.max_bytes:
            if len(segments) == 1:
                if segments[0][_SIZE] == 0:
                    break
                self._roll(segments[0][_SEQ] + 1)
            oldest = self._pop_first()
            total -= oldest[_SIZE]
            self.dropped += oldest[_RECORDS] - oldest[_SKIP_RECORDS]

    def _delete(self, seq: int) -> None:
        if self._reader is not None and self._reader[0] == seq:
            self._close_reader()
        try:
            os.unlink(self._path(seq))
        except FileNotFoundError:
            pass

    # -- reading ---------------------------------------------------------------

    def read_next(self) -> tuple[bytes, tuple[int, int, int]] | None:
        """The next unread record and the token that commits it, or None when all are read."""
        with self._lock:
            segments = self._segments
            while self._read_index < len(segments):
                segment = segments[self._read_index]
                if self._read_offset < segment[_SIZE]:
                    payload = self._read_record(segment)
                    if payload is not None:
                        self._read_in_segment += 1
                        self._read_count += 1
                        return payload, (segment[_SEQ], self._read_offset, self._read_in_segment)
                    self._drop_corrupt_tail(segment)
                    continue
                if self._read_index == len(segments) - 1:
                    return None
                self._read_index += 1
                self._enter(segments[self._read_index])
            return None

    def _enter(self, segment: list[int]) -> None:
        self._close_reader()
        self._read_offset = segment[_SKIP_OFFSET]
        self._read_in_segment = segment[_SKIP_RECORDS]

    def _read_record(self, segment: list[int]) -> bytes | None:
        fd = self._reader_fd(segment[_SEQ])
        header = os.pread(fd, RECORD_HEADER.size, self._read_offset)
        if len(header) < RECORD_HEADER.size:
            return None
        length, crc = RECORD_HEADER.unpack(header)
        if length > MAX_RECORD or self._read_offset + RECORD_HEADER.size + length > segment[_SIZE]:
            return None
        payload = os.pread(fd, length, self._read_offset + RECORD_HEADER.size)
        if len(payload) != length or zlib.crc32(payload) != crc:
            return None
        self._read_offset += RECORD_HEADER.size + length
        return payload

    def _drop_corrupt_tail(self, segment: list[int]) -> None:
        """A damaged record loses the rest of its segment (the framing cannot resync)."""
        self.dropped += max(1, segment[_RECORDS] - self._read_in_segment)
        segment[_RECORDS] = self._read_in_segment
        segment[_SIZE] = self._read_offset
        if segment is self._segments[-1] and self._writer is not None:
            os.ftruncate(self._writer, self._read_offset)
        else:
            os.truncate(self._path(segment[_SEQ]), self._read_offset)

    def _reader_fd(self, seq: int) -> int:
        if self._reader is None or self._reader[0] != seq:
            self._close_reader()
            self._reader = (seq, os.open(self._path(seq), os.O_RDONLY))
        return self._reader[1]

    def _close_reader(self) -> None:
        if self._reader is not None:
            os.close(self._reader[1])
            self._reader = None

    def _pop_first(self) -> list[int]:
        """Remove the oldest segment, keeping the read position on the same record."""
        segment = self._segments.pop(0)
        if self._read_index > 0:
            self._read_index -= 1
            self._read_count -= segment[_RECORDS] - segment[_SKIP_RECORDS]
        else:
            self._read_count = 0
            if self._segments:
                self._enter(self._segments[0])
        self._delete(segment[_SEQ])
        self._cursor_dirty = True
        return segment

    def commit(self, token: tuple[int, int, int]) -> None:
        """Everything up to and including the record behind ``token`` is delivered."""
        seq, offset, index = token
        with self._lock:
            segments = self._segments
            while segments and segments[0][_SEQ] < seq:
                self._pop_first()
            if not segments or segments[0][_SEQ] != seq:
                return
            first = segments[0]
            if offset > first[_SKIP_OFFSET]:
                self._read_count -= min(index, first[_RECORDS]) - first[_SKIP_RECORDS]
                first[_SKIP_OFFSET] = offset
                first[_SKIP_RECORDS] = min(index, first[_RECORDS])
                self._cursor_dirty = True
            if first[_SKIP_OFFSET] >= first[_SIZE] and len(segments) > 1:
                self._pop_first()
            if time.monotonic() - self._cursor_written >= CURSOR_INTERVAL:
                self._write_cursor()

    def rewind(self) -> None:
        """Forget what was read but not committed: it will be read again."""
        with self._lock:
            self._rewind()

    def _rewind(self) -> None:
        self._read_index = 0
        self._read_count = 0
        self._close_reader()
        self._read_offset = self._read_in_segment = 0
        if self._segments:
            self._enter(self._segments[0])

    # -- persistence -------------------------------------------------------------

    def _write_cursor(self) -> None:
        lines = "".join(f"{seg[_SEQ]} {seg[_SKIP_OFFSET]} {seg[_SKIP_RECORDS]}\n"
                        for seg in self._segments if seg[_SKIP_OFFSET])
        path = os.path.join(self.directory, "cursor")
        tmp = path + ".tmp"
        with open(tmp, "w") as handle:
            handle.write(lines)
            if self.fsync != "never":
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
        self._cursor_dirty = False
        self._cursor_written = time.monotonic()

    def _read_cursor(self) -> dict[int, int]:
        skips: dict[int, int] = {}
        try:
            with open(os.path.join(self.directory, "cursor")) as handle:
                for line in handle.read(65536).splitlines()[:64]:
                    parts = line.split()
                    if len(parts) == 3 and all(p.isdigit() for p in parts):
                        skips[int(parts[0])] = int(parts[1])
        except OSError:
            pass
        return skips

    def _recover(self) -> None:
        """Rebuild the index from the files; cut any damaged tail (a torn last write)."""
        skips = self._read_cursor()
        seqs = sorted(int(name[:-4]) for name in os.listdir(self.directory)
                      if name.endswith(".seg") and name[:-4].isdigit())
        for seq in seqs:
            size, records, skip_records, skip_offset = self._scan(seq, skips.get(seq, 0))
            if records == 0 or skip_records >= records:
                self._delete(seq)
                continue
            self._segments.append([seq, size, records, skip_offset, skip_records])
        if self._segments:
            self._writer = os.open(self._path(self._segments[-1][_SEQ]),
                                   os.O_WRONLY | os.O_APPEND, 0o600)
        self._make_room(0)
        self._rewind()

    def _scan(self, seq: int, skip: int) -> tuple[int, int, int, int]:
        path = self._path(seq)
        offset = records = skip_records = skip_offset = 0
        with open(path, "rb") as handle:
            while True:
                header = handle.read(RECORD_HEADER.size)
                if len(header) < RECORD_HEADER.size:
                    break
                length, crc = RECORD_HEADER.unpack(header)
                if length > MAX_RECORD:
                    break
                payload = handle.read(length)
                if len(payload) != length or zlib.crc32(payload) != crc:
                    break
                offset += RECORD_HEADER.size + length
                records += 1
                if offset <= skip:
                    skip_records = records
                    skip_offset = offset
        if offset != os.path.getsize(path):
            self.dropped += 1
            os.truncate(path, offset)
        return offset, records, skip_records, skip_offset

    def flush(self) -> None:
        """Make appended records and the cursor durable; cheap when nothing changed."""
        with self._lock:
            self._sync()
            if self._cursor_dirty:
                self._write_cursor()

    def close(self) -> None:
        self.flush()
        with self._lock:
            self._close_reader()
            if self._writer is not None:
                os.close(self._writer)
                self._writer = None
