"""The cluster path end to end on one machine: Ray's fake multinode provider (no Docker, no cloud).

The test starts cluster/fake_multinode.yaml as its OWN process tree (`ray start --head --block`
in a new session, token authentication on, every Ray file in a private temp dir), runs a small
sweep against it with `python -m orchestrator.sweep --address ...`, and checks that

- the head has no GPUs, so the autoscaler had to add fake GPU worker nodes (its log says so), and
- the trials ran on those workers, spread over more than one node, one GPU each, never two
  concurrent trials on the same (node, GPU), as the ledger records them.

Stopping exactly what it started: `ray stop` would stop every Ray on the machine (other users'
too), and killing the head alone is not enough: the fake worker nodes are Ray processes the
autoscaler (a child of the head) starts, and they outlive the head (re-parented to init). All of
them stay in the session that `start_new_session=True` created for `ray start`, whose id is that
Popen's pid, and no other process is in it. So: SIGTERM the head (it drains and stops its own
processes), then SIGTERM / SIGKILL every remaining process of that session by pid, then check
that the session is empty.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest
import yaml

from test_cache import make_store

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAKE_YAML = os.path.join(REPO, "cluster", "fake_multinode.yaml")
RAY = os.path.join(os.path.dirname(sys.executable), "ray")
FAKE_HEAD_ID = "f" * 51 + "00000"      # the provider's fixed head node id; workers count up from 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def session_pids(sid: int) -> dict[int, tuple[str, str]]:
    """pid -> (state, command) of every live process in session ``sid`` (from /proc)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue                                  # exited meanwhile
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp session
        if int(fields[3]) == sid and fields[0] != "Z":
            found[int(entry)] = (fields[0], cmd or stat[stat.index("(") + 1:stat.rindex(")")])
    return found


def stop_session(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """Stop the process ``proc`` and everything else in its session (and nothing outside it)."""
    sid = proc.pid
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        pids = session_pids(sid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while session_pids(sid) and time.monotonic() < deadline:
            time.sleep(0.2)


def wait_for_gpus(address: str, env: dict, timeout: float = 180.0) -> None:
    """cluster/wait_for_gpus.py: ask the autoscaler for one GPU worker and wait for it to join."""
    subprocess.run([sys.executable, os.path.join(REPO, "cluster", "wait_for_gpus.py"), "--address", address,
                    "--gpus", "1", "--timeout", str(timeout)], env=env, check=True, timeout=timeout + 60,
                   cwd=REPO)


@pytest.fixture
def fake_cluster(tmp_path):
    """A fake multinode Ray cluster of our own: (address, env, session dir glob, head Popen)."""
    # Ray puts Unix sockets below its temp dir and socket paths are limited to ~107 bytes, which a
    # pytest tmp_path can exceed: a short private folder in /tmp, removed afterwards.
    ray_dir = tempfile.mkdtemp(prefix="cxrfc-")          # mode 0700
    port = _free_port()
    config = yaml.safe_load(open(FAKE_YAML))
    env = dict(os.environ)
    env.update({
        "RAY_TMPDIR": ray_dir, "TMPDIR": ray_dir, "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(tmp_path / "ray_auth_token"),
        "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
        "PYTHONPATH": REPO + os.pathsep + env.get("PYTHONPATH", ""),
    })
    env.pop("RAY_ADDRESS", None)
    fd = os.open(env["RAY_AUTH_TOKEN_PATH"], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(os.urandom(32).hex())
    # The fake workers join the GCS at provider.gcs_address: our port, this machine's address.
    from ray._private.services import get_node_ip_address
    ip = get_node_ip_address()
    config["provider"]["gcs_address"] = f"{ip}:{port}"
    config_path = tmp_path / "fake_multinode.yaml"
    config_path.write_text(yaml.safe_dump(config))
    head_resources = config["available_node_types"]["ray.head.default"]["resources"]
    log = open(tmp_path / "head.log", "w")
    head = subprocess.Popen(
        [RAY, "start", "--head", f"--port={port}", f"--node-ip-address={ip}",
         f"--num-cpus={head_resources['CPU']}", f"--num-gpus={head_resources['GPU']}",
         "--include-dashboard=false", f"--dashboard-port={_free_port()}",
         f"--autoscaling-config={config_path}", "--block"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=str(tmp_path))
    try:
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in (tmp_path / "head.log").read_text():
            assert head.poll() is None, "ray start failed:\n" + (tmp_path / "head.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "ray start did not come up in 120 s"
            time.sleep(0.5)
        # orchestrator.sweep reads the cluster's GPUs once at start and runs the trials on CPUs when
        # there are none, which on a head-only autoscaling cluster means on the head. So first one
        # GPU worker, as docs/cluster.md tells users to do; the autoscaler adds the rest on demand.
        wait_for_gpus(f"{ip}:{port}", env)
        yield f"{ip}:{port}", env, os.path.join(ray_dir, "ray", "session_*"), head
    finally:
        stop_session(head)
        log.close()
        left = session_pids(head.pid)
        shutil.rmtree(ray_dir, ignore_errors=True)
        assert not left, f"processes of the test's Ray cluster still alive: {left}"


def test_sweep_on_autoscaled_fake_gpu_nodes(tmp_path, fake_cluster):
    address, env, session_glob, head = fake_cluster
    store = str(tmp_path / "store")
    make_store(tmp_path / "src", store, n_train=8, n_valid=4, resolutions=(32,))
    storage_loc = str(tmp_path / "sweeps")
    cmd = [sys.executable, "-m", "orchestrator.sweep", "--address", address,
           "--store", store, "--storage", storage_loc, "--name", "fake",
           "--resolutions", "32", "--models", "resnet18", "--seeds", "0-2",
           "--weights", "none", "--epochs-frozen", "1", "--epochs", "1",
           "--max-train-studies", "8", "--cpus-per-trial", "1", "--gpus-per-trial", "1",
           "--no-aggregate", "--progress-interval", "10"]
    sweep = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)
    try:
        output, _ = sweep.communicate(timeout=420)
    finally:
        stop_session(sweep, grace=5)           # only if it hung: the driver and anything it left
    assert sweep.returncode == 0, output[-4000:]

    # The autoscaler added GPU workers (the head has none, so nothing could run without them).
    monitor_logs = "".join(open(p, errors="replace").read()
                           for p in glob.glob(os.path.join(session_glob, "logs", "monitor*")))
    assert "Adding 1 node(s) of type gpu." in monitor_logs, monitor_logs[-3000:]

    entries = [json.load(open(p)) for p in glob.glob(os.path.join(storage_loc, "fake", "ledger", "*.json"))]
    assert len(entries) == 3 and all(e["state"] == "finished" for e in entries), entries
    nodes = {e["node_id"] for e in entries}
    assert FAKE_HEAD_ID not in nodes                           # no trial on the CPU-only head
    assert all(n.startswith("f" * 51) for n in nodes)          # ids the fake provider gave its workers
    assert len(nodes) >= 2, f"all trials ran on one node: {nodes}"
    for e in entries:
        assert len(e["gpu_ids"]) == 1 and e["cuda_visible_devices"] == str(e["gpu_ids"][0]), e
    # No two trials that overlapped in time shared a (node, GPU).
    for a in entries:
        for b in entries:
            if a is not b and a["node_id"] == b["node_id"] and a["gpu_ids"] == b["gpu_ids"]:
                assert a["ended"] <= b["started"] or b["ended"] <= a["started"], (a, b)
