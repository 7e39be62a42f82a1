"""The sweep's command line as typed: settings from cxr-sweep.toml < CXR_SWEEP_* < flags, the
starter file, a dry run without a store (priced at CheXpert's size) for every registered model,
and a --help that is quick to load and points nowhere outside the repository. No Ray here."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from common.cli import UserError, run_cli
from orchestrator import sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THESIS = ["--resolutions", "160,240,320,400,480"]


@pytest.fixture(autouse=True)
def empty_folder(tmp_path, monkeypatch):
    """An empty working folder without settings: no cxr-sweep.toml above it, no CXR_SWEEP_*."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for key in [k for k in os.environ if k.startswith("CXR_SWEEP_")]:
        monkeypatch.delenv(key)
    return work


def cli(capsys, *argv):
    code = run_cli(sweep.main, list(argv), prog="orchestrator.sweep")
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip()


def test_thesis_dry_run_in_an_empty_folder(capsys, empty_folder):
    code, out, err = cli(capsys, *THESIS, "--dry-run")
    assert code == 0, err
    assert "125 trials: 0 finished, 125 to run" in out
    assert "no store: planned for CheXpert's size" in out and "223,414 train + 234 valid" in out
    hours = float(re.search(r"estimated GPU-hours: ([0-9.]+) for the whole grid", out).group(1))
    single = re.search(r"with --task-mode single \(one model per task\): 625 trials, ([0-9.]+) "
                       r"GPU-hours", out)
    assert single and float(single.group(1)) == pytest.approx(5 * hours, rel=0.01)
    # every committed measurement file is read; each group says where its rate came from
    groups = [line for line in out.splitlines() if " px " in line and "@" in line]
    assert len(groups) == 25
    assert all(line.rstrip().endswith(("table", "FLOPs estimate", ".json)")) for line in groups)
    measured = [line for line in groups if "measured:" in line]
    assert len(measured) >= 10 and all("gpu_check-" in line for line in measured)
    assert f"{len(measured)} of 25 groups at their measured img/s" in out
    assert "r160-efficientnet-b0-s0-multi-<store hash>" in out     # ids wait for the store
    assert os.listdir(empty_folder) == []                             # a dry run writes nothing
    # without the measurements every group is priced by the throughput model
    code, out, err = cli(capsys, *THESIS, "--dry-run", "--gpu-measurements", "none")
    assert code == 0 and "0 of 25 groups at their measured img/s, 25 from the FLOPs table" in out


def test_dry_run_works_for_every_registered_model(capsys):
    from trainer.models import list_models
    models = list_models()
    code, out, err = cli(capsys, "--resolutions", "64", "--seeds", "0", "--dry-run",
                         "--models", ",".join(models), "--gpus-per-trial", "1")
    assert code == 0, err
    assert "smallcnn @ 64 px" in out
    smallcnn = next(line for line in out.splitlines() if line.startswith("smallcnn @ 64 px"))
    assert smallcnn.rstrip().endswith("FLOPs estimate")
    assert "from FLOPs counted for the model" in out


def test_settings_file_then_environment_then_flags(tmp_path, empty_folder, monkeypatch):
    (tmp_path / "cxr-sweep.toml").write_text(
        'store = "/data/store"\nstorage = "/data/sweeps"\nname = "fromfile"\n'
        'resolutions = [160, 240]\nseeds = "0-2"\nlr-head = 0.001\naugment = false\n'
        'log = ["tensorboard", "mlflow"]\n')
    s, t = sweep.configs_from_argv([])          # found in a parent of the working folder
    assert (s.store, s.storage, s.name) == ("/data/store", "/data/sweeps", "fromfile")
    assert s.resolutions == (160, 240) and s.seeds == (0, 1, 2) and s.log == ("tensorboard", "mlflow")
    assert t.lr_head == 0.001 and t.augment is False
    monkeypatch.setenv("CXR_SWEEP_NAME", "fromenv")
    monkeypatch.setenv("CXR_SWEEP_LR_HEAD", "0.002")
    s, t = sweep.configs_from_argv([])
    assert s.name == "fromenv" and t.lr_head == 0.002
    s, t = sweep.configs_from_argv(["--name", "fromflag", "--augment", "--lr-head", "0.003"])
    assert s.name == "fromflag" and t.lr_head == 0.003 and t.augment is True
    monkeypatch.setenv("CXR_SWEEP_MAX_FAILURES", "many")
    with pytest.raises(UserError, match="CXR_SWEEP_MAX_FAILURES: max-failures: 'many' is not an integer"):
        sweep.configs_from_argv([])
    monkeypatch.delenv("CXR_SWEEP_MAX_FAILURES")
    (tmp_path / "cxr-sweep.toml").write_text('stor = "/typo"\n')
    with pytest.raises(UserError, match=r"cxr-sweep.toml: unknown setting 'stor'"):
        sweep.configs_from_argv([])


