"""The embedded instance's watchdog, without Ray: stand-in processes carry the run's marker."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

from orchestrator.local_ray import RUN_MARKER, processes_of, watch, watchdog_log_path

SLEEPER = [sys.executable, "-c", "import signal; signal.pause()"]   # waits until killed


def start(cmd, run_dir=None, **kw):
    env = dict(os.environ)
    env.pop(RUN_MARKER, None)
    if run_dir:
        env[RUN_MARKER] = run_dir
    return subprocess.Popen(cmd, env=env, **kw)


def test_a_dead_driver_is_noticed_even_while_its_pipe_stays_open(tmp_path):
    """A pipe end inherited by some other process keeps the pipe open: the pid tells instead."""
    run_dir = str(tmp_path / "cxr-ray-x")
    os.makedirs(run_dir)
    driver = start(SLEEPER)
    instance = [start(SLEEPER, run_dir) for _ in range(2)]
    bystander = start(SLEEPER, str(tmp_path / "cxr-ray-other"))
    read_end, write_end = os.pipe()          # we hold the write end: it never closes
    try:
        time.sleep(0.5)                      # the children have exec'd (their environ is final)
        assert sorted(processes_of(run_dir)) == sorted(p.pid for p in instance)
        driver.kill()
        driver.wait()
        started = time.monotonic()
        status = []
        with os.fdopen(read_end, "rb", buffering=0) as stream:
            waiter = threading.Thread(target=lambda: status.append(
                watch(run_dir, driver.pid, stream=stream, poll=0.1)), daemon=True)
            waiter.start()
            waiter.join(timeout=20)
            assert status == [0], "the watchdog did not notice the dead driver"
        assert time.monotonic() - started < 10
        assert all(p.wait(timeout=5) is not None for p in instance)
        assert bystander.poll() is None      # another run's processes are left alone
        assert not os.path.exists(run_dir)
    finally:
        os.close(write_end)
        for p in [driver, bystander, *instance]:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_done_means_no_clean_up(tmp_path):
    run_dir = str(tmp_path / "cxr-ray-y")
    os.makedirs(run_dir)
    process = start(SLEEPER, run_dir)
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, b"done\n")
        os.close(write_end)
        with os.fdopen(read_end, "rb", buffering=0) as stream:
            assert watch(run_dir, os.getpid(), stream=stream, poll=0.1) == 0
        assert process.poll() is None and os.path.isdir(run_dir)
    finally:
        process.kill()
        process.wait()


def test_the_log_sits_next_to_the_run_directory_it_outlives(tmp_path):
    assert watchdog_log_path(str(tmp_path / "cxr-ray-z") + "/") == str(tmp_path / "cxr-ray-z.watchdog.log")


def test_a_ray_program_with_a_log_open_inside_is_found_without_the_marker(tmp_path):
    """A process whose environment reads back without the marker is still found by what it runs
    (this Python, or Ray's binaries) and a file it holds open in the run directory; another
    program (a user's ``tail -f`` on a log) is not."""
    import shutil
    run_dir = str(tmp_path / "cxr-ray-w")
    os.makedirs(run_dir)
    logs = [open(os.path.join(run_dir, f"{i}.log"), "wb") for i in range(2)]
    ours = start(SLEEPER, stdout=logs[0])
    users = start([shutil.which("tail"), "-f", logs[1].name], stdout=subprocess.DEVNULL)
    outside = start(SLEEPER)
    try:
        time.sleep(0.5)
        assert processes_of(run_dir) == [ours.pid]
    finally:
        for p in (ours, users, outside):
            p.kill()
            p.wait()
        for f in logs:
            f.close()
