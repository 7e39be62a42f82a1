"""GPU pinning with fake GPUs: two worker nodes with two GPUs each (and a CPU-only head).

Every trial records where it ran (ledger: node id, Ray GPU ids, CUDA_VISIBLE_DEVICES, start and
end). At most four trials run at once and no two concurrent trials share a (node, GPU).
"""
from __future__ import annotations

import datetime as dt
import io

import pytest

from orchestrator import ledger
from test_sweep_helpers import (FakeTrial, by_value, make_tiny_store, ray_env, refresh_ray_auth,
                               run_small_sweep)


@pytest.fixture(scope="module")
def fake_gpu_cluster():
    from ray.cluster_utils import Cluster
    mp = pytest.MonkeyPatch()
    ray_env(mp)
    by_value()
    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": 1, "num_gpus": 0, "include_dashboard": False})
    for _ in range(2):
        cluster.add_node(num_cpus=2, num_gpus=2)
    cluster.wait_for_nodes()
    yield cluster
    cluster.shutdown()
    mp.undo()
    refresh_ray_auth()


def _t(s: str) -> float:
    return dt.datetime.fromisoformat(s).timestamp()


@pytest.mark.slow
def test_trials_are_pinned_to_distinct_gpus(fake_gpu_cluster, tmp_path):
    import ray
    store = make_tiny_store(tmp_path / "store", resolutions=(32, 40))
    out = io.StringIO()
    res = run_small_sweep(store, tmp_path / "sweeps", "gpus", resolutions=(32, 40),
                          models=("resnet18",), seeds=(0, 1, 2, 3),
                          address=fake_gpu_cluster.address, trial_fn=FakeTrial(epoch_seconds=1.5),
                          config={"epochs_frozen": 1, "epochs_unfrozen": 1, "weights": "none"},
                          cpus_per_trial=1, gpus_per_trial="1", max_failures=0,
                          progress_interval=0.01, progress="lines", aggregate=False, out=out)
    assert not ray.is_initialized()   # the driver disconnected; the cluster is the fixture's
    text = out.getvalue()
    assert res.exit_code == 0, text
    assert "up to 4 at once" in text and "no GPUs" not in text
    entries = ledger.read_all(res.sweep_loc)
    assert len(entries) == 8 and all(e["state"] == "finished" for e in entries.values())
    runs = []
    for e in entries.values():
        (h,) = e["history"]
        assert len(h["gpu_ids"]) == 1
        assert h["cuda_visible_devices"] == str(h["gpu_ids"][0])     # torch sees cuda:0 only
        runs.append((h["node_id"], h["gpu_ids"][0], _t(h["started"]), _t(h["ended"])))
    head = fake_gpu_cluster.head_node.node_id
    assert all(node != head for node, *_ in runs)                    # the head has no GPUs
    assert len({node for node, *_ in runs}) == 2
    for i, (node, gpu, start, end) in enumerate(runs):
        for other in runs[:i]:
            if other[2] < end and start < other[3]:
                assert (other[0], other[1]) != (node, gpu), "two trials shared a GPU"
    # most trials running at one moment: sweep over start (+1) and end (-1) events
    events = sorted([(s, 1) for _, _, s, _ in runs] + [(e, -1) for _, _, _, e in runs],
                    key=lambda ev: (ev[0], ev[1]))
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    assert 2 <= peak <= 4
