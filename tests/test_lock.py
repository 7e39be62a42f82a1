"""One driver per sweep: the lease in driver.lock, with real processes as the drivers."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from common import storage
from common.sweep_folder import SweepFolder
from orchestrator import lock as lock_mod
from orchestrator.lock import DriverLock, Lease, LockHeld

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HOLDER = """
import sys, threading
sys.path.insert(0, {repo!r})
from orchestrator.lock import DriverLock
lock = DriverLock({loc!r}, run_id="first-run", lease_s={lease}, heartbeat_s={beat})
lock.acquire()
print("held", flush=True)
threading.Event().wait()   # hold the lock until the test kills this process
"""


def start_holder(loc: str, lease: float = 30.0, beat: float = 0.5) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER.format(repo=REPO, loc=loc, lease=lease,
                                                                  beat=beat)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)


def test_second_driver_refuses_naming_the_holder(tmp_path):
    loc = SweepFolder(str(tmp_path / "sweep")).lock_file
    first = start_holder(loc)
    try:
        t0 = time.monotonic()
        second = subprocess.run(
            [sys.executable, "-c", f"import sys; sys.path.insert(0, {REPO!r})\n"
             "from orchestrator.lock import DriverLock, LockHeld\n"
             f"try:\n    DriverLock({loc!r}).acquire()\nexcept LockHeld as e:\n"
             "    print(e); sys.exit(3)\nsys.exit(0)"],
            capture_output=True, text=True, timeout=60)
        assert second.returncode == 3, second.stdout + second.stderr
        assert time.monotonic() - t0 < 20
        msg = second.stdout
        assert f"pid {first.pid}" in msg and socket.gethostname() in msg and "run first-run" in msg
        assert "--take-over" in msg and "started 20" in msg
        assert first.poll() is None          # the holder is untouched
        assert Lease.from_bytes(open(loc, "rb").read()).pid == first.pid
    finally:
        stop(first)


def test_killed_holder_on_this_host_frees_the_lock_at_once(tmp_path):
    loc = str(tmp_path / "lease.json")
    first = start_holder(loc, lease=300)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)
    lock = DriverLock(loc, log=lambda m: None).acquire()    # no 300 s wait: the pid is gone
    try:
        assert lock.took_over is not None and lock.took_over.pid == first.pid
        assert Lease.from_bytes(open(loc, "rb").read()).pid == os.getpid()
    finally:
        lock.release()
    assert not os.path.exists(loc)


def write_foreign_lease(loc: str, age: float, lease_s: float) -> None:
    """A lease of a driver on another host (its pid cannot be checked from here)."""
    lease = Lease(token="other", host="other-host.example", pid=4242, started="2026-01-01T00:00:00",
                  heartbeat=time.time() - age, lease_s=lease_s, run_id="theirs")
    os.makedirs(os.path.dirname(loc), exist_ok=True)
    with open(loc, "wb") as f:
        f.write(lease.to_bytes())


def test_lease_of_a_crashed_remote_driver_lapses_after_expiry(tmp_path):
    loc = str(tmp_path / "lease.json")
    write_foreign_lease(loc, age=0.0, lease_s=2.0)
    with pytest.raises(LockHeld, match="other-host.example, pid 4242"):
        DriverLock(loc).acquire()
    time.sleep(2.5)                                   # no heartbeat: the lease lapses
    messages = []
    lock = DriverLock(loc, log=messages.append).acquire()
    try:
        assert "lapsed" in messages[0] and "other-host.example" in messages[0]
    finally:
        lock.release()


def test_heartbeat_keeps_a_live_lease_beyond_its_expiry(tmp_path):
    loc = str(tmp_path / "lease.json")
    first = start_holder(loc, lease=1.5, beat=0.3)
    try:
        time.sleep(3.0)                                # twice the lease: only heartbeats keep it
        # pretend the holder is on another host so only the heartbeat age decides
        lease = Lease.from_bytes(open(loc, "rb").read())
        assert not lease.lapsed() and lease.age() < 1.5
        with pytest.raises(LockHeld):
            DriverLock(loc).acquire()
    finally:
        stop(first)


def test_take_over_and_the_old_holder_notices(tmp_path):
    loc = str(tmp_path / "lease.json")
    old = DriverLock(loc, heartbeat_s=0.2, interrupt_on_loss=False, log=lambda m: None).acquire()
    try:
        with pytest.raises(LockHeld):
            DriverLock(loc).acquire()
        new = DriverLock(loc, take_over=True, log=lambda m: None).acquire()
        assert old.lost.wait(5)                        # the old driver learns it lost the lock
        assert new.took_over.token == old.lease.token
        old.release()                                  # must not delete the new holder's lock
        assert Lease.from_bytes(open(loc, "rb").read()).token == new.lease.token
        new.release()
        assert not os.path.exists(loc)
    finally:
        old.release()


def test_damaged_lock_file_is_replaced(tmp_path):
    loc = str(tmp_path / "lease.json")
    with open(loc, "w") as f:
        f.write('{"token": "abc", "ho')
    messages = []
    with lock_mod.driver_lock(loc, log=messages.append) as held:
        assert held.took_over is not None and "damaged" in messages[0]
        assert json.load(open(loc))["pid"] == os.getpid()


def s3_lock(endpoint: str, name: str) -> str:
    return SweepFolder(f"s3://sweeps/{name}?endpoint_override={endpoint}&scheme=http").lock_file


def test_s3_conditional_put(s3_endpoint):
    endpoint, client = s3_endpoint
    loc = s3_lock(endpoint, "cond")
    first = DriverLock(loc, heartbeat_s=60).acquire()
    try:
        assert lock_mod._create_s3_conditional(loc, b"x") is False   # the server refused the PUT
        with pytest.raises(LockHeld, match=f"pid {os.getpid()}"):
            DriverLock(loc).acquire()
        body = client.get_object(Bucket="sweeps", Key="cond/driver.lock")["Body"].read()
        assert Lease.from_bytes(body).token == first.lease.token
    finally:
        first.release()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket="sweeps", Prefix="cond/").get("Contents", [])]
    assert "cond/driver.lock" not in keys


def test_s3_read_back_lease_without_conditional_put(s3_endpoint, monkeypatch):
    endpoint, _ = s3_endpoint
    monkeypatch.setattr(lock_mod, "_create_s3_conditional", lambda loc, data: None)
    loc = s3_lock(endpoint, "readback")
    first = DriverLock(loc, settle_s=0.1, heartbeat_s=60).acquire()
    try:
        with pytest.raises(LockHeld):
            DriverLock(loc, settle_s=0.1).acquire()
        # a driver that checked before `first` wrote, and PUT just before first's PUT landed:
        # the read-back sees first's token, so the racer refuses
        real_read, calls = lock_mod._read, []

        def read_missing_first(location):
            calls.append(location)
            return None if len(calls) == 1 else real_read(location)
        real_write = storage.write_bytes

        def write_then_other_put(location, data):
            real_write(location, data)
            real_write(location, first.lease.to_bytes())
        monkeypatch.setattr(lock_mod, "_read", read_missing_first)
        monkeypatch.setattr(storage, "write_bytes", write_then_other_put)
        racer = DriverLock(loc, settle_s=0.1)
        assert racer._create_read_back(racer.lease.to_bytes()) is False
        monkeypatch.setattr(storage, "write_bytes", real_write)
        monkeypatch.setattr(lock_mod, "_read", real_read)
        assert first.renew()                      # first still holds its lease
    finally:
        first.release()
