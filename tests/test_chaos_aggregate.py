"""A driver SIGKILLed while it aggregates, then the same command again: the results are complete and
equal to an uninterrupted run's, the killed run left no torn file under a final name, and no
temporary file survives the re-run.

The kill is a real SIGKILL of a real ``python -m analysis.aggregate`` process, sent by the process
to itself at a chosen point instead of after a delay (a delay would land anywhere, or after the
end, on a loaded machine): at the Nth rename into the results folder, i.e. with that file's
temporary copy complete on disk and not yet renamed, the crash window of every atomic write.
"""
from __future__ import annotations

import filecmp
import os
import subprocess
import sys

import pytest

from test_aggregate import fabricate_sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs the aggregation command, SIGKILLing itself at the KILL_AT-th rename into RESULTS.
KILLED_AGGREGATION = """
import os, runpy, signal, sys
results, kill_at = os.path.abspath(sys.argv[1]), int(sys.argv[2])
renames, real_replace = [0], os.replace
def replace(src, dst, *a, **k):
    if os.path.abspath(str(dst)).startswith(results + os.sep):
        renames[0] += 1
        if renames[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst, *a, **k)
os.replace = replace
sys.argv = ["analysis.aggregate"] + sys.argv[3:]
runpy.run_module("analysis.aggregate", run_name="__main__")
"""
KILL_AT = 9     # trials/epochs tables written, the summary tables half done, no report yet


def aggregate(*args: str, kill_at: int | None = None, results: str = "") -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               MPLBACKEND="Agg")
    if kill_at is None:
        cmd = [sys.executable, "-m", "analysis.aggregate", *args]
    else:
        cmd = [sys.executable, "-c", KILLED_AGGREGATION, results, str(kill_at), *args]
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)


def files_below(root: str) -> set[str]:
    return {os.path.relpath(os.path.join(d, n), root) for d, _, names in os.walk(root) for n in names}


@pytest.mark.slow
def test_driver_killed_during_aggregation_then_rerun(tmp_path):
    fake = fabricate_sweep(tmp_path, resolutions=(160, 320), models=("resnet50",), seeds=(0, 1),
                           studies=60)
    reference = str(tmp_path / "reference")
    done = aggregate("--sweep", fake.location, "--results-dir", reference, "--no-figures", "--quiet")
    assert done.returncode == 0, done.stderr[-3000:]
    results = str(tmp_path / "results")

    killed = aggregate("--sweep", fake.location, "--results-dir", results, "--no-figures", "--quiet",
                       kill_at=KILL_AT, results=results)
    assert killed.returncode == -9, (killed.returncode, killed.stderr[-3000:])
    left = files_below(results)
    temps = [f for f in left if ".tmp-" in f]
    finals = left - set(temps)
    assert len(temps) == 1, left                       # the write the kill cut short
    assert len(finals) == KILL_AT - 1 and "summary.json" not in finals, left   # really part-way
    for name in finals:                                # whatever has its final name is whole
        assert filecmp.cmp(os.path.join(results, name), os.path.join(reference, name), shallow=False), name

    again = aggregate("--sweep", fake.location, "--results-dir", results, "--no-figures", "--quiet")
    assert again.returncode == 0, again.stderr[-3000:]
    assert files_below(results) == files_below(reference)      # complete, and no temporary file
    csvs = sorted(f for f in files_below(reference) if f.endswith(".csv"))
    assert len(csvs) > 10
    for name in csvs:
        assert filecmp.cmp(os.path.join(results, name), os.path.join(reference, name), shallow=False), name
