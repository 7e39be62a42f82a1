"""Every bad input fails before any trial starts: one line naming the problem, exit code 2.

No Ray is started here: validation happens before the sweep touches a cluster.
"""
from __future__ import annotations

import io
import os
import shutil
import socket

import pytest

from common import storage
from common.cli import UserError, run_cli
from orchestrator import grid, ray_run, sweep
from orchestrator.sweep_config import SweepConfig
from test_sweep_helpers import make_tiny_store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_tiny_store(tmp_path_factory.mktemp("store"), resolutions=(32, 40))


@pytest.fixture(autouse=True)
def no_settings_file(tmp_path, monkeypatch):
    """The command line reads cxr-sweep.toml and CXR_SWEEP_*: none of either here."""
    monkeypatch.chdir(tmp_path)
    for key in [k for k in os.environ if k.startswith("CXR_SWEEP_")]:
        monkeypatch.delenv(key)


def cli(capsys, *argv):
    code = run_cli(sweep.main, list(argv), prog="orchestrator.sweep")
    captured = capsys.readouterr()
    return code, captured.err.strip(), captured.out


def base_args(store, tmp_path, *extra):
    return ["--store", store, "--storage", str(tmp_path / "sweeps"), "--name", "bad",
            "--resolutions", "32", "--models", "resnet18", "--seeds", "0", *extra]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]   # nothing listens once the socket is closed


