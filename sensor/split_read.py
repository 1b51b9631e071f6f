"""``read`` in two processes: this one captures and decodes, a second detects, tracks and
writes the alerts and the inventory.

A read keeps two threads busy: libpcap's reader, doing tcpdump's work, and the decoder.
On two cores the decoder sets the pace, and the tracker, the state store and the alert
formats ran on its thread: on a capture whose hosts keep the tracker busy that was a
third of its time, while the reader's core idled half of it.  Records are few (one
packet in a thousand makes one), so handing them over costs far less than handling
them; the state process is forked first thing and loads its half while this one starts
libpcap's reader and loads its own.

The decoder consults the tracker as it goes (which addresses a flow start is evidence
towards, which DNS servers it may leave to the capture filter): track.mirror keeps those
answers here, from the records, so nothing here waits for the other process and the
records are the ones a read in one process makes.  The state process receives them in
order with the packet times its Sensor ticks at, so its alerts and inventory are too.

Messages are pickles on a pipe, each behind its length.  This process sends
``("records", [(ts, records), ...])`` SEND_AFTER groups at a time and ``("end",)``; the state
process answers ``("done", alerts, host list, counters, table sizes)``, or ``("error",
message)`` when its Sensor cannot start (bad state store, say), after which the read
stops and exits 2 as a read in one process does.  If this process dies, the state
process sees the pipe close and still flushes the store and the sinks.
"""

from __future__ import annotations

import gc
import os
import pickle
import signal
import struct
import sys
import traceback
from typing import NamedTuple

from .decoding import Decoding, decoder_interest, tracker_config
from .detect.signatures import SignatureError, default_signature_paths, load_signatures
from .stats import Stats
from .track.mirror import TrackerMirror

_LENGTH = struct.Struct("=I")
PIPE_BYTES = 1 << 20  # so a slow moment of the state process does not stall the decoder
# What decoding_side() raises when the signatures cannot be loaded: reported as a
# Sensor's are.
START_ERRORS = (SignatureError, ValueError, OSError)
# Records groups (one per packet that made records, or a tick) per message.  A message per
# batch (170 on the 858 MB mix) cost the decoding process 36-52 ms in os.write: each wakes
# the state process, which then takes a core from the decoder or libpcap's reader.  At 64
# (17 messages) that was 11-18 ms, and the state process used less CPU too.
SEND_AFTER = 64
# The state process's niceness: it has the least pressing work, and the reader thread's
# batches keep the decoder going.  At 0 the decoder waited 64-100 ms in all for batches on
# the 858 MB mix, at 10 38-65 ms; the state process still keeps up in the cores' gaps.
STATE_NICENESS = 10


class StateProcessFailed(Exception):
    """The state process is gone; what it said (or its exit status) is SplitDecoding.failure."""


class Channel:
    """One direction of a pipe, one pickled message behind its length at a time."""

    def __init__(self, fd: int):
        self.fd = fd

    def send(self, message) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        view = memoryview(_LENGTH.pack(len(data)) + data)
        while view:
            view = view[os.write(self.fd, view):]

    def recv(self):
        header = self._exactly(_LENGTH.size)
        return pickle.loads(self._exactly(_LENGTH.unpack(header)[0]))

    def _exactly(self, size: int) -> bytes:
        chunks = []
        while size:
            chunk = os.read(self.fd, min(size, PIPE_BYTES))
            if not chunk:
                raise EOFError("pipe closed")
            chunks.append(chunk)
            size -= len(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def usable(settings) -> bool:
    """Whether a read asked to split (``--split``, the default) can: two CPUs to run on, no
    metrics endpoint (its exporter reads both halves' counters live), and standard output
    and error that are the process's own descriptors, which the state process writes to."""
    if settings.metrics:
        return False
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    if cpus < 2:
        return False
    try:
        return sys.stdout.fileno() == 1 and sys.stderr.fileno() == 2
    except (AttributeError, ValueError, OSError):
        return False


class StateProcess(NamedTuple):
    pid: int
    outbox: Channel  # to it
    inbox: Channel  # from it

    def abandon(self) -> None:
        """This process cannot start its side: close the pipes and wait for the state
        process, which then stops too."""
        self.outbox.close()
        self.inbox.close()
        os.waitpid(self.pid, 0)


def fork(settings, quiet: bool) -> StateProcess:
    """Fork the state process, first thing: no thread of this one runs yet, and libpcap's
    reader can start right after, reading while both processes load what they need.
    OSError when the system has no process or descriptors to spare (nothing left open)."""
    sys.stdout.flush()
    sys.stderr.flush()
    to_state = os.pipe()
    try:
        from_state = os.pipe()
    except OSError:
        os.close(to_state[0])
        os.close(to_state[1])
        raise
    try:
        import fcntl

        fcntl.fcntl(to_state[1], fcntl.F_SETPIPE_SZ, PIPE_BYTES)
    except (OSError, AttributeError):
        pass  # a smaller pipe only means shorter stretches of decoding ahead
    try:
        pid = os.fork()
    except OSError:
        for fd in (*to_state, *from_state):
            os.close(fd)
        raise
    if pid == 0:
        code = 1
        try:
            os.close(to_state[1])
            os.close(from_state[0])
            code = _state_process(settings, quiet, Channel(to_state[0]), Channel(from_state[1]))
        except BrokenPipeError:
            code = 0  # the decoding process stopped listening; it reports why
        except BaseException:  # noqa: BLE001 - reported, then this process must end here
            traceback.print_exc()
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)
    os.close(to_state[0])
    os.close(from_state[1])
    return StateProcess(pid, Channel(to_state[1]), Channel(from_state[0]))


