"""The alert spool: kill alerts on disk until every receiver has them, written off the event
thread.

`Spool` is the disk: ``queue/<ns>-<id>.json`` (one file per alert not yet taken by every
receiver; written to a temp file, fsynced, renamed, the directory fsynced),
``sent/<receiver>/<name>`` (taken by that receiver, while another has not), ``corrupt/``
(files that held no alert, moved aside). It is read at start, so a restart loses nothing.

`SpoolWriter` owns every disk write of an alert. Notifier.notify() hands it an alert and
returns: the alert waits in memory (`incoming`) until the writer thread has written it, and
only then goes to the delivery lanes, so an alert a receiver got was on disk first whenever
the disk took it. When a write fails (disk full, I/O error) that alert and every later one
go to the lanes from memory at once (`unspooled`), and the writer retries the spool with a
capped back-off until the disk takes them. Everything in memory and not on disk is bounded
(memory_bytes of JSON); beyond that the oldest are dropped, counted and logged once per
spell. Nothing here sends, decides policy, or raises into notify()'s caller.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from monitor.model.errors import EnvironmentProblem
from monitor.observe.alerts import Alert
from monitor.observe.auditlog import SinkStats

MEMORY_BYTES = 16 * 1024 * 1024  # alerts (as spooled JSON) kept in memory, not on disk
IDLE_SECONDS = 5.0  # the writer thread ends after this long with nothing to write
_NAME_RE = re.compile(r"\d{19}-[0-9a-f-]{36}\.json")

Log = Callable[..., None]


def spool_name(alert: Alert) -> str:
    """The alert's file name: sorts by kill time."""
    return f"{round(alert.starts_at * 1e9):019d}-{alert.id}.json"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """The spool directory (see the module docstring); no threads, no lock of its own."""

    def __init__(self, path: Path, receivers: Sequence[str], log: Log) -> None:
        self.path = path
        self.queue = path / "queue"
        self.receivers = tuple(receivers)
        self.log = log
        self.corrupt = 0  # files moved aside
        self._dirs_ready = False

    def make_dirs(self) -> None:
        if not self._dirs_ready:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
            for d in (self.queue, self.path / "sent",
                      *(self.path / "sent" / n for n in self.receivers)):
                d.mkdir(mode=0o700, exist_ok=True)
            self._dirs_ready = True

    def open(self) -> tuple[dict[str, Alert], dict[str, set[str]]]:
        """Create the spool and read what a previous run left in it (see load()). Raises
        EnvironmentProblem if it cannot be made or read, or if another user could write
        to it (and so forge or remove alerts)."""
        try:
            self.make_dirs()
        except OSError as exc:
            raise EnvironmentProblem(
                f"cannot create the alert spool {self.path}: {exc.strerror or exc}; set "
                "alerts.spool_dir to a writable directory") from exc
        for d in (self.path, self.queue):
            st = d.stat()
            if st.st_uid != os.geteuid() or st.st_mode & 0o022:
                raise EnvironmentProblem(
                    f"the alert spool {d} is not owned by this user or is writable by "
                    "others, who could then forge or remove alerts: chown it and "
                    "chmod go-w it, or set alerts.spool_dir")
        try:
            return self.load()
        except OSError as exc:
            raise EnvironmentProblem(
                f"cannot read the alert spool {self.path}: {exc.strerror or exc} "
                f"({exc.filename}); fix its permissions or set alerts.spool_dir") from exc

    def write(self, name: str, data: bytes) -> None:
        """Write one alert whole or not at all; OSError if the disk refused."""
        self.make_dirs()
        tmp = self.queue / f".{name}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, self.queue / name)
        except OSError:
            tmp.unlink(missing_ok=True)  # a cut-short file would take space and look corrupt
            raise
        _fsync_dir(self.queue)

    def load(self) -> tuple[dict[str, Alert], dict[str, set[str]]]:
        """What a previous run left: the alerts by file name, and per receiver the names it
        took. Complete temp files are recovered, corrupt files moved aside. OSError if the
        spool cannot be read."""
        found: dict[str, Alert] = {}
        for path in sorted(self.queue.iterdir()):
            name = path.name
            final = name[1:-4] if name.startswith(".") and name.endswith(".tmp") else name
            if not _NAME_RE.fullmatch(final):
                self._move_aside(path, "not a spool file name")
                continue
            alert = self._read(path)
            if alert is None:
                continue
            if final != name:  # a write was interrupted after writing it whole
                os.rename(path, self.queue / final)
                self.log("alert recovered from an interrupted spool write",
                         level="warning", alert=alert.id)
            found[final] = alert
        sent: dict[str, set[str]] = {}
        for receiver in self.receivers:
            sent_dir = self.path / "sent" / receiver
            done = {p.name for p in sent_dir.iterdir()}
            for marker in done - found.keys():
                (sent_dir / marker).unlink(missing_ok=True)
            sent[receiver] = done & found.keys()
        return found, sent

    def _read(self, path: Path) -> Alert | None:
        try:
            return Alert.from_json(path.read_text(encoding="utf-8"))
        except OSError as exc:
            self.log("spool file unreadable; left in place", level="error", path=str(path),
                     reason=exc.strerror or str(exc))
            return None
        except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
            self._move_aside(path, str(exc))
            return None

    def _move_aside(self, path: Path, reason: str) -> None:
        corrupt = self.path / "corrupt"
        corrupt.mkdir(mode=0o700, exist_ok=True)
        target = corrupt / path.name
        os.rename(path, target)
        self.corrupt += 1
        self.log("corrupt alert spool file moved aside", level="error", path=str(path),
                 moved_to=str(target), reason=reason)

    def mark(self, receiver: str, name: str) -> None:
        """Note that receiver took the alert (others have not yet)."""
        try:
            path = self.path / "sent" / receiver / name
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
        except OSError as exc:
            self.log("could not note a delivered alert in the spool: after a restart it is "
                     "sent to this receiver again", level="warning", receiver=receiver,
                     spool_file=name, reason=exc.strerror or str(exc))

    def remove(self, name: str) -> None:
        """Delete a spooled alert every receiver has (and its sent markers)."""
        paths = [self.queue / name, *(self.path / "sent" / r / name for r in self.receivers)]
        for path in paths:
            try:
                path.unlink()
            except FileNotFoundError:
                pass  # a marker never written, or a spool write that had failed
            except OSError as exc:
                self.log("could not delete a delivered alert from the spool: after a "
                         "restart it is sent again", level="warning", path=str(path),
                         reason=exc.strerror or str(exc))


