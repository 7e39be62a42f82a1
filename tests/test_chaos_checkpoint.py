"""Checkpoints under faults: a damaged or planted latest.pt, a process killed between epochs.jsonl
and latest.pt, and a disk that fills up mid-write. Each ends, after a re-run, bitwise equal to an
uninterrupted trial (CPU, smallcnn on the session's tiny phantom store)."""
from __future__ import annotations

import errno
import glob
import io
import os
import pickle
import signal
import subprocess
import sys

import pytest
import torch

from common import storage
from common.trial_folder import TrialFolder
from trainer import checkpoint as ckpt
from test_sweep_helpers import stable_result

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = {"model": "smallcnn", "resolution": 32, "epochs_frozen": 1, "epochs_unfrozen": 2,
          "weights": "none", "max_train_studies": 40, "max_valid_studies": 30, "device": "cpu",
          "workers": 0}


# --- latest.pt and previous.pt ----------------------------------------------------------------------
def test_save_keeps_the_previous_checkpoint_until_the_next_is_whole(tmp_path):
    folder = TrialFolder(str(tmp_path / "t"))
    ckpt.save(folder.latest_checkpoint, {"epoch": 1})
    assert not os.path.exists(folder.previous_checkpoint)
    ckpt.save(folder.latest_checkpoint, {"epoch": 2})
    assert ckpt.load(folder.previous_checkpoint)["epoch"] == 1
    assert ckpt.load(folder.latest_checkpoint)["epoch"] == 2
    ckpt.save(folder.best_checkpoint("edema"), {"epoch": 2})      # best files are not rotated
    ckpt.save(folder.best_checkpoint("edema"), {"epoch": 3})
    assert not glob.glob(str(tmp_path / "t" / "checkpoints" / "*.tmp-*"))
    assert sorted(os.listdir(tmp_path / "t" / "checkpoints")) == ["best-edema.pt", "latest.pt",
                                                                  "previous.pt"]


def test_a_write_that_dies_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    folder = TrialFolder(str(tmp_path / "t"))
    ckpt.save(folder.latest_checkpoint, {"epoch": 1})

    def dies(location, data):
        raise OSError(errno.EIO, "I/O error")
    monkeypatch.setattr(storage, "write_bytes", dies)
    with pytest.raises(OSError):
        ckpt.save(folder.latest_checkpoint, {"epoch": 2})
    monkeypatch.undo()
    warnings = []
    assert ckpt.load_latest(folder.location, warn=warnings.append)["epoch"] == 1
    assert warnings == []


