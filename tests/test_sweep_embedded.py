"""The driver killed with SIGKILL mid-sweep, then the same sweep re-run on a fresh private Ray.

The first driver is a subprocess (so it can be killed); the re-run is in-process and starts its
own embedded Ray, which also checks the embedded instance: private run directory, own token, no
~/.ray/auth_token, a stale ``ray_current_cluster`` file ignored, and exactly that instance stopped.
"""
from __future__ import annotations

import io
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest

from common import storage
from orchestrator import ledger
from common.sweep_folder import SweepFolder
from orchestrator.local_ray import (RUN_MARKER, init_kwargs_embedded, processes_of,
                                    watchdog_log_path)
from test_sweep_helpers import (FakeTrial, by_value, make_tiny_store, ray_env, read_jsonl,
                                refresh_ray_auth, run_small_sweep)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = {"epochs_frozen": 1, "epochs_unfrozen": 2, "weights": "none"}

DRIVER = """
import sys
sys.path[:0] = [{repo!r}, {tests!r}]
from test_sweep_helpers import FakeTrial, by_value, run_small_sweep
by_value()
res = run_small_sweep({store!r}, {storage!r}, "kill", resolutions=(32, 40), models=("resnet18",),
                      seeds=(0, 1), trial_fn=FakeTrial(epoch_seconds=2.0), config={config!r},
                      num_cpus=2, num_gpus=0, progress="lines", aggregate=False)
sys.exit(res.exit_code)
"""


def epochs_on_storage(trial_dir: str) -> int:
    """Epoch records in a trial folder (the fake trial checkpoints every recorded epoch)."""
    from common.trial_folder import TrialFolder
    return len(TrialFolder(trial_dir).read_epochs())


@pytest.fixture
def ray_files():
    mp = pytest.MonkeyPatch()
    base = ray_env(mp)
    by_value()
    yield base
    mp.undo()
    refresh_ray_auth()
    shutil.rmtree(base, ignore_errors=True)


