"""The README's demo command, at toy size: phantom -> store -> sweep on an embedded Ray -> report."""
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_demo(*args, env):
    return subprocess.run([sys.executable, "-m", "orchestrator.demo", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_demo_runs_end_to_end_and_resumes(tmp_path):
    ray_dir = tempfile.mkdtemp(prefix="cxrd-")  # short: Ray's socket paths must fit 107 bytes
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", CXR_RAY_DIR=ray_dir, TMPDIR=ray_dir)
    args = ["--out", str(tmp_path / "demo"), "--resolutions", "32,48", "--studies", "16",
            "--epochs", "1", "--cpus-per-trial", "1"]
    try:
        first = run_demo(*args, env=env)
        assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
        assert "SYNTHETIC PHANTOM DATA" in first.stdout
        assert "32 px" in first.stdout and "48 px" in first.stdout  # the results table
        assert (tmp_path / "demo" / "results" / "report.html").exists()
        # a second run reuses the phantom and the store and trains nothing again
        second = run_demo(*args, env=env)
        assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
        assert "reusing the phantom" in second.stdout and "reusing the store" in second.stdout
        assert "2 already finished, 0 to run" in second.stdout
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)


def test_demo_rejects_bad_seeds(tmp_path):
    bad = run_demo("--out", str(tmp_path / "d"), "--seeds", "x", env=dict(os.environ))
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "orchestrator.demo: error: --seeds: 'x' is not a comma-separated list of integers"]