def test_init_writes_a_starter_file_the_sweep_reads(capsys, empty_folder):
    code, out, err = cli(capsys, "init", "--store", "s3://bucket/store", "--storage",
                         "s3://bucket/sweeps")
    assert code == 0, err
    assert (empty_folder / "cxr-sweep.toml").exists()
    s, _ = sweep.configs_from_argv(THESIS)
    assert (s.store, s.storage, s.name) == ("s3://bucket/store", "s3://bucket/sweeps", "thesis")
    code, out, err = cli(capsys, "init")
    assert code == 2 and "exists" in err and "--force" in err
    assert cli(capsys, "init", "--force")[0] == 0


def test_results_go_to_the_sweeps_storage_by_default():
    from orchestrator.sweep_config import SweepConfig
    s = SweepConfig(storage="/data/sweeps", name="thesis")
    assert s.results_location == "/data/sweeps/thesis/results"
    assert SweepConfig(storage="/d", name="n", results_dir="/r").results_location == "/r"


def _help(module: str, *extra: str) -> str:
    done = subprocess.run([sys.executable, "-m", module, *extra, "--help"], capture_output=True,
                          text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_help_loads_no_heavy_packages_and_points_inside_the_repo():
    code = ("import sys\nfrom orchestrator import sweep\ntry:\n    sweep.main(['--help'])\n"
            "except SystemExit:\n    pass\n"
            "print('LOADED', sorted(m for m in ('torch', 'ray', 'pandas') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          timeout=120)
    assert done.returncode == 0 and "LOADED []" in done.stdout, done.stdout[-500:] + done.stderr
    texts = {"sweep": done.stdout, "estimate": _help("orchestrator.estimate"),
             "demo": _help("orchestrator.demo"), "init": _help("orchestrator.sweep", "init")}
    assert "usage: python -m orchestrator.estimate" in texts["estimate"]
    for name, text in texts.items():
        assert "PROTOCOL.md" not in text and "../" not in text and "shared/" not in text, name
    assert "(required to run)" in " ".join(texts["sweep"].split())


def test_demo_help_matches_the_readme():
    text = " ".join(_help("orchestrator.demo").split())
    readme = " ".join(open(os.path.join(REPO, "README.md")).read().split())
    assert "python -m orchestrator.demo" in readme
    for phrase in ("demo/results/report.html", "smallcnn", "300-study phantom"):
        assert phrase in text and phrase in readme, phrase


def test_ray_up_writes_the_settings_file_on_the_head(tmp_path):
    """cluster.yaml's head setup, run in a fake home: the card's command then needs no flags."""
    import yaml
    config = yaml.safe_load(open(os.path.join(REPO, "cluster.yaml")))
    home = tmp_path / "home"
    (home / ".cxr-sweep").mkdir(parents=True)
    (home / ".cxr-sweep" / "env.sh").write_text(
        "export CXR_BUCKET=b\nexport CXR_STORE=s3://$CXR_BUCKET/store\n"
        "export CXR_STORAGE=s3://$CXR_BUCKET/sweeps\nexport CXR_WEIGHTS_DIR=s3://$CXR_BUCKET/weights\n"
        "export CXR_CACHE_DIR=$HOME/cxr-cache\n")
    env = {"HOME": str(home), "PATH": os.environ["PATH"]}
    for command in config["head_setup_commands"]:
        subprocess.run(["bash", "-c", command], env=env, check=True, timeout=60)
    (home / "cxr-sweep").mkdir()
    os.chdir(home / "cxr-sweep")          # the file is found from any folder below ~
    s, t = sweep.configs_from_argv(THESIS)
    assert (s.store, s.storage, s.name, s.address) == ("s3://b/store", "s3://b/sweeps", "thesis", "auto")
    assert s.gpus_explicit and t.weights_dir == "s3://b/weights"
    assert t.cache_dir == str(home / "cxr-cache")
    (home / "cxr-sweep.toml").write_text('name = "mine"\n')     # a second `ray up` keeps edits
    for command in config["head_setup_commands"]:
        subprocess.run(["bash", "-c", command], env=env, check=True, timeout=60)
    assert (home / "cxr-sweep.toml").read_text() == 'name = "mine"\n'