def test_truncated_latest_falls_back_to_previous_with_a_warning_naming_it(tmp_path):
    folder = TrialFolder(str(tmp_path / "t"))
    ckpt.save(folder.latest_checkpoint, {"epoch": 1, "w": torch.arange(1000)})
    ckpt.save(folder.latest_checkpoint, {"epoch": 2, "w": torch.arange(1000)})
    data = open(folder.latest_checkpoint, "rb").read()
    open(folder.latest_checkpoint, "wb").write(data[:len(data) // 2])
    warnings = []
    assert ckpt.load_latest(folder.location, warn=warnings.append)["epoch"] == 1
    assert len(warnings) == 1 and folder.latest_checkpoint in warnings[0]
    assert "continuing from" in warnings[0] and folder.previous_checkpoint in warnings[0]
    assert ckpt.resume_epoch(folder.location) == 1


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_never_run(tmp_path):
    folder = TrialFolder(str(tmp_path / "t"))
    ckpt.save(folder.latest_checkpoint, {"epoch": 1})
    ckpt.save(folder.latest_checkpoint, {"epoch": 2})
    marker = tmp_path / "code-ran"
    evil = _RunsCode()
    evil.marker = str(marker)
    buf = io.BytesIO()
    torch.save({"epoch": 99, "payload": evil}, buf, pickle_module=pickle)
    open(folder.latest_checkpoint, "wb").write(buf.getvalue())
    warnings = []
    resume = ckpt.load_latest(folder.location, warn=warnings.append)
    assert resume["epoch"] == 1 and not marker.exists()
    assert "weights_only" in warnings[0] and folder.latest_checkpoint in warnings[0]
    with pytest.raises(ckpt.CheckpointError):
        ckpt.load(folder.latest_checkpoint)
    assert not marker.exists()


def test_no_usable_checkpoint_starts_over_with_a_warning(tmp_path):
    folder = TrialFolder(str(tmp_path / "t"))
    os.makedirs(os.path.dirname(folder.latest_checkpoint))
    for loc in (folder.latest_checkpoint, folder.previous_checkpoint):
        open(loc, "wb").write(b"PK\x03\x04 not a checkpoint")
    warnings = []
    assert ckpt.load_latest(folder.location, warn=warnings.append) is None
    assert "starts over from epoch 1" in warnings[0] and folder.previous_checkpoint in warnings[0]


# --- the real trainer ---------------------------------------------------------------------------------
def train_config(store):
    from trainer.config import TrainConfig
    return TrainConfig.from_dict({**CONFIG, "store": store})


@pytest.fixture(scope="module")
def reference(tiny_phantom_store, tmp_path_factory):
    """The uninterrupted trial every faulty run must end equal to."""
    from trainer.train import run_trial
    return run_trial(train_config(tiny_phantom_store), str(tmp_path_factory.mktemp("ref") / "t"))


class StopAfter(Exception):
    pass


def run_until(store, trial_dir, epoch):
    from trainer.train import run_trial

    def hook(record):
        if record["epoch"] == epoch:
            raise StopAfter()
    with pytest.raises(StopAfter):
        run_trial(train_config(store), trial_dir, on_epoch=hook)


def test_truncated_latest_in_a_real_trial_resumes_from_previous(tiny_phantom_store, tmp_path,
                                                                 reference, capfd):
    from trainer.train import run_trial
    folder = TrialFolder(str(tmp_path / "t"))
    run_until(tiny_phantom_store, folder.location, epoch=2)
    data = open(folder.latest_checkpoint, "rb").read()
    open(folder.latest_checkpoint, "wb").write(data[:4096])
    result = run_trial(train_config(tiny_phantom_store), folder.location)
    assert folder.latest_checkpoint in capfd.readouterr().err
    assert "resumed after epoch 1" in storage.read_bytes(folder.log_path).decode()
    assert stable_result(result) == stable_result(reference)
    assert [r["epoch"] for r in folder.read_epochs()] == [1, 2, 3]


KILL_BETWEEN = """
import os, signal, sys
sys.path[:0] = [{repo!r}]
from trainer import checkpoint as ckpt
from trainer.config import TrainConfig
from trainer.train import run_trial
real_save = ckpt.save

def save(location, obj):
    # epochs.jsonl already holds epoch {epoch}; die before latest.pt does
    if location.endswith(ckpt.LATEST) and obj.get("epoch") == {epoch}:
        os.kill(os.getpid(), signal.SIGKILL)
    real_save(location, obj)
ckpt.save = save
run_trial(TrainConfig.from_dict({config!r}), {trial!r})
"""


def test_killed_between_epochs_jsonl_and_latest_pt(tiny_phantom_store, tmp_path, reference):
    from trainer.train import run_trial
    folder = TrialFolder(str(tmp_path / "t"))
    script = KILL_BETWEEN.format(repo=REPO, epoch=2, trial=folder.location,
                                 config={**CONFIG, "store": tiny_phantom_store})
    # CPU results are bitwise for a given thread count: the killed process uses this one's.
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=600, env=env)
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()[-2000:]
    assert [r["epoch"] for r in folder.read_epochs()] == [1, 2]      # one record ahead of ...
    assert ckpt.load(folder.latest_checkpoint)["epoch"] == 1         # ... the checkpoint
    result = run_trial(train_config(tiny_phantom_store), folder.location)
    assert stable_result(result) == stable_result(reference)
    assert [r["epoch"] for r in folder.read_epochs()] == [1, 2, 3]


class FullDisk:
    """``open`` for common.storage whose files take ``budget`` more bytes, then ENOSPC."""

    def __init__(self, budget: int):
        self.budget = budget

    def __call__(self, path, mode="r", *args, **kwargs):
        f = open(path, mode, *args, **kwargs)
        if "w" not in mode:
            return f
        disk = self
        real_write = f.write

        def write(data):
            if len(data) > disk.budget:
                real_write(data[:disk.budget])
                disk.budget = 0
                raise OSError(errno.ENOSPC, "No space left on device", path)
            disk.budget -= len(data)
            return real_write(data)
        f.write = write
        return f


def test_disk_full_mid_checkpoint_then_freed(tiny_phantom_store, tmp_path, reference, monkeypatch):
    from trainer.train import run_trial
    folder = TrialFolder(str(tmp_path / "t"))
    run_until(tiny_phantom_store, folder.location, epoch=1)
    size = os.path.getsize(folder.latest_checkpoint)
    # room for epoch 2's small files but not its whole latest.pt
    monkeypatch.setattr(storage, "open", FullDisk(budget=size // 2), raising=False)
    with pytest.raises(OSError) as err:
        run_trial(train_config(tiny_phantom_store), folder.location)
    assert "No space left on device" in str(err.value)
    left = [p for p in glob.glob(str(tmp_path / "t" / "**" / "*"), recursive=True) if ".tmp-" in p]
    assert left == []                                    # no partial temporary files
    monkeypatch.undo()                                    # space freed
    result = run_trial(train_config(tiny_phantom_store), folder.location)
    assert stable_result(result) == stable_result(reference)