class SpoolWriter:
    """Writes accepted alerts to the spool from its own thread (see the module docstring).

    Shares the notifier's condition: every method but accept(), flush() and close() expects
    it held. `to_lanes(name, alert)` (called with it held) hands an alert to every delivery
    lane; `forget(names)` (held) takes alerts that will never be delivered off the lanes.
    """

    def __init__(self, spool: Spool, cond: threading.Condition, log: Log, *,
                 to_lanes: Callable[[str, Alert], None],
                 forget: Callable[[Sequence[str]], None], memory_bytes: int = MEMORY_BYTES,
                 retry_initial: float = 1.0, retry_max: float = 60.0) -> None:
        self.spool = spool
        self._cond = cond
        self.log = log
        self._to_lanes = to_lanes
        self._forget = forget
        self.memory_bytes = memory_bytes
        self.retry_initial, self.retry_max = retry_initial, retry_max
        self._incoming: dict[str, tuple[Alert, bytes]] = {}  # not yet tried, oldest first
        self._unspooled: dict[str, tuple[Alert, int]] = {}  # on the lanes, not on disk
        self._bytes = 0  # JSON size of both
        self._failing = False  # a spell of failed writes is under way
        self._drop_logged = False  # this spell's first drop was logged
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.dropped = 0  # alerts lost: memory bound reached (or unwritten at close)
        self.write_errors = 0  # spool writes that failed

    # --- from notify() ---------------------------------------------------------------

    def accept(self, name: str, alert: Alert, data: bytes) -> None:
        """Take an alert to write; returns at once, the disk untouched."""
        with self._cond:
            if self._unspooled:  # the disk failed already: to the lanes, retried later
                self._unspooled[name] = (alert, len(data))
                self._to_lanes(name, alert)
            else:
                self._incoming[name] = (alert, data)
            self._bytes += len(data)
            dropped = self._bound()
            if self._thread is None:
                self._stopping = False
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name="agentwatch-alerts-spool")
                self._thread.start()
            self._cond.notify_all()
        if dropped:
            self.log("alerts dropped: the spool is unwritable and the alerts kept in memory "
                     "reached their bound; the oldest are dropped", level="error",
                     dropped=dropped, spool_dir=str(self.spool.path),
                     memory_bytes=self.memory_bytes)

    def _bound(self) -> int:
        """(held) Drop the oldest alerts not on disk beyond memory_bytes; returns how many
        to log (this spell's first drop), else 0."""
        victims: list[str] = []
        for name, (_, size) in self._unspooled.items():
            if self._bytes <= self.memory_bytes:
                break
            victims.append(name)
            self._bytes -= size
        for name in victims:
            del self._unspooled[name]
        self._forget(victims)
        gone = len(victims)
        for name in list(self._incoming):
            if self._bytes <= self.memory_bytes:
                break
            self._bytes -= len(self._incoming.pop(name)[1])
            gone += 1
        self.dropped += gone
        if not gone or self._drop_logged:
            return 0
        self._drop_logged = True  # once per spell: a flood must not flood the log too
        return gone

    # --- read under the lock ---------------------------------------------------------

    def waiting(self) -> Iterable[str]:
        """(held) Names accepted and not yet handed to the lanes (pending everywhere)."""
        return self._incoming.keys()

    def stats(self) -> SinkStats:
        """(held) Alerts in memory only, alerts dropped, failed spool writes."""
        return SinkStats(len(self._incoming) + len(self._unspooled), self.dropped,
                         self.write_errors)

    def delivered(self, names: Iterable[str]) -> None:
        """(held) Every receiver took these: what is still in memory need not be written."""
        for name in names:
            kept = self._unspooled.pop(name, None)
            if kept is not None:
                self._bytes -= kept[1]

    # --- the writer thread ------------------------------------------------------------

    def _run(self) -> None:
        attempts = 0  # failed retries in this spell
        while True:
            with self._cond:
                deadline = time.monotonic() + (
                    IDLE_SECONDS if not self._unspooled
                    else min(self.retry_max, self.retry_initial * 2 ** attempts))
                while not self._stopping and not (self._incoming and not self._unspooled):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                if self._stopping or not (self._incoming or self._unspooled):
                    self._thread = None
                    self._cond.notify_all()
                    return
                retry = bool(self._unspooled)
            if not retry:
                self._write_incoming()
                attempts = 0
            elif self._respool():
                with self._cond:
                    if self._unspooled:
                        continue  # accepted meanwhile, while still failing
                    self._failing = self._drop_logged = False
                    dropped = self.dropped
                self.log("alert spool writable again: the alerts kept in memory are spooled",
                         spool_dir=str(self.spool.path), attempts=attempts + 1,
                         dropped_total=dropped)
                attempts = 0
            else:
                attempts += 1

    def _write_incoming(self) -> None:
        """Write the oldest accepted alert; on failure, it and every later one go to the
        lanes from memory."""
        with self._cond:
            name, (alert, data) = next(iter(self._incoming.items()))
        try:
            self.spool.write(name, data)
        except OSError as exc:
            with self._cond:
                self.write_errors += 1
                spell = not self._failing
                self._failing = True
            if spell:
                self.log("alert not spooled: the spool is unwritable; alerts are delivered "
                         "from memory and written to the spool when it can be written again",
                         level="error", alert=alert.id, spool_dir=str(self.spool.path),
                         reason=exc.strerror or str(exc), memory_bytes=self.memory_bytes)
            with self._cond:
                for waiting, (a, d) in self._incoming.items():
                    self._unspooled[waiting] = (a, len(d))
                    self._to_lanes(waiting, a)
                self._incoming.clear()
                self._cond.notify_all()
            return
        with self._cond:
            kept = self._incoming.pop(name, None)
            if kept is not None:
                self._bytes -= len(data)
                self._to_lanes(name, alert)
                self._cond.notify_all()
        if kept is None:  # dropped for memory while it was being written
            self.spool.remove(name)

    def _respool(self) -> bool:
        """Write the alerts kept in memory, oldest first; False at the first failure."""
        while True:
            with self._cond:
                first = next(iter(self._unspooled.items()), None)
            if first is None:
                return True
            name, (alert, _) = first
            try:
                self.spool.write(name, alert.to_json().encode())
            except OSError:
                with self._cond:
                    self.write_errors += 1
                return False
            with self._cond:
                taken = name not in self._unspooled  # every receiver took it meanwhile
                self.delivered([name])
            if taken:
                self.spool.remove(name)

    # --- stopping ---------------------------------------------------------------------

    def flush(self, timeout: float) -> bool:
        """Wait until every accepted alert was tried on disk once (written, or kept in
        memory because the disk refused it); False if timeout came first."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._incoming:
                left = deadline - time.monotonic()
                if left <= 0 or self._thread is None:
                    return False
                self._cond.wait(left)
        return True

    def close(self, timeout: float) -> int:
        """Stop the writer thread after a last try at what is in memory; returns how many
        alerts could not be written (lost: dropped and taken off the lanes)."""
        with self._cond:
            self._stopping = True
            thread = self._thread
            self._cond.notify_all()
        if thread is not None:
            thread.join(timeout)
        with self._cond:
            for name, (alert, data) in self._incoming.items():  # never tried: try now
                self._unspooled[name] = (alert, len(data))
                self._to_lanes(name, alert)
            self._incoming.clear()
        self._respool()  # a last try: what stays unspooled is lost when the monitor stops
        with self._cond:
            lost = list(self._unspooled)
            self._unspooled.clear()
            self._bytes = 0
            self._forget(lost)
            self.dropped += len(lost)
            self._stopping = False  # notify() after close() still spools
            return len(lost)
