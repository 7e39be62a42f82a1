"""One driver per sweep: a lease in ``STORAGE/NAME/driver.lock`` (``SweepFolder.lock_file``).

Two drivers on one sweep would train the same trial into one folder and overwrite each other's
ledger entries, so the second driver must refuse. A plain lock file would outlive a crashed
driver, so the lock is a *lease*: a small JSON document naming its holder (host, pid, start time,
run id, command) with a heartbeat time. The holder rewrites the heartbeat every ``heartbeat_s``;
a lease whose heartbeat is older than ``lease_s`` has lapsed and the next driver takes it. A
holder on this host whose pid is gone has lapsed at once (no need to wait for the expiry).

How the lease is created, and what that guarantees:

================  ============================================  ====================================
storage           create                                        guarantee
================  ============================================  ====================================
local / shared    ``open(O_CREAT | O_EXCL)``                    exactly one creator (POSIX; NFSv3+
filesystem                                                      honours O_EXCL)
``s3://``         ``PutObject`` with ``If-None-Match: *``       exactly one creator (S3 conditional
(boto3 present)   (conditional write)                           writes; MinIO and moto support it)
``s3://``         PUT, wait ``SETTLE_S``, read back the token   two drivers starting within one
(no boto3, or a   (lease with read-back)                        PUT of each other can both pass;
server without                                                  the loser sees the other's token at
conditional PUT)                                                its next heartbeat and stops
================  ============================================  ====================================

Taking over a lapsed lease, or a live one with ``take_over=True`` (``--take-over``: the user
states the other driver is gone), replaces the document and reads it back. A driver whose
heartbeat finds another holder's token in the lock has lost it: it stops its sweep (the main
thread gets a KeyboardInterrupt, recorded as interrupted), so two drivers never run on for long.
Expiry compares wall clocks of different hosts: keep them in NTP sync (skew eats into ``lease_s``).
"""
from __future__ import annotations

import _thread
import contextlib
import datetime as _dt
import json
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Iterator
from urllib.parse import parse_qs, urlsplit

from common import storage
from common.cli import UserError

#: A lease not renewed for this long has lapsed (a crashed driver's lock frees itself).
LEASE_S = 60.0
#: How often the holder renews its lease.
HEARTBEAT_S = 15.0
#: S3 without conditional writes: wait this long after the PUT before reading the lease back.
SETTLE_S = 2.0


class LockHeld(UserError):
    """Another driver holds the sweep's lock (its message names the holder and the way out)."""


