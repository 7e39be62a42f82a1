"""``--gpus-per-trial auto`` on a Ray with one fake GPU: a small config gets a GPU share, a big
one a whole GPU, and Tune hands each trial exactly the resources the packing plan printed.

Which config is "big" comes from a gpu_check JSON (``gpu_measurements``), the way a measured
table overrides the estimates; the trials record what Ray assigned them.
"""
from __future__ import annotations

import io
import json

import pytest

from common import storage
from orchestrator import ledger
from test_sweep_helpers import FakeTrial, local_ray, make_tiny_store, run_small_sweep


class RecordingTrial(FakeTrial):
    """FakeTrial that first writes the resources Ray assigned it to ``assigned.json``."""

    def __call__(self, cfg, trial_dir, on_epoch=None):
        import ray
        storage.makedirs(trial_dir)
        storage.write_json(storage.join(trial_dir, "assigned.json"),
                           ray.get_runtime_context().get_assigned_resources())
        return super().__call__(cfg, trial_dir, on_epoch)


@pytest.fixture(scope="module")
def ray_one_gpu():
    with local_ray(num_gpus=1, by_value_modules=[__name__]):
        yield


def _measurements(tmp_path) -> str:
    """A gpu_check JSON saying resnet18 at 40 px keeps the GPU 99% busy (never packed)."""
    report = {"device_type": "cuda", "started": "2026-11-26T00:00:00+00:00",
              "env": {"device_name": "fake GPU"},
              "configs": {"results": [{"model": "resnet18", "resolution": 40, "cuda_graphs": True,
                                       "synthetic": {
                  "images_per_s": 100.0, "busy_share": 0.99,
                  "peak_memory_reserved_bytes": 2_000_000_000}}]}}
    path = tmp_path / "gpu_check.json"
    path.write_text(json.dumps(report))
    return str(path)


def test_auto_packs_small_trials_and_gives_big_ones_a_gpu(ray_one_gpu, tmp_path):
    store = make_tiny_store(tmp_path / "store", resolutions=(32, 40))
    out = io.StringIO()
    res = run_small_sweep(store, tmp_path / "sweeps", "auto", resolutions=(32, 40),
                          models=("resnet18",), seeds=(0,), trial_fn=RecordingTrial(),
                          gpus_per_trial="auto", cpus_per_trial=0.5, gpu_memory_gb=80,
                          gpu_measurements=(_measurements(tmp_path),),
                          config={"epochs_frozen": 1, "epochs_unfrozen": 0, "weights": "none"},
                          max_failures=0, progress_interval=0.01, progress="lines",
                          aggregate=False, out=out)
    text = out.getvalue()
    assert res.exit_code == 0, text
    assert "no GPUs" not in text
    assert "r32 resnet18: 1/4 GPU" in text and "estimate" in text        # the plan, printed
    assert "r40 resnet18: 1 GPU" in text and "measured: fake GPU" in text
    assert "'gpu': 0.25} x1" in text and "'gpu': 1.0} x1" in text        # per-trial resources
    entries = ledger.read_all(res.sweep_loc)
    assert {e["state"] for e in entries.values()} == {"finished"}
    for tid in res.trial_ids:
        assigned = storage.read_json(storage.join(res.sweep_loc, "trials", tid, "assigned.json"))
        assert assigned.get("GPU") == (0.25 if tid.startswith("r32-") else 1.0), (tid, assigned)
        assert assigned.get("CPU") == 0.5
        (h,) = entries[tid]["history"]
        assert h["cuda_visible_devices"] == "0"       # both on the one GPU, visible as cuda:0