def decoding_side(settings, state: StateProcess) -> "SplitDecoding":
    """This process's side, its signatures loaded (START_ERRORS if they cannot be: the
    caller abandons the state process and reports it, as a Sensor's failed start)."""
    signatures = load_signatures(settings.signatures or default_signature_paths())
    return SplitDecoding(settings, signatures, state, _stored_resolvers(settings))


def _stored_resolvers(settings) -> list[str]:
    """The resolvers an earlier read left in the state store, which the tracker starts
    with: the decoding process's copy starts with them too (none if the store cannot be
    read here; the state process reports why)."""
    if settings.no_state:
        return []
    path = settings.state
    if path is not None and not os.path.exists(path):
        return []  # a new inventory (the benchmark's): no need to load SQLite here
    from .track.store import Store, StoreError, default_state_path

    path = path or default_state_path()
    if not os.path.exists(path):
        return []
    try:
        store = Store(path, readonly=True)
    except (StoreError, OSError):
        return []
    try:
        return [ip for ip, _ in store.resolvers(tracker_config(settings).max_resolvers)]
    except Exception:  # noqa: BLE001 - any trouble here is the state process's to report
        return []
    finally:
        store.close()


def _state_process(settings, quiet: bool, inbox: Channel, outbox: Channel) -> int:
    """The Sensor's half of the read: records in, alerts and inventory out.  Ctrl-C is the
    decoding process's to handle; it then ends the records as usual."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    reopen_asked = []
    signal.signal(signal.SIGHUP, lambda *_: reopen_asked.append(True))
    os.nice(STATE_NICENESS)
    from .pipeline import SENSOR_START_ERRORS, Sensor

    try:
        sensor = Sensor(settings)
    except SENSOR_START_ERRORS as err:
        outbox.send(("error", str(err)))
        return 0
    signal.signal(signal.SIGHUP, lambda *_: sensor.reopen())
    if reopen_asked:
        sensor.reopen()  # asked while the sinks were opening
    gc.freeze()
    handle_records = sensor.handle_records
    try:
        while True:
            try:
                message = inbox.recv()
            except EOFError:
                break  # the decoding process is gone: keep what it sent
            if message[0] != "records":
                break
            for ts, records in message[1]:
                handle_records(records, ts)
    finally:
        sensor.close(snapshot=not quiet)
    outbox.send(("done", sensor.alerts, sensor.host_snapshot, sensor.stats.counters(),
                 dict(sensor.stats.table_sizes)))
    return 0


class SplitDecoding(Decoding):
    """The decoding process's side: ``cli`` reads into it as into a Sensor."""

    def __init__(self, settings, signatures, state: StateProcess, stored_resolvers=()):
        super().__init__(settings, Stats(), signatures)
        self.mirror = TrackerMirror(tracker_config(settings), signatures, stored_resolvers)
        self.decoder.interest = decoder_interest(signatures, self.mirror.answer_keys)
        self.decoder.report_redundant = self.mirror.report_redundant
        self.pid, self.outbox, self.inbox = state
        self.pending: list = []
        self.alerts = 0
        self.host_snapshot: list[dict] = []
        self.failure: str | None = None
        self.failed_to_start = False

    def handle_records(self, records, ts: float) -> None:
        self.mirror.observe(records)
        self.pending.append((ts, records))
        if ts >= self._next_flush:
            self._decoder_tick(ts)
        if len(self.pending) >= SEND_AFTER:
            self.send()

    def tick(self, ts: float) -> None:
        """A packet without records past the flush time: the state process ticks there."""
        self._decoder_tick(ts)
        self.pending.append((ts, ()))

    def send(self) -> None:
        pending, self.pending = self.pending, []
        try:
            self.outbox.send(("records", pending))
        except BrokenPipeError:
            raise StateProcessFailed from None

    def reopen(self) -> None:
        """SIGHUP: the sinks to reopen are the state process's (none once it is reaped)."""
        if self.pid is not None:
            os.kill(self.pid, signal.SIGHUP)

    def close(self, snapshot: bool = True) -> None:
        """End the records, take the state process's counts and wait for it; ``failure``
        says why it did not finish (``failed_to_start``: its Sensor could not start)."""
        self.decoder.finish()
        try:
            if self.pending:
                self.send()
            self.outbox.send(("end",))
        except (BrokenPipeError, StateProcessFailed):
            pass
        self.outbox.close()
        done = False
        try:
            while not done:
                message = self.inbox.recv()
                if message[0] == "error":
                    self.failure = message[1]
                    self.failed_to_start = True
                elif message[0] == "done":
                    _, self.alerts, self.host_snapshot, counters, sizes = message
                    self.stats.merge(counters)
                    self.stats.table_sizes.update(sizes)
                    done = True
        except EOFError:
            pass
        self.inbox.close()
        _, status = os.waitpid(self.pid, 0)
        self.pid = None
        if self.failure is None and not done:
            self.failure = f"state process exited unexpectedly ({_describe(status)})"


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exit code {os.waitstatus_to_exitcode(status)}"
