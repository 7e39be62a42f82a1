"""Checks before Ray starts or anything is written (orchestrator/preflight.py)."""
from __future__ import annotations

import os
import socket

import pytest

from common.cli import UserError
from orchestrator import preflight


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("cpus, num_cpus, have, message", [
    (99, None, 2, "--cpus-per-trial 99: no trial could ever start on the local Ray (this machine has 2"),
    (3, 2, 64, "--cpus-per-trial 3: no trial could ever start on the local Ray (--num-cpus 2"),
    (1, 0, 2, "--num-cpus: 0 leaves the local Ray no CPU"),
    (0, None, 2, "--cpus-per-trial: 0 is not positive"),
    (-1, None, 2, "--cpus-per-trial: -1 is not positive"),
])
def test_resources_that_can_never_be_satisfied(cpus, num_cpus, have, message):
    with pytest.raises(UserError) as err:
        preflight.check_resources(cpus, num_cpus, joining=False, available_cpus=have)
    assert str(err.value).startswith(message)


def test_resources_that_fit_pass_and_a_cluster_may_grow():
    preflight.check_resources(2, None, joining=False, available_cpus=2)
    preflight.check_resources(1, 1, joining=False, available_cpus=2)
    preflight.check_resources(99, None, joining=True, available_cpus=2)   # the autoscaler adds nodes


def test_missing_imagenet_weights_are_named_with_the_download_command(tmp_path):
    cache = tmp_path / "weights"
    cache.mkdir()
    from trainer.models import weights_cache as w
    (cache / os.path.basename(w.weights_location("resnet18", str(cache)))).write_bytes(b"x")
    with pytest.raises(UserError) as err:
        preflight.check_weights(["resnet18", "densenet121", "efficientnet"], [160, 320],
                                "imagenet", str(cache))
    msg = str(err.value)
    assert "\n" not in msg
    assert "3 model(s)" in msg                   # densenet121, efficientnet-b0 and -b3; not resnet18
    for name in ("densenet121", "efficientnet-b0", "efficientnet-b3"):
        assert os.path.basename(w.weights_location(name, str(cache))) in msg
    assert "resnet18-" not in msg
    assert (f"python -m trainer.weights download --models densenet121,efficientnet-b0,"
            f"efficientnet-b3 --dir {cache}") in msg


def test_weights_none_a_missing_file_and_a_model_without_imagenet_weights(tmp_path):
    preflight.check_weights(["resnet18"], [64], "none", None)
    with pytest.raises(UserError, match="nonexistent.pt not found"):
        preflight.check_weights(["resnet18"], [64], str(tmp_path / "nonexistent.pt"), None)
    with pytest.raises(UserError, match="smallcnn has no ImageNet weights"):
        preflight.check_weights(["smallcnn"], [64], "imagenet", str(tmp_path))


def test_unreachable_address_fails_before_any_folder_exists(tmp_path):
    storage_loc = tmp_path / "sweeps"
    sweep_loc = storage_loc / "s"
    with pytest.raises(UserError, match=r"cannot reach the Ray cluster at 127\.0\.0\.1:\d+"):
        preflight.run_preflight(models=["resnet18"], resolutions=[64], weights="none",
                                weights_dir=None, cpus_per_trial=1, num_cpus=None,
                                address=f"127.0.0.1:{closed_port()}", storage_loc=str(storage_loc),
                                sweep_loc=str(sweep_loc))
    assert not storage_loc.exists()


def test_storage_probe_creates_no_sweep_folder_and_names_an_unwritable_location(tmp_path):
    storage_loc, sweep_loc = tmp_path / "sweeps", tmp_path / "sweeps" / "s"
    preflight.check_storage(str(storage_loc), str(sweep_loc))
    assert storage_loc.is_dir() and not sweep_loc.exists() and os.listdir(storage_loc) == []
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(UserError, match=f"storage location {blocker}/sweeps is not writable"):
        preflight.check_storage(str(blocker / "sweeps"), str(blocker / "sweeps" / "s"))
