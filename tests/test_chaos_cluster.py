"""The fake multinode cluster (cluster/fake_cluster.py) under attack and losing a node.

- Its head, attacked as an outsider on the network would: a client without the token, or with a
  wrong one, is refused; one with the cluster's token is admitted, so the refusal is the token's
  doing. The token file and its folder are private to their owner.
- A fake GPU worker node removed mid-trial (every process of that node SIGKILLed: raylet, object
  store, the trial's worker): Tune retries the trial, the autoscaler gives it another node, and
  it continues from its checkpoint there.
"""
from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from orchestrator import ledger
from test_auth import client
from test_cache import make_store
from test_fake_cluster import REPO
from test_fake_cluster import cluster  # noqa: F401  (the fixture: a fake multinode cluster of our own)

import fake_cluster  # noqa: E402  (cluster/ is put on sys.path by test_fake_cluster)

pytestmark = pytest.mark.slow


def test_fake_cluster_head_refuses_a_client_without_the_token(tmp_path, cluster):  # noqa: F811
    address, env, _ = cluster
    token = env["RAY_AUTH_TOKEN_PATH"]
    assert stat.S_IMODE(os.stat(token).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(token)).st_mode) == 0o700
    outsider_home = str(tmp_path / "outsider")
    os.makedirs(outsider_home)

    without = client(address, outsider_home, token_path=None)
    assert without.returncode == 3 and "REFUSED" in without.stdout, without.stdout + without.stderr
    wrong = tmp_path / "wrong-token"
    wrong.write_text("0" * 64)
    os.chmod(wrong, 0o600)
    guessed = client(address, outsider_home, token_path=str(wrong))
    assert guessed.returncode == 3 and "REFUSED" in guessed.stdout, guessed.stdout + guessed.stderr
    admitted = client(address, outsider_home, token_path=token)
    assert admitted.returncode == 0 and "CONNECTED" in admitted.stdout, admitted.stdout + admitted.stderr
    assert not os.path.exists(os.path.join(outsider_home, ".ray", "auth_token"))


def node_processes(run_dir: str, node_id: str) -> list[int]:
    """The pids of one fake worker node of the cluster in ``run_dir``: the provider starts its
    raylet with the node's id in its environment, and the node's workers inherit it."""
    want = {f"RAY_OVERRIDE_NODE_ID_FOR_TESTING={node_id}".encode(), f"RAY_TMPDIR={run_dir}".encode()}
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    env = set(f.read().split(b"\0"))
            except OSError:
                continue
            if want <= env:
                pids.append(int(entry))
    return pids


def test_worker_node_removed_mid_trial_finishes_on_another_node(tmp_path, cluster):  # noqa: F811
    address, env, _ = cluster
    run_dir = os.path.dirname(env["RAY_AUTH_TOKEN_PATH"])
    subprocess.run([sys.executable, os.path.join(REPO, "cluster", "wait_for_gpus.py"), "--address", address,
                    "--gpus", "1", "--timeout", "180"], env=env, check=True, timeout=240, cwd=REPO)
    store = str(tmp_path / "store")
    make_store(tmp_path / "src", store, n_train=8, n_valid=4, resolutions=(32,))
    storage_loc = str(tmp_path / "sweeps")
    cmd = [sys.executable, "-m", "orchestrator.sweep", "--address", address,
           "--store", store, "--storage", storage_loc, "--name", "lost",
           "--resolutions", "32", "--models", "smallcnn", "--seeds", "0",
           "--weights", "none", "--epochs-frozen", "1", "--epochs-unfrozen", "150",
           "--max-train-studies", "8", "--cpus-per-trial", "1", "--gpus-per-trial", "1",
           "--no-aggregate", "--progress-interval", "10"]
    sweep = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)
    sweep_loc = os.path.join(storage_loc, "lost")
    try:
        deadline, lost = time.time() + 300, None
        while time.time() < deadline and lost is None:
            assert sweep.poll() is None, sweep.stdout.read()[-4000:]
            for tid, e in (ledger.read_all(sweep_loc) if os.path.isdir(sweep_loc) else {}).items():
                epochs = os.path.join(ledger.trial_dir(sweep_loc, tid), "epochs.jsonl")
                if e["state"] == "running" and e.get("node_id") and os.path.exists(epochs) \
                        and open(epochs).read().count("\n") >= 2:
                    lost = e["node_id"]
            time.sleep(0.2)
        assert lost is not None, "the trial never got past its second epoch"
        pids = node_processes(run_dir, lost)
        assert pids, f"no process of node {lost}"
        for pid in pids:                    # the node is gone: raylet, object store, the trial's worker
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        output, _ = sweep.communicate(timeout=420)
    finally:
        fake_cluster.stop(sweep.pid, grace=5)
    assert sweep.returncode == 0, output[-4000:]
    (entry,) = ledger.read_all(sweep_loc).values()
    assert entry["state"] == "finished" and entry["attempts"] >= 2, entry
    assert entry["node_id"] != lost, entry
    assert entry["history"][-1]["resumed_from_epoch"] >= 2, entry["history"]
