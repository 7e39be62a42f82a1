"""The cluster path end to end on one machine: Ray's fake multinode provider (no Docker, no cloud).

The test starts cluster/fake_multinode.yaml as its OWN process tree with cluster/fake_cluster.py
(`ray start --head --block` in a new session, token authentication on, every Ray file in a private
temp dir), runs a small sweep against it with `python -m orchestrator.sweep --address ...`, and
checks that

- the head has no GPUs, so the autoscaler had to add fake GPU worker nodes (its log says so), and
- the trials ran on those workers, spread over more than one node, one GPU each, never two
  concurrent trials on the same (node, GPU), as the ledger records them.

It stops exactly what it started (cluster/fake_cluster.py's docstring says how: every process of
the cluster is in the session its head leads; the fake workers outlive the head, so the session is
emptied by pid) and fails if any process of that session is left.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from test_cache import make_store

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "cluster"))
import fake_cluster  # noqa: E402  (cluster/ holds scripts, not a package)

pytestmark = pytest.mark.slow

FAKE_HEAD_ID = "f" * 51 + "00000"      # the provider's fixed head node id; workers count up from 1


@pytest.fixture
def cluster():
    """A fake multinode Ray cluster of our own: (address, client env, session dir glob)."""
    # A short private folder in /tmp: Ray's socket paths below it must stay under 107 bytes,
    # which a pytest tmp_path can exceed.
    run_dir = tempfile.mkdtemp(prefix="cxrfc-")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    state = fake_cluster.start(run_dir, env=env)
    left = {}
    try:
        yield state["address"], fake_cluster.client_env(run_dir, env), state["session_dir_glob"]
    finally:
        left = fake_cluster.stop(state["pid"])
        state["process"].wait(timeout=10)
        shutil.rmtree(run_dir, ignore_errors=True)
    assert not left, f"processes of the test's Ray cluster still alive: {left}"


def test_sweep_on_autoscaled_fake_gpu_nodes(tmp_path, cluster):
    address, env, session_glob = cluster
    # orchestrator.sweep reads the cluster's GPUs once at start and runs the trials on CPUs when
    # there are none, which on a head-only autoscaling cluster means on the head. So first one GPU
    # worker, as docs/cluster.md tells users to do; the autoscaler adds the rest on demand.
    subprocess.run([sys.executable, os.path.join(REPO, "cluster", "wait_for_gpus.py"), "--address", address,
                    "--gpus", "1", "--timeout", "180"], env=env, check=True, timeout=240, cwd=REPO)

    store = str(tmp_path / "store")
    make_store(tmp_path / "src", store, n_train=8, n_valid=4, resolutions=(32,))
    storage_loc = str(tmp_path / "sweeps")
    cmd = [sys.executable, "-m", "orchestrator.sweep", "--address", address,
           "--store", store, "--storage", storage_loc, "--name", "fake",
           "--resolutions", "32", "--models", "resnet18", "--seeds", "0-2",
           "--weights", "none", "--epochs-frozen", "1", "--epochs-unfrozen", "1",
           "--max-train-studies", "8", "--cpus-per-trial", "1", "--gpus-per-trial", "1",
           "--no-aggregate", "--progress-interval", "10"]
    sweep = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)
    try:
        output, _ = sweep.communicate(timeout=420)
    finally:
        fake_cluster.stop(sweep.pid, grace=5)   # only matters if it hung: the driver and what it left
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