@pytest.mark.parametrize("extra, needle", [
    (["--models", "resnet18,notamodel"], "unknown model 'notamodel'"),
    (["--resolutions", "32,abc"], "argument --resolutions: 'abc' is not an integer"),
    (["--resolutions", "0"], "resolution: need >= 32 px, got 0"),
    (["--resolutions", "-32"], "resolution: need >= 32 px, got -32"),
    (["--resolutions", ","], "the grid is empty"),
    (["--models", ","], "the grid is empty"),
    (["--seeds", ""], "the grid is empty"),
    (["--seeds", "3-1"], "argument --seeds: range '3-1' is empty"),
    (["--seeds", "-1"], "seed: must be >= 0, got -1"),
    (["--resolutions", "32,48"], "lacks resolution(s) 48"),
    (["--task-mode", "single", "--tasks", "Cardiomegaly,Nope"], "has no labels for Nope (it labels: Atelectasis,"),
    (["--task-mode", "both"], "argument --task-mode: invalid choice: 'both'"),
    (["--name", "a/b"], "--name: 'a/b' is not a valid sweep name"),
    (["--gpus-per-trial", "1.5"], "--gpus-per-trial: 1.5 must be 0, a fraction"),
    (["--gpus-per-trial", "half"], "--gpus-per-trial: 'half' is not a number or 'auto'"),
    (["--gpu-memory-gb", "0"], "--gpu-memory-gb: 0 is not positive"),
    (["--gpu-measurements", "/nonexistent/gpu_check.json"], "--gpu-measurements: cannot read"),
    (["--cpus-per-trial", "0"], "--cpus-per-trial: 0 is not positive"),
    (["--max-failures", "-1"], "--max-failures: -1 is negative"),
    (["--log", "tensorboard,nope"], "--log: 'nope' is not one of tensorboard, mlflow, wandb"),
    (["--lr-head", "-1"], "lr_head: must be positive"),
    (["--lr-head", "fast"], "argument --lr-head: 'fast' is not a number"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
])
def test_bad_input_is_one_line_and_starts_nothing(capsys, store, tmp_path, extra, needle):
    code, err, _ = cli(capsys, *base_args(store, tmp_path), *extra)
    assert code == 2, err
    assert needle in err and len(err.splitlines()) == 1, err
    assert err.startswith("orchestrator.sweep: error: ")
    assert not os.path.exists(tmp_path / "sweeps" / "bad" / "ledger")


def test_missing_and_corrupt_store(capsys, store, tmp_path):
    code, err, _ = cli(capsys, *base_args(str(tmp_path / "nothing"), tmp_path))
    assert code == 2 and "no store at" in err and len(err.splitlines()) == 1
    broken = str(tmp_path / "broken")
    shutil.copytree(store, broken)
    manifest = storage.read_json(os.path.join(broken, "manifest.json"))
    shard = next(s for s in manifest["shards"] if s["resolution"] == 32)
    with open(os.path.join(broken, shard["path"]), "r+b") as f:
        f.seek(10)
        f.write(b"corrupt!")
    code, err, _ = cli(capsys, *base_args(broken, tmp_path))
    assert code == 2 and "does not verify at 32 px" in err and shard["path"] in err
    assert len(err.splitlines()) == 1
    assert not os.path.exists(tmp_path / "sweeps" / "bad" / "ledger")
    # a resolution the sweep does not use may be broken: only requested ones are verified
    code, err, _ = cli(capsys, *base_args(broken, tmp_path, "--resolutions", "40", "--dry-run"))
    assert code == 0, err


def test_unwritable_storage(capsys, store, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    code, err, _ = cli(capsys, "--store", store, "--storage", str(blocker / "sweeps"), "--name", "x",
                       "--resolutions", "32", "--models", "resnet18", "--seeds", "0",
                       "--weights", "none")
    assert code == 2 and "is not writable" in err and len(err.splitlines()) == 1


def test_unreachable_cluster(capsys, store, tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    addr = f"127.0.0.1:{closed_port()}"
    code, err, _ = cli(capsys, *base_args(store, tmp_path, "--address", addr))
    assert code == 2 and f"cannot reach the Ray cluster at {addr}" in err
    assert len(err.splitlines()) == 1
    assert not os.path.exists(tmp_path / "sweeps" / "bad" / "ledger")
    # RAY_ADDRESS is the same as --address
    monkeypatch.setenv("RAY_ADDRESS", addr)
    code, err, _ = cli(capsys, *base_args(store, tmp_path))
    assert code == 2 and "cannot reach the Ray cluster" in err
    code, err, _ = cli(capsys, *base_args(store, tmp_path, "--address", "no-port-here"))
    assert code == 2 and "expected HOST:PORT" in err


def test_empty_grid_from_the_api(store, tmp_path):
    with pytest.raises(UserError, match="the grid is empty"):
        sweep.run_sweep(SweepConfig(resolutions=(32,), models=(), seeds=(0,), store=store,
                                    storage=str(tmp_path), name="e"))
    with pytest.raises(UserError, match="the grid is empty"):
        grid.build_grid([32], ["resnet18"], [], "multi")


def test_missing_required_settings_say_how_to_set_them(capsys, store, tmp_path):
    code, err, _ = cli(capsys, "--storage", str(tmp_path), "--name", "x")
    assert code == 2 and len(err.splitlines()) == 1
    assert "no store: build one with python -m preprocessing build" in err and "--store" in err
    code, err, _ = cli(capsys, "--store", store, "--name", "x")
    assert code == 2 and "--storage is required to run" in err and "cxr-sweep.toml" in err
    code, err, _ = cli(capsys, "--store", store, "--storage", str(tmp_path))
    assert code == 2 and "--name is required to run" in err and "CXR_SWEEP_NAME" in err
    assert not os.listdir(tmp_path)


def test_grid_only_enumerates_and_one_trial_has_one_id():
    from trainer.config import TrainConfig
    points = grid.build_grid([160, 320], seeds=[0, 1])
    assert len(points) == 2 * 5 * 2
    assert {p.model for p in points} == set(SweepConfig().models)   # aliases as given
    base = TrainConfig(store="/a")
    trials = grid.plan_trials(points, base, "m" * 64)
    assert {t.params.model for t in trials if t.params.resolution == 320} >= {"efficientnet-b3", "resnet50"}
    assert {t.params.model for t in trials if t.params.resolution == 160} >= {"efficientnet-b0"}
    # the alias and its variant are one trial, with the id the trainer's own config gives it
    both = grid.plan_trials(grid.build_grid([320], ["efficientnet", "efficientnet-b3"], [0]), base,
                            "m" * 64)
    assert len(both) == 1
    alone = TrainConfig(store="/elsewhere", model="efficientnet", resolution=320)
    assert both[0].trial_id == alone.trial_id("m" * 64)
    single = grid.plan_trials(grid.build_grid([160], ["resnet50"], [0], "single",
                                              ["Edema", "Cardiomegaly"]), base, "m" * 64)
    assert [t.params.task for t in single] == ["Edema", "Cardiomegaly"]
    assert single[0].trial_id.startswith("r160-resnet50-s0-single-edema-")
    a = trials[0].trial_id
    assert a.startswith("r160-resnet50-s0-multi-") and len(a.rsplit("-", 1)[1]) == 10
    again = grid.plan_trials(points[:1], TrainConfig(store="/elsewhere", workers=3), "m" * 64)
    assert again[0].trial_id == a
    assert grid.plan_trials(points[:1], TrainConfig(store="/a", lr_head=1e-3), "m" * 64)[0].trial_id != a
    assert grid.plan_trials(points[:1], base, "n" * 64)[0].trial_id != a   # another store content
    assert not hasattr(grid, "trial_id")
    from orchestrator.sweep_config import parse_seeds
    assert parse_seeds("0-2,7,1") == (0, 1, 2, 7)


def test_dry_run_prints_grid_and_estimate(capsys, store, tmp_path):
    code, err, out = cli(capsys, *base_args(store, tmp_path, "--resolutions", "32,40", "--seeds",
                                            "0-1", "--dry-run"))
    assert code == 0, err
    assert "4 trials: 0 finished, 4 to run" in out
    assert "estimated GPU-hours" in out and "ESTIMATE" in out
    assert out.count("to run  ") == 4
    assert not os.path.exists(tmp_path / "sweeps" / "bad")   # a dry run writes nothing


def test_progress_view_counts_and_eta():
    from orchestrator.progress import SweepProgress, format_duration
    out = io.StringIO()
    trials = {f"t{i}": {"resolution": 160 if i < 2 else 320, "model": "resnet50", "total_epochs": 4}
              for i in range(4)}
    p = SweepProgress(trials, finished=["t3"], slots=2, interval=0, out=out)
    assert p.eta_seconds() is None and p.counts() == {"finished": 1, "running": 0, "pending": 3,
                                                      "failed": 0}
    p.trial_started("t0")
    p.epoch_done("t0", {"epoch": 1, "epoch_seconds": 10.0, "auroc_mean": 0.7})
    p.epoch_done("t0", {"epoch": 2, "epoch_seconds": 10.0, "auroc_mean": 0.65})
    # t0: 2 epochs left x 10 s; t1 (same model/res): 4 x 10 s; t2 (unseen 320 px): 4 x 40 s
    # (10 s at 160 px scaled by pixels): (20 + 40 + 160) / 2 slots = 110 s, but t2 alone takes 160
    assert p.eta_seconds() == pytest.approx(160)
    p.epoch_done("t1", {"epoch": 1, "epoch_seconds": 10.0, "auroc_mean": 0.6})
    p.epoch_done("t2", {"epoch": 1, "epoch_seconds": 30.0, "auroc_mean": 0.6})
    assert p.eta_seconds() == pytest.approx(max((20 + 30 + 90) / 2, 90))
    p.trial_failed("t1", retrying=False, error="boom")
    p.trial_finished("t0")
    p.maybe_status(force=True)
    text = out.getvalue()
    assert "start t0" in text and "t0 epoch 2/4 AUROC 0.65" in text and "FAILED t1: boom" in text
    assert "finished t0 best AUROC 0.7000" in text
    assert "2/4 finished, 1 running, 0 pending, 1 failed" in text
    assert format_duration(3725) == "1h02m" and format_duration(65) == "1m05s"


def test_progress_lines_and_table_show_loss_auroc_speed_and_eta():
    from orchestrator.progress import SweepProgress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    trials = {"t0": {"resolution": 160, "model": "resnet50", "total_epochs": 4},
              "t1": {"resolution": 160, "model": "resnet50", "total_epochs": 4}}
    record = {"epoch": 1, "epoch_seconds": 10.0, "auroc_mean": 0.7, "train_loss": 0.4321,
              "images_per_s": 1234.0}
    log = io.StringIO()
    lines = SweepProgress(trials, slots=2, interval=3600, out=log)   # not a terminal: lines
    assert lines.style == "lines"
    lines.trial_started("t0")
    lines.epoch_done("t0", record)
    assert "t0 epoch 1/4 AUROC 0.7 loss 0.4321 1,234 img/s (10s; ETA 30s)" in log.getvalue()
    assert "\x1b[" not in log.getvalue()                            # no cursor moves in a log
    term = Terminal()
    table = SweepProgress(trials, slots=2, interval=3600, out=term)
    assert table.style == "table"
    table.trial_started("t0")
    table.trial_started("t1")
    table.epoch_done("t0", record)
    screen = term.getvalue()
    last = screen.rsplit("\x1b[", 1)[1]     # what is on screen after the last redraw
    assert "0/2 finished, 2 running, 0 pending, 0 failed | ETA" in last
    row = next(line for line in last.splitlines() if line.startswith("t0"))
    assert row.split() == ["t0", "1/4", "0.4321", "0.7000", "1,234", "30s"]
    assert "start t1" in screen and "epoch 1/4" not in screen       # epochs update the table only
    table.trial_finished("t0")
    assert "finished t0 best AUROC 0.7000" in term.getvalue()
    assert "1/2 finished, 1 running" in term.getvalue().rsplit("\x1b[", 1)[1]


def test_estimate_table_matches_the_anchors():
    from orchestrator import estimate, throughput
    # the published anchor: ResNet50 2,470 img/s at 224 px on an A100, x1.8 for an H100, ~1/pixels
    assert throughput.images_per_s("resnet50", 224) == pytest.approx(2470 * 1.8)
    assert throughput.images_per_s("resnet50", 448) == pytest.approx(2470 * 1.8 / 4)
    assert throughput.images_per_s("densenet121", 160) / throughput.images_per_s("resnet50", 160) == \
        pytest.approx(0.735, abs=0.01)
    e = estimate.estimate([("resnet50", 224)], epochs=2, train_images=4446, valid_images=0,
                          measured={})
    assert e.gpu_hours == pytest.approx(2 / 3600)
    assert e.per_group[("resnet50", 224)]["source"] == "table"


def test_dry_run_shows_the_packing_plan(capsys, store, tmp_path):
    import json
    args = base_args(store, tmp_path, "--resolutions", "32,40", "--dry-run", "--gpu-memory-gb", "80")
    code, err, out = cli(capsys, *args)          # default: --gpus-per-trial auto
    assert code == 0, err
    assert "GPU packing (--gpus-per-trial auto, 80 GB per GPU" in out
    assert "r32 resnet18: 1/4 GPU" in out and "(GPU memory: --gpu-memory-gb" in out
    assert "GPU share" in out and "1/4" in out.split("GPU share", 1)[1]
    # a measured table overrides the estimate: this config fills the GPU, so it gets one whole
    report = {"device_type": "cuda", "started": "2026-11-26", "env": {"device_name": "fake"},
              "configs": {"results": [{"model": "resnet18", "resolution": 40, "cuda_graphs": True,
                                       "synthetic": {"images_per_s": 1.0, "busy_share": 0.99,
                                                     "peak_memory_reserved_bytes": 10**9}}]}}
    (tmp_path / "m.json").write_text(json.dumps(report))
    code, err, out = cli(capsys, *args, "--gpu-measurements", str(tmp_path / "m.json"))
    assert code == 0, err
    assert "r40 resnet18: 1 GPU" in out and "measured: fake" in out and "r32 resnet18: 1/4 GPU" in out
    # ... and its measured rate replaces the throughput table in the GPU-hours estimate
    assert "1 of 2 groups at their measured img/s" in out
    # with --cuda-graphs off the trials run eagerly: the graphed measurement no longer applies
    code, err, out = cli(capsys, *args, "--gpu-measurements", str(tmp_path / "m.json"),
                         "--cuda-graphs", "off")
    assert code == 0, err
    assert "measured: fake" not in out and "0 of 2 groups at their measured img/s" in out
    # explicit 1: no packing plan, every trial one GPU
    code, err, out = cli(capsys, *base_args(store, tmp_path, "--dry-run", "--gpus-per-trial", "1"))
    assert code == 0, err
    assert "GPU packing" not in out and "1/4" not in out


def test_gpu_request_decision():
    decide = ray_run.gpu_request_decision
    # GPUs present: always requested, nothing to say
    for mode in ("embedded", "existing", "cluster"):
        assert decide(mode, 4, "auto", False, 2) == (True, None)
        assert decide(mode, 4, 0.5, True, 2) == (True, None)
    # 0 GPUs asked: CPUs, nothing to say
    assert decide("cluster", 0, 0.0, True, 2) == (False, None)
    assert decide("cluster", 8, 0.0, True, 2) == (False, None)
    # no GPU in an embedded or in-process Ray: CPUs, with the message, given or not
    for mode in ("embedded", "existing"):
        for requested, explicit in (("auto", False), ("auto", True), (1.0, True), (0.25, True)):
            keep, note = decide(mode, 0, requested, explicit, 2)
            assert not keep and note.startswith("the Ray cluster has no GPUs: running trials on "
                                                "CPUs (2 CPU each)"), (mode, requested)
            assert "autoscaler" not in note
    # a cluster with no GPU node up yet, GPUs asked for explicitly: keep the request and wait
    for requested in ("auto", 1.0, 0.5):
        keep, note = decide("cluster", 0, requested, True, 6)
        assert keep and "wait for the autoscaler to add GPU workers" in note
        assert "--gpus-per-trial 0" in note
    # ... not asked for (the default): CPUs, with a hint how to wait instead
    keep, note = decide("cluster", 0, "auto", False, 6)
    assert not keep and note.startswith("the Ray cluster has no GPUs: running trials on CPUs")
    assert "--gpus-per-trial auto or 1" in note


def test_gpu_memory_and_per_trial_estimate(monkeypatch):
    from orchestrator import estimate, packing
    monkeypatch.setattr(packing, "detect_gpu_memory_gb", lambda: None)
    assert ray_run.resolve_gpu_memory(24.0, None) == (24.0, "--gpu-memory-gb")
    nodes = [{"Alive": True, "Resources": {"CPU": 4}},
             {"Alive": True, "Resources": {"CPU": 8, "GPU": 1, "accelerator_type:A10G": 1}},
             {"Alive": True, "Resources": {"CPU": 192, "GPU": 8, "accelerator_type:H100": 1}},
             {"Alive": False, "Resources": {"GPU": 1, "accelerator_type:T4": 1}}]
    assert ray_run.resolve_gpu_memory(None, nodes)[0] == 24.0          # the smallest alive GPU
    gb, source = ray_run.resolve_gpu_memory(None, nodes[:1])
    assert gb == ray_run.FALLBACK_GPU_MEMORY_GB and "--gpu-memory-gb" in source
    monkeypatch.setattr(packing, "detect_gpu_memory_gb", lambda: 141.0)
    assert ray_run.resolve_gpu_memory(None, nodes[:1])[0] == 141.0
    # GPU-hours use each trial's share
    one = estimate.estimate([("resnet50", 160)], 2, 1000, 0).gpu_hours
    mixed = estimate.estimate([("resnet50", 160), ("resnet50", 160)], 2, 1000, 0, [0.25, 1.0])
    assert mixed.gpu_hours == pytest.approx(1.25 * one)
    with pytest.raises(ValueError):
        estimate.estimate([("resnet50", 160)], 2, 1000, 0, [0.5, 0.5])


def test_tasks_default_to_the_stores_own(capsys, store, tmp_path):
    """Without --tasks the store's dataset decides which tasks are trained (single mode: one trial
    per task); --tasks picks others by the store's label names."""
    other = str(tmp_path / "other")
    shutil.copytree(store, other)
    manifest = storage.read_json(os.path.join(other, "manifest.json"))
    manifest["default_tasks"] = ["Edema", "Cardiomegaly"]
    storage.write_json(os.path.join(other, "manifest.json"), manifest)
    code, err, out = cli(capsys, *base_args(other, tmp_path, "--task-mode", "single", "--dry-run"))
    assert code == 0, err
    assert "2 trials" in out and "-single-edema-" in out and "-single-cardiomegaly-" in out
    code, err, out = cli(capsys, *base_args(other, tmp_path, "--task-mode", "single", "--tasks",
                                            "Atelectasis", "--dry-run"))
    assert code == 0 and "1 trials" in out and "-single-atelectasis-" in out


def test_progress_counts_a_deterministic_failure_as_failed(tmp_path):
    """Such a trial ends its trainable normally (Tune must not retry it); the ledger says failed."""
    from orchestrator import ledger
    from orchestrator.progress import SweepProgress
    sweep = str(tmp_path / "s")
    ledger.register(sweep, "t0", {"resolution": 32, "model": "smallcnn", "seed": 0}, run_id="r")
    ledger.mark_failed(sweep, "t0", "ConfigError: task(s) 'X' not in store")

    class Trial:
        trial_id, config = "tune0", {"trial": {"trial_id": "t0"}}

    out = io.StringIO()
    p = SweepProgress({"t0": {"resolution": 32, "model": "smallcnn", "total_epochs": 1}},
                      interval=0, out=out, sweep_loc=sweep)
    p.on_trial_complete(0, [], Trial())
    assert p.counts()["failed"] == 1 and p.counts()["finished"] == 0
    assert "FAILED t0: ConfigError" in out.getvalue()
