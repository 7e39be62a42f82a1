"""The compile mode (trainer/compile.py): when 'auto' turns it on, that it stays out of the trial id
and the checkpoints, and that compiled training equals eager training within the stated tolerance
(bench/gpu/equivalence.py's TOLERANCE; the GPU check runs the same comparison on CUDA)."""
from __future__ import annotations

import pytest
import torch

from trainer.compile import compile_model, is_compiled, want_compile
from trainer.config import ConfigError, TrainConfig

CPU, CUDA = torch.device("cpu"), torch.device("cuda")   # a device object needs no GPU


def test_auto_is_off_until_a_gpu_has_measured_it():
    for res in (160, 240, 320, 400, 480):
        assert want_compile("auto", CPU, res) is False          # CPU runs stay eager, bitwise exact
        assert want_compile("auto", CUDA, res) is False         # not on by default until measured
        assert want_compile("on", CUDA, res) is True
        assert want_compile("on", CPU, res) and not want_compile("off", CUDA, res)
    with pytest.raises(ValueError, match="compile"):
        want_compile("yes", CPU, 320)


def test_compile_is_a_setting_not_part_of_the_trial_id():
    plain, compiled = TrainConfig(), TrainConfig(compile="on")
    assert "compile" not in TrainConfig.result_fields()
    assert plain.trial_id("m" * 64) == compiled.trial_id("m" * 64)
    with pytest.raises(ConfigError, match="compile"):
        TrainConfig(compile="fast")


def test_compiling_in_place_keeps_the_state_dict_keys():
    """Checkpoints, resume and Grad-CAM load state_dicts by key: compiling must not rename them
    (torch.compile(model) would prefix every key with '_orig_mod.')."""
    from trainer.models import create_model
    model = create_model("smallcnn", 32, outputs=5, weights="none")
    keys = list(model.state_dict())
    assert compile_model(model) is model and is_compiled(model)
    assert list(model.state_dict()) == keys


@pytest.mark.slow
def test_compiled_training_equals_eager_within_tolerance_on_cpu():
    """Two steps of the trainer's own step (smallcnn, 32 px, fp32, one batch shape so that
    inductor compiles once): eager twice (bitwise equal on CPU), then compiled."""
    from bench.gpu.equivalence import TOLERANCE, section_equivalence
    from torch._dynamo.utils import counters
    graphs_before = counters["stats"]["unique_graphs"]
    out = section_equivalence(CPU, amp=False, channels_last=False, name="smallcnn", res=32,
                              sizes=[6, 6], modes=(("compiled", False, True),))
    assert counters["stats"]["unique_graphs"] > graphs_before      # inductor really compiled
    assert out["eager_vs_eager"]["max_rel_loss_diff"] == 0.0
    assert out["eager_vs_eager"]["max_abs_weight_diff"] == 0.0
    compiled = out["modes"]["compiled"]
    assert out["tolerance"] == TOLERANCE["fp32"]
    for key, limit in TOLERANCE["fp32"].items():
        assert compiled[key] <= limit, (key, compiled[key], limit)
    assert compiled["batches_tracked_equal"] and compiled["within_tolerance"]
    assert out["all_within_tolerance"]
