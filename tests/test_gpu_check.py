"""The prepared GPU check (python -m bench.gpu_check) in its tiny CPU mode, so it cannot rot
between GPU sessions, and its resume logic: a group measured in one call is not measured again.

The figures mean nothing on CPU at 32 px; what is checked is that every section runs the real code
path (trainer models, the trainer's epoch loop, the real loader over a phantom store, the packing
probe's processes, the sweep on a local Ray with a fake GPU) and reports numbers.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    """One tiny CPU run of every section (each run pays a process, torch's import and a store)."""
    tmp_path = tmp_path_factory.mktemp("gpu_check")
    results = tmp_path / "groups"
    report = _run(tmp_path, "--sections", "env,store,groups,configs,loader_rates,packing_probe,mini_sweep",
                  "--configs", "resnet18@48", "--results", str(results))
    return report, results


def _run(tmp_path, *args: str, timeout: float = 900) -> dict:
    out = tmp_path / "gpu_check.json"
    # Ray's socket paths must stay under 107 bytes: its run dir goes in a short folder of /tmp.
    ray_dir = tempfile.mkdtemp(prefix="gck-test-", dir="/tmp")
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", TMPDIR=str(tmp_path),
               RAY_TMPDIR=ray_dir, CXR_RAY_DIR=ray_dir, RAY_AUTH_TOKEN_PATH=os.path.join(ray_dir, "token"))
    env.pop("OUT", None)
    try:
        proc = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--tiny", "--device", "cpu",
                               "--budget-s", "900", "--out", str(out), *args],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout)
    written = json.loads(out.read_text())
    assert printed == written
    return written


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x


@pytest.mark.slow
def test_tiny_cpu_run_reports_every_section(tiny_report):
    report, results = tiny_report
    assert report["mode"] == "tiny" and report["device_type"] == "cpu"
    assert "fatal_error" not in report
    assert report["env"]["torch"] and report["env"]["device_name"]
    assert report["store"]["images"]["train"] > 0

    groups = report["groups"]
    assert groups["measured_now"] == ["resnet18@32", "smallcnn@32"] and groups["not_measured"] == []
    assert sorted(os.listdir(results)) == ["resnet18@32.json", "smallcnn@32.json"]
    table = {row["label"]: row for row in report["group_table"]}
    assert set(table) == {"resnet18@32", "smallcnn@32"}
    for row in table.values():
        assert _number(row["images_per_s"]) and row["images_per_s"] > 0
        assert row["compile"] is False and row["cuda_graphs"] is False
    for name in os.listdir(results):
        rec = json.loads((results / name).read_text())["configs"]["results"][0]
        syn = rec["synthetic"]
        for key in ("images_per_s", "step_ms", "busy_share", "peak_memory_allocated_bytes"):
            assert _number(syn[key]) and syn[key] > 0, (name, key, syn)
        assert syn["step_source"].startswith("trainer.") and syn["step_source"].endswith(".train_one_epoch")
        loader = rec["loader"]
        for key in ("images_per_s", "share_of_synthetic", "busy_share"):
            assert _number(loader[key]) and loader[key] > 0, (key, loader)
        assert loader["workers"] >= 1

    adhoc = report["configs"]["results"][0]
    assert adhoc["label"] == "resnet18@48" and _number(adhoc["synthetic"]["images_per_s"])

    rates = report["loader_rates"]["results"]
    assert rates and all(_number(r["loader_only_images_per_s"]) for r in rates), rates

    probe = report["packing_probe"]
    assert "error" not in probe, probe
    assert probe["processes"] == 2 and _number(probe["packed_images_per_s"])
    assert probe["single_images_per_s"] == table["resnet18@32"]["images_per_s"]   # from its group
    assert _number(probe["packing_gain"])

    assert report["summary"]["problems"] == []

    # a group file is a gpu_check document: orchestrator.packing reads it (and ignores CPU figures)
    from orchestrator import packing
    assert packing.load_measurements(str(results / "resnet18@32.json")) == {}


def _main(tmp_path, monkeypatch, groups: str) -> dict:
    from bench import gpu_check
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    os.makedirs(tmp_path / "out", exist_ok=True)
    threads = torch.get_num_threads()
    try:
        return gpu_check.main(["--tiny", "--device", "cpu", "--sections", "env,groups",
                               "--groups", groups, "--results", str(tmp_path / "results"),
                               "--budget-s", "600", "--workers", "0"])
    finally:
        torch.set_num_threads(threads)