@dataclass
class Lease:
    """The content of ``driver.lock``."""
    token: str
    host: str
    pid: int
    started: str                   # ISO time the holder took the lock
    heartbeat: float               # time.time() of the last renewal
    lease_s: float
    run_id: str = ""
    command: str = ""
    extra: dict = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        return (json.dumps(asdict(self), indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> "Lease":
        doc = json.loads(data.decode("utf-8"))
        return cls(token=str(doc["token"]), host=str(doc["host"]), pid=int(doc["pid"]),
                   started=str(doc["started"]), heartbeat=float(doc["heartbeat"]),
                   lease_s=float(doc["lease_s"]), run_id=str(doc.get("run_id", "")),
                   command=str(doc.get("command", "")), extra=dict(doc.get("extra") or {}))

    def age(self, now: float | None = None) -> float:
        return (time.time() if now is None else now) - self.heartbeat

    def lapsed(self, now: float | None = None) -> bool:
        if self.age(now) > self.lease_s:
            return True
        return self.host == socket.gethostname() and not _pid_alive(self.pid)

    def describe(self) -> str:
        return (f"host {self.host}, pid {self.pid}, started {self.started}"
                + (f", run {self.run_id}" if self.run_id else "")
                + f", last heartbeat {max(0.0, self.age()):.0f} s ago")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # alive, someone else's
        return True
    return True


def _now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# --- the three create-if-absent primitives ---------------------------------------------------------
def _create_local(path: str, data: bytes) -> bool:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return True


def _s3_client_and_key(location: str):
    """A boto3 client and (bucket, key) for an ``s3://`` location, or None without boto3."""
    try:
        import boto3
    except ImportError:
        return None
    parts = urlsplit(location)
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    endpoint = query.get("endpoint_override")
    if endpoint and "://" not in endpoint:
        endpoint = f"{query.get('scheme', 'https')}://{endpoint}"
    kwargs = {}
    if endpoint:
        kwargs["endpoint_url"] = endpoint
    region = query.get("region") or os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    if region:
        kwargs["region_name"] = region
    client = boto3.client("s3", **kwargs)
    return client, parts.netloc, parts.path.lstrip("/")


def _create_s3_conditional(location: str, data: bytes) -> bool | None:
    """True/False: created / already there; None: no boto3 or no conditional-write support."""
    target = _s3_client_and_key(location)
    if target is None:
        return None
    client, bucket, key = target
    from botocore.exceptions import ClientError
    try:
        client.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
        return True
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
            return False
        if code in ("NotImplemented", "InvalidArgument") or status == 501:
            return None
        raise


def _read(location: str) -> Lease | None:
    """The lease in ``location``; None when absent. A damaged lock file counts as lapsed."""
    try:
        data = storage.read_bytes(location)
    except FileNotFoundError:
        return None
    try:
        return Lease.from_bytes(data)
    except (ValueError, KeyError, TypeError):
        return Lease(token="damaged", host="?", pid=-1, started="?", heartbeat=0.0, lease_s=0.0)


class DriverLock:
    """The lease on one sweep; use as a context manager around everything a driver writes."""

    def __init__(self, location: str, *, run_id: str = "", command: str = "",
                 lease_s: float = LEASE_S, heartbeat_s: float | None = None,
                 take_over: bool = False, settle_s: float = SETTLE_S,
                 interrupt_on_loss: bool = True, log=None):
        if lease_s <= 0:
            raise ValueError("lease_s must be positive")
        self.location = location
        self.lease_s = float(lease_s)
        self.heartbeat_s = float(heartbeat_s if heartbeat_s is not None else min(HEARTBEAT_S,
                                                                                  lease_s / 4))
        self.take_over = take_over
        self.settle_s = settle_s
        self.interrupt_on_loss = interrupt_on_loss
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.lease = Lease(token=uuid.uuid4().hex, host=socket.gethostname(), pid=os.getpid(),
                           started=_now_iso(), heartbeat=time.time(), lease_s=self.lease_s,
                           run_id=run_id, command=command)
        self.lost = threading.Event()
        self.took_over: Lease | None = None       # the lapsed/replaced lease, when there was one
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- acquire ----------------------------------------------------------------------------------
    def acquire(self) -> "DriverLock":
        self.lease.heartbeat = time.time()
        if self._create():
            self._start_heartbeat()
            return self
        current = _read(self.location)
        if current is not None and not (self.take_over or current.lapsed()):
            raise LockHeld(self._held_message(current))
        self.took_over = current
        if current is not None:
            why = ("--take-over" if self.take_over and not current.lapsed()
                   else "its lease lapsed" if current.token != "damaged" else "the lock file is damaged")
            self.log(f"taking over the sweep lock {storage.display(self.location)} from "
                     f"{current.describe() if current.token != 'damaged' else 'an unreadable lock'}"
                     f" ({why})")
        self._replace(expected=current)
        self._start_heartbeat()
        return self

    def _create(self) -> bool:
        data = self.lease.to_bytes()
        if not storage.is_remote(self.location):
            return _create_local(storage.resolve(self.location)[1], data)
        if storage.scheme(self.location) == "s3":
            created = _create_s3_conditional(self.location, data)
            if created is not None:
                return created
        return self._create_read_back(data)

    def _create_read_back(self, data: bytes) -> bool:
        if _read(self.location) is not None:
            return False
        storage.write_bytes(self.location, data)
        time.sleep(self.settle_s)
        now = _read(self.location)
        if now is not None and now.token == self.lease.token:
            return True
        if now is None:   # deleted in between by a releasing driver: try again once
            return self._create_read_back(data)
        return False

    def _replace(self, expected: Lease | None) -> None:
        """Take a lapsed (or ``take_over``) lease: replace the document, then read it back."""
        if not storage.is_remote(self.location):
            path = storage.resolve(self.location)[1]
            # Move the old lease aside first: of several drivers breaking it at once, one rename
            # wins, and only the O_EXCL create that follows decides who holds the new lease.
            aside = f"{path}.broken-{uuid.uuid4().hex[:8]}"
            with contextlib.suppress(FileNotFoundError):
                os.rename(path, aside)
                moved = _read(aside)
                if expected is not None and moved is not None and moved.token != expected.token:
                    # someone took the lease between our read and the rename: give it back
                    with contextlib.suppress(FileExistsError):
                        os.link(aside, path)
                    os.remove(aside)
                    raise LockHeld(self._held_message(moved))
                os.remove(aside)
            if not _create_local(path, self.lease.to_bytes()):
                raise LockHeld(self._held_message(_read(self.location) or expected))
            return
        storage.write_bytes(self.location, self.lease.to_bytes())
        time.sleep(self.settle_s)
        now = _read(self.location)
        if now is None or now.token != self.lease.token:
            raise LockHeld(self._held_message(now or expected))

    def _held_message(self, holder: Lease | None) -> str:
        who = holder.describe() if holder is not None else "another driver"
        lapse = ""
        if holder is not None and holder.token != "damaged":
            lapse = f"; its lease lapses {max(0.0, holder.lease_s - holder.age()):.0f} s after its last heartbeat"
        return (f"another driver is running this sweep ({who}; lock {storage.display(self.location)})"
                f"{lapse}. Wait for it to finish, or if it is dead re-run with --take-over")

    # --- heartbeat and release -------------------------------------------------------------------
    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="sweep-lock-heartbeat", daemon=True)
        self._thread.start()

    def renew(self) -> bool:
        """Rewrite the heartbeat if the lease is still ours; False (and ``lost`` set) otherwise."""
        current = _read(self.location)
        if current is None or current.token != self.lease.token:
            self.lost.set()
            return False
        self.lease.heartbeat = time.time()
        storage.write_bytes(self.location, self.lease.to_bytes())
        return True

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                ok = self.renew()
            except Exception as exc:   # storage hiccup: keep trying until the lease would lapse
                self.log(f"warning: cannot renew the sweep lock {storage.display(self.location)}: "
                         f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
                continue
            if not ok:
                holder = _read(self.location)
                self.log(f"error: the sweep lock {storage.display(self.location)} was taken over by "
                         f"{holder.describe() if holder else 'another driver'}; stopping this driver")
                if self.interrupt_on_loss:
                    _thread.interrupt_main()
                return

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still ours."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self._thread = None
        with contextlib.suppress(Exception):
            current = _read(self.location)
            if current is not None and current.token == self.lease.token:
                storage.delete(self.location)

    def __enter__(self) -> "DriverLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def driver_lock(lock_file: str, **kwargs) -> Iterator[DriverLock]:
    """``with driver_lock(SweepFolder(loc).lock_file, run_id=..., take_over=...):`` run the sweep."""
    lock = DriverLock(lock_file, **kwargs)
    lock.acquire()
    try:
        yield lock
    finally:
        lock.release()