def pids_using(marker: str) -> list[int]:
    """Processes of ours whose command line or environment names ``marker``.

    Ray workers rename themselves (``ray::IDLE``), so the environment (CXR_RAY_DIR, inherited from
    the driver we started) is what identifies them."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().decode(errors="replace")
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().decode(errors="replace")
        except OSError:
            continue
        if marker in cmd or f"CXR_RAY_DIR={marker}\0" in env + "\0":
            found.append(int(pid))
    return found


def describe(pid: int, run_dir: str) -> str | None:
    """A leftover process for a failure message: its command line, whether it carries the marker,
    its parent; None when it is gone meanwhile."""
    try:
        cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
        env = open(f"/proc/{pid}/environ", "rb").read() + b"\0"
        parent = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1]
    except OSError:
        return None
    marked = f"{RUN_MARKER}={run_dir}\0".encode() in env
    return f"{cmd.strip()[:120]!r} marker={marked} ppid={parent}"


def end_leftovers(marker: str, timeout: float = 30.0) -> None:
    """Give Ray's reaper a chance, then end what is left of the killed run, by pid."""
    deadline = time.time() + timeout
    while pids_using(marker) and time.time() < deadline:
        time.sleep(0.5)
    for pid in pids_using(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_embedded_instance_is_new_even_with_a_stale_cluster_file(ray_files):
    from ray._private import services
    from ray._common.utils import get_ray_address_file
    stale = get_ray_address_file(None)
    os.makedirs(os.path.dirname(stale), exist_ok=True)
    with open(stale, "w") as f:
        f.write(f"127.0.0.1:{closed_port()}")
    # what ray.init(address=None) would do: connect to the stale address
    assert services.canonicalize_bootstrap_address(None, None) is not None
    kwargs = init_kwargs_embedded(ray_files, None, None)
    assert kwargs["address"] == "local" and kwargs["include_dashboard"] is False
    assert kwargs["_temp_dir"].startswith(ray_files)
    assert services.canonicalize_bootstrap_address(kwargs["address"], None) is None  # new instance
    from orchestrator.local_ray import _write_token, make_run_dir
    run_dir = make_run_dir(ray_files)
    token = _write_token(run_dir)
    assert stat.S_IMODE(os.stat(run_dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(token).st_mode) == 0o600 and len(open(token).read()) == 64


@pytest.mark.slow
def test_sigkilled_driver_then_rerun(ray_files, tmp_path):
    import ray
    store = make_tiny_store(tmp_path / "store", resolutions=(32, 40))
    storage_loc = str(tmp_path / "sweeps")
    sweep_loc = storage.join(storage_loc, "kill")
    script = tmp_path / "driver.py"
    script.write_text(DRIVER.format(repo=REPO, tests=os.path.join(REPO, "tests"), store=store,
                                    storage=storage_loc, config=CONFIG))
    run_base = os.path.join(ray_files, "first")
    os.makedirs(run_base)
    env = dict(os.environ, CXR_RAY_DIR=run_base)
    log = open(tmp_path / "driver.log", "wb")
    proc = subprocess.Popen([sys.executable, str(script)], env=env, cwd=str(tmp_path),
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            entries = ledger.read_all(sweep_loc) if os.path.isdir(sweep_loc) else {}
            states = [e["state"] for e in entries.values()]
            midway = [t for t, e in entries.items() if e["state"] == "running"
                      and epochs_on_storage(ledger.trial_dir(sweep_loc, t)) == 1]   # 2 epochs to go
            if "finished" in states and midway:
                break
            assert proc.poll() is None, ("the driver ended before it could be killed: "
                                         + (tmp_path / "driver.log").read_text()[-3000:])
            time.sleep(0.2)
        else:
            pytest.fail(f"no trial finished while another was midway within 240 s: "
                        f"{ {t: (e['state'], epochs_on_storage(ledger.trial_dir(sweep_loc, t))) for t, e in entries.items()} }"
                        + (tmp_path / "driver.log").read_text()[-3000:])
        (killed_run_dir,) = [os.path.join(run_base, d) for d in os.listdir(run_base)
                             if d.startswith("cxr-ray-") and not d.endswith(".log")]
        assert processes_of(killed_run_dir)              # the instance's processes carry the marker
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        killed = time.monotonic()
        # the watchdog ends every process of the killed driver's instance and removes its run
        # directory (token included) within seconds, not Ray's ~60 s of orphaned agents
        while (pids_using(run_base) or os.path.exists(killed_run_dir)) and time.monotonic() - killed < 30:
            time.sleep(0.2)
        gone_after = time.monotonic() - killed
        left = {pid: text for pid in pids_using(run_base)
                if (text := describe(pid, killed_run_dir)) is not None}
        watchdog_log = watchdog_log_path(killed_run_dir)
        evidence = open(watchdog_log).read() if os.path.exists(watchdog_log) else "(no watchdog log)"
    finally:
        if proc.poll() is None:
            proc.kill()
        end_leftovers(run_base)
    assert left == {} and not os.path.exists(killed_run_dir), (left, gone_after, evidence)
    assert gone_after < 12, (gone_after, evidence)
    assert evidence == "(no watchdog log)"          # kept only when the clean-up failed

    before = ledger.read_all(sweep_loc)
    finished_before = {t for t, e in before.items() if e["state"] == "finished"}
    assert finished_before and len(finished_before) < 4
    checkpointed = {t: epochs_on_storage(ledger.trial_dir(sweep_loc, t)) for t in before}
    executed = {t: len(read_jsonl(storage.join(ledger.trial_dir(sweep_loc, t), "executions.jsonl")))
                for t in before}

    # a stale cluster file in the default place must not capture the re-run
    from ray._common.utils import get_ray_address_file
    os.makedirs(os.path.dirname(get_ray_address_file(None)), exist_ok=True)
    with open(get_ray_address_file(None), "w") as f:
        f.write(f"127.0.0.1:{closed_port()}")
    out = io.StringIO()
    res = run_small_sweep(store, storage_loc, "kill", resolutions=(32, 40), models=("resnet18",),
                          seeds=(0, 1), trial_fn=FakeTrial(), config=CONFIG, num_cpus=2,
                          num_gpus=0, progress="lines", aggregate=False, out=out)
    text = out.getvalue()
    assert res.exit_code == 0, text
    assert not ray.is_initialized()                       # exactly our instance, stopped
    assert set(res.ran) == set(res.trial_ids) - finished_before
    after = ledger.read_all(sweep_loc)
    for t in res.trial_ids:
        assert after[t]["state"] == "finished"
        if t in finished_before:   # never run again
            assert after[t]["attempts"] == before[t]["attempts"] == 1
            assert after[t]["history"] == before[t]["history"]
            continue
        epochs = [r["epoch"] for r in read_jsonl(storage.join(ledger.trial_dir(sweep_loc, t),
                                                              "executions.jsonl"))]
        # the re-run continued after the newest checkpoint: no checkpointed epoch ran again
        done = checkpointed.get(t, 0)
        assert epochs[executed.get(t, 0):] == list(range(done + 1, 4)), (t, epochs, done)
        assert sorted(set(epochs)) == [1, 2, 3]
        if t in before and before[t]["state"] == "running":
            assert after[t]["history"][-1]["resumed_from_epoch"] == done
            # the attempt the kill cut short is recorded as interrupted, not left running
            assert after[t]["history"][-2]["state"] == "interrupted"
            assert "ended before this attempt did" in after[t]["history"][-2]["error"]
    assert any(checkpointed.get(t, 0) >= 1 for t in res.ran)

    # the embedded instance: private run dir, own token, nothing in ~/.ray
    run_dir = re.search(r"private local Ray \(run dir ([^)]+)\)", text).group(1)
    assert run_dir.startswith(ray_files)
    assert stat.S_IMODE(os.stat(run_dir).st_mode) == 0o700
    assert not os.path.exists(os.path.join(run_dir, "auth_token"))   # removed after the run
    assert os.path.isdir(os.path.join(run_dir, "r"))
    assert not os.path.exists(os.path.join(ray_files, ".ray", "auth_token"))
    assert pids_using(run_dir) == []