def test_groups_resume_across_calls(tmp_path, monkeypatch):
    """A second call measures only what the first did not; a torn or failed group file is
    measured again; every group also lands in $OUT/groups/ (what the device tool brings back)."""
    first = _main(tmp_path, monkeypatch, "smallcnn@32,smallcnn@40")["groups"]
    assert first["measured_now"] == ["smallcnn@32", "smallcnn@40"] and first["done"] == 2
    results, mirror = tmp_path / "results", tmp_path / "out" / "groups"
    assert sorted(os.listdir(results)) == sorted(os.listdir(mirror)) == ["smallcnn@32.json", "smallcnn@40.json"]
    kept = (results / "smallcnn@32.json").read_bytes()

    second = _main(tmp_path, monkeypatch, "smallcnn@32,smallcnn@40,smallcnn@48")["groups"]
    assert second["measured_now"] == ["smallcnn@48"]
    assert second["already_measured"] == ["smallcnn@32", "smallcnn@40"] and second["done"] == 3
    assert (results / "smallcnn@32.json").read_bytes() == kept         # not measured again

    (results / "smallcnn@40.json").write_text('{"configs": {"results": [{"synthe')      # torn write
    doc = json.loads((results / "smallcnn@48.json").read_text())
    doc["configs"]["results"][0]["synthetic"] = {"error": "RuntimeError: CUDA error"}   # failed
    (results / "smallcnn@48.json").write_text(json.dumps(doc))
    third = _main(tmp_path, monkeypatch, "smallcnn@32,smallcnn@40,smallcnn@48")["groups"]
    assert third["measured_now"] == ["smallcnn@40", "smallcnn@48"]
    assert third["already_measured"] == ["smallcnn@32"]

    from bench.gpu import groups        # docs/benchmarks.md's table: one row per measured group
    table = groups.markdown_table(groups.group_table(str(results)))
    assert [line.split(" | ")[0] for line in table.splitlines()[2:]] == [
        "| smallcnn @ 32", "| smallcnn @ 40", "| smallcnn @ 48"]


def test_thesis_groups_and_config_syntax():
    """25 groups (matched EfficientNet per resolution) in the trainer's default modes, then the
    groups the trainer compiles by default, largest images first; labels make distinct files."""
    from bench.gpu import configs, groups
    cpu = groups.thesis_groups(torch.device("cpu"))
    assert len(cpu) == 25 and not any(g.graphs or g.compile for g in cpu)
    assert {g.model for g in cpu if g.model.startswith("efficientnet")} == {
        "efficientnet-b0", "efficientnet-b1", "efficientnet-b3", "efficientnet-b4", "efficientnet-b5"}
    assert [g.label for g in cpu if g.loader] == ["resnet50@320"]
    cuda = groups.thesis_groups(torch.device("cuda"))
    first, compiled = cuda[:25], cuda[25:]
    assert all(g.graphs == (g.resolution <= 320) and not g.compile for g in first)
    assert len(compiled) == 10 and all(g.compile and g.resolution >= 400 for g in compiled)
    assert [g.resolution for g in compiled] == sorted((g.resolution for g in compiled), reverse=True)
    assert len({groups.file_name(g) for g in cuda}) == 35
    assert groups.file_name(compiled[0]) == "resnet50@480+compile.json"

    c = configs.parse_configs("resnet50@160, resnet50@160:graphs,densenet161@480:compile,resnet50@160:graphs:b240")
    assert [x.label for x in c] == ["resnet50@160", "resnet50@160:graphs", "densenet161@480:compile",
                                    "resnet50@160:graphs:b240"]
    assert c[0].loader and not c[0].graphs and c[0].images is None
    assert c[2].compile and not c[2].graphs
    assert c[3].graphs and c[3].images == 240 and not c[3].loader    # a batch experiment: synthetic only
    for bad in ("resnet50", "resnet50@x", "resnet50@160:fast", "resnet50@160:b0"):
        with pytest.raises(SystemExit):
            configs.parse_configs(bad)


@pytest.mark.slow
def test_tiny_cpu_mini_sweep_pins_the_fake_gpu(tiny_report):
    report, _ = tiny_report
    sweep = report["mini_sweep"]
    assert "error" not in sweep, (sweep.get("error"), sweep.get("output_tail"))
    assert sweep["returncode"] == 0 and sweep["fake_gpu"] is True
    assert sweep["trials_finished"] == 2
    for trial in sweep["trials"]:
        assert trial["cuda_visible_devices"] == "0", trial     # Ray pinned it to the (fake) GPU 0
        assert trial["device"].startswith("cpu")                # and torch, finding no CUDA, used CPU
