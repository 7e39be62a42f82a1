"""bench/gpu_check.py in its tiny CPU mode, so the GPU check cannot rot between GPU sessions.

The figures mean nothing on CPU at 32 px; what is checked is that every section runs the real
code path (trainer models, the trainer's epoch loop, the real loader over a phantom store, the
packing probe's processes, the sweep on a local Ray with a fake GPU) and reports numbers, and that
orchestrator.packing can read the document.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "bench", "gpu_check.py")


def _run(tmp_path, sections: str, timeout: float) -> dict:
    out = tmp_path / "gpu_check.json"
    # Ray's socket paths must stay under 107 bytes: its run dir goes in a short folder of /tmp.
    ray_dir = tempfile.mkdtemp(prefix="gck-test-", dir="/tmp")
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", TMPDIR=str(tmp_path),
               RAY_TMPDIR=ray_dir, CXR_RAY_DIR=ray_dir, RAY_AUTH_TOKEN_PATH=os.path.join(ray_dir, "token"))
    env.pop("OUT", None)
    try:
        proc = subprocess.run([sys.executable, SCRIPT, "--tiny", "--device", "cpu", "--sections", sections,
                               "--budget-s", "900", "--out", str(out)],
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


def test_tiny_cpu_run_reports_every_section(tmp_path):
    report = _run(tmp_path, "env,store,configs,loader_rates,packing_probe,extra", timeout=900)
    assert report["mode"] == "tiny" and report["device_type"] == "cpu"
    assert "fatal_error" not in report
    assert report["env"]["torch"] and report["env"]["device_name"]
    assert report["store"]["images"]["train"] > 0

    for section in ("configs", "extra"):
        for rec in report[section]["results"]:
            syn = rec["synthetic"]
            assert "error" not in syn, syn
            for key in ("images_per_s", "step_ms", "busy_share", "peak_memory_allocated_bytes"):
                assert _number(syn[key]) and syn[key] > 0, (section, key, syn)
            assert syn["step_source"] == "trainer.train.train_one_epoch"
    loader = report["configs"]["results"][0]["loader"]
    assert "error" not in loader, loader
    for key in ("images_per_s", "share_of_synthetic", "busy_share"):
        assert _number(loader[key]) and loader[key] > 0, (key, loader)
    assert loader["workers"] >= 1

    rates = report["loader_rates"]["results"]
    assert rates and all(_number(r["loader_only_images_per_s"]) for r in rates), rates

    probe = report["packing_probe"]
    assert "error" not in probe, probe
    assert probe["processes"] == 2 and _number(probe["packed_images_per_s"])
    assert _number(probe["packing_gain"])

    assert report["summary"]["problems"] == []
    assert report["mini_sweep"] == "not requested"

    # orchestrator.packing ignores CPU measurements (they say nothing about a GPU) but reads the file
    from orchestrator import packing
    assert packing.load_measurements(str(tmp_path / "gpu_check.json")) == {}


@pytest.mark.slow
def test_tiny_cpu_mini_sweep_pins_the_fake_gpu(tmp_path):
    report = _run(tmp_path, "env,store,mini_sweep", timeout=900)
    sweep = report["mini_sweep"]
    assert "error" not in sweep, (sweep.get("error"), sweep.get("output_tail"))
    assert sweep["returncode"] == 0 and sweep["fake_gpu"] is True
    assert sweep["trials_finished"] == 2
    for trial in sweep["trials"]:
        assert trial["cuda_visible_devices"] == "0", trial     # Ray pinned it to the (fake) GPU 0
        assert trial["device"].startswith("cpu")                # and torch, finding no CUDA, used CPU


def test_config_syntax_and_default_list():
    """``--configs MODEL@RES[:graphs][:bIMAGES]``; the default list measures each small config both
    eager and with CUDA graphs, and the issue's required configs come first."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("gpu_check_mod", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod          # dataclasses look their module up while it loads
    spec.loader.exec_module(mod)
    c = mod._parse_configs("resnet50@160, resnet50@160:graphs,resnet50@160:graphs:b240")
    assert [x.label for x in c] == ["resnet50@160", "resnet50@160:graphs", "resnet50@160:graphs:b240"]
    assert c[0].loader and not c[0].graphs and c[0].images is None
    assert c[2].graphs and c[2].images == 240 and not c[2].loader    # a batch experiment: synthetic only
    for bad in ("resnet50", "resnet50@x", "resnet50@160:fast", "resnet50@160:b0"):
        with pytest.raises(SystemExit):
            mod._parse_configs(bad)
    labels = [x.label for x in mod.FULL_CONFIGS]
    for required in ("resnet50@160", "resnet50@480", "densenet121@160", "densenet121@480",
                     "efficientnet-b0@160", "efficientnet-b5@480"):
        assert required in labels
    for small in ("resnet50@160", "densenet121@160", "efficientnet-b0@160"):
        assert small + ":graphs" in labels
