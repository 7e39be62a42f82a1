"""TrainConfig: help in metadata, validation once at construction, the recipe presets, identity."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from trainer.config import RECIPE_FIELDS, RECIPES, ConfigError, TrainConfig, field_help


def test_every_field_has_help_and_the_metadata_the_command_lines_read():
    helps = field_help()
    assert set(helps) == {f.name for f in dataclasses.fields(TrainConfig)}
    assert all(text.strip() for text in helps.values())
    grid = {f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("grid")}
    assert grid == {"resolution", "model", "seed", "task"}
    hidden = {f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("identity") is False}
    assert set(TrainConfig.result_fields()) == {f.name for f in dataclasses.fields(TrainConfig)} - hidden
    assert hidden == {"store", "weights_dir", "workers", "cuda_graphs", "compile", "cache_dir"}
    with pytest.raises(ConfigError, match="amp"):
        TrainConfig(amp="fp16")   # a "choices" field


def test_one_resolution_limit_and_non_negative_seed():
    from trainer.models import MIN_RESOLUTION
    TrainConfig(resolution=MIN_RESOLUTION)
    with pytest.raises(ConfigError, match=f">= {MIN_RESOLUTION}"):
        TrainConfig(resolution=MIN_RESOLUTION - 1)
    with pytest.raises(ConfigError, match="seed"):
        TrainConfig(seed=-1)


def test_efficientnet_alias_is_resolved_so_one_trial_has_one_id():
    alias = TrainConfig(model="efficientnet", resolution=320)
    named = TrainConfig(model="efficientnet-b3", resolution=320)
    assert alias.model == "efficientnet-b3" and alias.trial_id("m") == named.trial_id("m")
    assert TrainConfig.from_dict(alias.to_dict()).trial_id("m") == alias.trial_id("m")


def test_tasks_are_any_unique_non_empty_names():
    assert TrainConfig(tasks=("Pneumothorax", "Nodule")).tasks == ("Pneumothorax", "Nodule")
    with pytest.raises(ConfigError, match="duplicate"):
        TrainConfig(tasks=("Edema", "Edema"))
    with pytest.raises(ConfigError, match="non-empty"):
        TrainConfig(tasks=("Edema", " "))
    with pytest.raises(ConfigError, match="single task mode needs a task"):
        TrainConfig(task_mode="single")


def test_recipe_presets_explicit_fields_and_identity():
    fastai, literal = TrainConfig(), TrainConfig(recipe="literal")
    for name in RECIPE_FIELDS:
        assert getattr(fastai, name) == RECIPES["fastai"][name]
        assert getattr(literal, name) == RECIPES["literal"][name]
    assert fastai.trial_id("m") != literal.trial_id("m")
    # an explicit field survives the preset; switching the recipe moves only the preset fields
    mixed = TrainConfig(recipe="literal", adam_eps=1e-5)
    assert mixed.adam_eps == 1e-5 and mixed.lr_schedule == "onecycle_lr"
    switched = TrainConfig.from_dict({"recipe": "literal"}, base=TrainConfig(lr_groups="body-head",
                                                                              adam_eps=1e-7))
    assert (switched.lr_groups, switched.adam_eps, switched.aug_style) == ("body-head", 1e-7, "literal")
    back = TrainConfig.from_dict({"recipe": "fastai"}, base=literal)
    assert back.to_dict() == fastai.to_dict()
    # a stored (resolved) config reads back to the same trial
    assert TrainConfig.from_dict(literal.to_dict()).trial_id("m") == literal.trial_id("m")
    # the model options reach create_model
    assert literal.model_options() == {"head_bn_bias": 0.0, "pool_order": "avg,max",
                                       "densenet_final_relu": True}


def test_command_line_recipe_and_point_flags():
    from trainer.train import build_parser, config_from_args
    args = build_parser().parse_args(["--out", "x", "--recipe", "literal", "--no-wd-bn-bias",
                                      "--beta1-cycle", "0.95,0.85,0.95"])
    cfg = config_from_args(args)
    assert cfg.recipe == "literal" and cfg.wd_bn_bias is False and cfg.adam_eps == 1e-8
    assert cfg.beta1_cycle == (0.95, 0.85, 0.95)


def test_tasks_missing_from_the_store_stop_the_trial_before_training(tiny_phantom_store, tmp_path):
    from trainer.train import run_trial
    cfg = TrainConfig(store=tiny_phantom_store, model="resnet18", resolution=32, weights="none",
                      tasks=("Edema", "Pneumothorax"), workers=0)
    with pytest.raises(ConfigError, match="'Pneumothorax' not in store"):
        run_trial(cfg, str(tmp_path / "t"))
    assert not (tmp_path / "t").exists()


def test_the_recipe_reaches_the_model():
    from trainer.train import create_trial_model
    for recipe in ("fastai", "literal"):
        cfg = TrainConfig(model="densenet121", resolution=32, weights="none", recipe=recipe)
        model = create_trial_model(cfg, 2, "none")
        head_bns = [m for m in model.head.modules() if isinstance(m, torch.nn.BatchNorm1d)]
        assert model.head.pool_order == cfg.pool_order
        assert all(float(bn.bias.abs().max()) == pytest.approx(cfg.head_bn_bias) for bn in head_bns)
        features = model.eval().body(torch.zeros(2, 3, 32, 32) - 3)   # dark input: negatives
        assert bool((features < 0).any()) is (not cfg.densenet_final_relu)


def test_trial_id_of_a_timm_model_is_a_portable_folder_name():
    cfg = TrainConfig(model="timm:resnet10t", resolution=64)
    tid = cfg.trial_id("0" * 64)
    assert tid.startswith("r64-timm-resnet10t-s0-multi-") and ":" not in tid
    assert cfg.model == "timm:resnet10t"
