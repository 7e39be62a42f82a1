"""The optimizer and schedule of the fastai recipe, checked against fastai itself.

fastai is a test-only dependency (run.sh installs it with --no-deps, with fastdownload, which
fastai's schedule and learner modules import); without it these tests skip.
"""
from __future__ import annotations

import copy
import inspect

import numpy as np
import pytest
import torch
import torch.nn as nn

# Each fastai module this file needs, so that a partial install skips instead of erroring.
for _module in ("fastai.optimizer", "fastai.callback.schedule", "fastai.learner", "fastai.data.core"):
    pytest.importorskip(_module)
from fastai.callback.core import Callback  # noqa: E402
from fastai.callback.schedule import combined_cos as fa_combined_cos  # noqa: E402,F401  (fit_one_cycle)
from fastai.data.core import DataLoaders  # noqa: E402
from fastai.learner import Learner  # noqa: E402
from fastai.optimizer import Adam as FastaiAdam  # noqa: E402
from fastai.torch_core import norm_bias_params  # noqa: E402

from trainer.config import TrainConfig  # noqa: E402
from trainer.models import create_model  # noqa: E402
from trainer.optim import build_optimizer, build_scheduler, layer_groups, onecycle_lr  # noqa: E402


def _fastai_split(model, name: str):
    """fastai's cnn_learner split of the same modules (fastai sees body and head as
    ``nn.Sequential(body, head)``, its body as the network's children)."""
    learner_mod = pytest.importorskip("fastai.vision.learner")
    if name.startswith("resnet"):
        body = nn.Sequential(*model.body.children())
        return learner_mod._resnet_split(nn.Sequential(body, model.head))
    if name.startswith("densenet"):
        return learner_mod._densenet_split(nn.Sequential(nn.Sequential(model.body.features),
                                                         model.head))
    return learner_mod.default_split(nn.Sequential(model.body, model.head))


def _ids(params) -> list[int]:
    return [id(p) for p in params]


@pytest.mark.parametrize("name", ["resnet18", "densenet121", "efficientnet-b0"])
def test_parameter_groups_lr_and_weight_decay_per_parameter(name):
    model = create_model(name, 32, outputs=5, weights="none")
    ours = layer_groups(model, "model")
    theirs = _fastai_split(model, name)
    assert [sorted(_ids(g)) for g in ours] == [sorted(_ids(g)) for g in theirs]
    assert len(ours) == (2 if name.startswith("efficientnet") else 3)

    cfg = TrainConfig(model=name, resolution=32)
    opt = build_optimizer(model, cfg, "unfrozen")
    # fastai: Adam over the split, lr=slice(lr_body, lr_head), wd 0.1 except norm/bias params.
    fa = FastaiAdam(theirs, lr=slice(cfg.lr_body, cfg.lr_head), wd=cfg.weight_decay, eps=1e-5)
    no_wd = set(_ids(norm_bias_params(nn.Sequential(model.body, model.head))))
    want_lr, want_wd = {}, {}
    for params, hyper in zip(fa.param_lists, fa.hypers):
        for p in params:
            want_lr[id(p)] = hyper["lr"]
            want_wd[id(p)] = 0.0 if id(p) in no_wd else hyper["wd"]
    got_lr = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    got_wd = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert got_lr == want_lr and got_wd == want_wd   # the stage's max LRs, before the schedule
    assert len(set(got_lr.values())) == len(ours)
    fastai_defaults = inspect.signature(FastaiAdam).parameters
    assert opt.defaults["eps"] == fastai_defaults["eps"].default
    assert opt.param_groups[0]["betas"][1] == fastai_defaults["sqr_mom"].default

    literal = TrainConfig(model=name, resolution=32, recipe="literal")
    lit = build_optimizer(model, literal, "unfrozen")
    assert {g["weight_decay"] for g in lit.param_groups} == {0.1}
    assert [_ids(g["params"]) for g in lit.param_groups] == \
        [_ids(model.body.parameters()), _ids(model.head.parameters())]
    assert lit.defaults["eps"] == 1e-8


class _Record(Callback):
    """Every group's lr and mom (beta1) as fastai's ParamScheduler set them before each batch."""
    order = 61

    def __init__(self):
        self.rows = []

    def before_batch(self):
        if self.training:
            self.rows.append([(float(h["lr"]), float(h["mom"])) for h in self.opt.hypers])


class _Tiny(nn.Module):
    """A three-group network with CXRNet's stage interface: the schedule does not depend on the
    model, and a real Learner run on it takes a second."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 4))
        self.head = nn.Linear(4, 2)
        self.outputs = 2

    def forward(self, x):
        return self.head(self.body(x))

    def layer_groups(self):
        return [list(self.body[0].parameters()), [*self.body[1].parameters(),
                                                  *self.body[2].parameters()],
                list(self.head.parameters())]

    def freeze_body(self):
        for m in self.body:
            for p in m.parameters():
                p.requires_grad_(isinstance(m, nn.BatchNorm1d))

    def unfreeze_body(self):
        for p in self.body.parameters():
            p.requires_grad_(True)


def _fastai_two_stages(model, groups, cfg, steps: int):
    """fastai: freeze, fit_one_cycle(epochs_frozen, lr_frozen), unfreeze,
    fit_one_cycle(epochs_unfrozen, slice(lr_body, lr_head)), on ``steps`` batches an epoch."""
    from torch.utils.data import DataLoader, TensorDataset
    x = torch.randn(steps * 4, 4)
    y = torch.rand(steps * 4, model.outputs)
    data = DataLoader(TensorDataset(x, y), batch_size=4)
    record = _Record()
    learn = Learner(DataLoaders(data, data), model, loss_func=nn.BCEWithLogitsLoss(),
                    opt_func=FastaiAdam, splitter=lambda m: groups, wd=cfg.weight_decay,
                    wd_bn_bias=False, train_bn=True, cbs=[record])
    states = {}
    with learn.no_bar(), learn.no_logging():
        learn.freeze()
        learn.fit_one_cycle(cfg.epochs_frozen, cfg.lr_frozen)
        states["after_stage_1"] = sum(len(s) > 2 for s in learn.opt.state.values())
        learn.unfreeze()
        states["after_unfreeze"] = sum(len(s) > 2 for s in learn.opt.state.values())
        learn.fit_one_cycle(cfg.epochs_unfrozen, slice(cfg.lr_body, cfg.lr_head))
    return record.rows, states


def _our_rows(model, cfg, stage: str, steps: int):
    opt = build_optimizer(model, cfg, stage)
    sched = build_scheduler(opt, cfg, stage, steps)
    epochs = cfg.epochs_frozen if stage == "frozen" else cfg.epochs_unfrozen
    rows = []
    for _ in range(epochs * steps):
        by_group = {}
        for g in opt.param_groups:
            by_group[g["layer_group"]] = (g["lr"], g["betas"][0])
        rows.append([by_group[i] for i in sorted(by_group)])
        sched.step()
    return rows


def test_lr_and_beta1_per_step_match_fit_one_cycle():
    """Both stages of the thesis's two fit_one_cycle calls, every step, every group."""
    torch.manual_seed(0)
    model = _Tiny()
    cfg = TrainConfig(epochs_frozen=1, epochs_unfrozen=2)
    steps = 7
    fa_model = copy.deepcopy(model)
    theirs, states = _fastai_two_stages(fa_model, fa_model.layer_groups(), cfg, steps)
    ours = _our_rows(model, cfg, "frozen", steps) + _our_rows(model, cfg, "unfrozen", steps)
    assert len(theirs) == len(ours) == 3 * steps
    # fastai carries the schedule position in float32 (combine_scheds): ~1e-6 relative at the
    # tail of the cosine, where the LR is 1e5 times below its peak
    np.testing.assert_allclose(np.array(ours), np.array(theirs), rtol=1e-5, atol=0)
    # the unfreeze cleared fastai's Adam state: stage 2 starts with fresh moments, as ours does
    assert states["after_stage_1"] > 0 and states["after_unfreeze"] == 0
    assert TrainConfig().carry_optimizer is False


def test_literal_schedule_is_torch_onecycle_lr():
    p = torch.nn.Parameter(torch.zeros(1))
    for total in (2, 3, 10):
        opt = torch.optim.AdamW([p], lr=1e-3)
        ref = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=total,
                                                  pct_start=0.25, div_factor=25,
                                                  final_div_factor=1e5, cycle_momentum=False)
        want = []
        for _ in range(total):
            want.append(opt.param_groups[0]["lr"])
            opt.step()
            ref.step()
        assert [onecycle_lr(i, total, 0.25, 1e-3, 25, 1e5) for i in range(total)] == want


def _fastai_optimizer(model, groups, cfg):
    """fastai's Adam with its own defaults (eps, sqr_mom); wd as the thesis set it."""
    opt = FastaiAdam(groups, lr=cfg.lr_frozen, wd=cfg.weight_decay)
    for p in norm_bias_params(nn.Sequential(model.body, model.head)):
        opt.state[p]["do_wd"] = False
    return opt


def test_adam_steps_match_fastai_over_both_stages():
    """Same model twice, the same gradients each step: our AdamW (decoupled decay, none on
    norm/bias, eps 1e-5, beta1 cycled, per-group LRs, fresh moments at stage 2) against fastai's
    Adam driven by fastai's own schedule functions."""
    torch.manual_seed(0)
    ours_model = create_model("resnet18", 32, outputs=2, weights="none")
    fa_model = copy.deepcopy(ours_model)
    start = [p.detach().clone() for p in ours_model.parameters()]
    cfg = TrainConfig(model="resnet18", resolution=32, epochs_frozen=1, epochs_unfrozen=1,
                      lr_frozen=5e-2, lr_body=2.5e-3, lr_head=2.5e-1)   # large: visible steps
    groups = _fastai_split(fa_model, "resnet18")
    fa_opt = _fastai_optimizer(fa_model, groups, cfg)
    one_cycle = {k: v.default for k, v in inspect.signature(Learner.fit_one_cycle).parameters.items()}
    moms = inspect.signature(Learner).parameters["moms"].default
    steps = 3
    g = torch.Generator().manual_seed(1)
    for stage in ("frozen", "unfrozen"):
        opt = build_optimizer(ours_model, cfg, stage)
        sched = build_scheduler(opt, cfg, stage, steps)
        if stage == "frozen":
            fa_model.freeze_body()     # fastai: freeze_to(-1) with train_bn (BN stays trainable)
        else:
            fa_model.unfreeze_body()
            fa_opt.clear_state()       # what Learner.unfreeze() does
        # fit_one_cycle's schedule with its defaults, on fastai's LRs for the stage
        fa_opt.set_hyper("lr", cfg.lr_frozen if stage == "frozen" else slice(cfg.lr_body,
                                                                           cfg.lr_head))
        lr_max = np.array([h["lr"] for h in fa_opt.hypers])
        lr_fn = fa_combined_cos(one_cycle["pct_start"], lr_max / one_cycle["div"], lr_max,
                                lr_max / one_cycle["div_final"])
        mom_fn = fa_combined_cos(one_cycle["pct_start"], *moms)
        for i in range(steps):
            fa_opt.set_hyper("lr", lr_fn(i / steps))
            fa_opt.set_hyper("mom", mom_fn(i / steps))
            for a, b in zip(ours_model.parameters(), fa_model.parameters()):
                # gradients near eps (1e-5), so that eps shapes every step
                grad = torch.randn(a.shape, generator=g) * 1e-5 if a.requires_grad else None
                a.grad = grad
                b.grad = None if grad is None else grad.clone()
            opt.step()
            sched.step()
            fa_opt.step()
    moved = 0
    for (name, a), b, s in zip(ours_model.named_parameters(), fa_model.parameters(), start):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
        moved += int((a - s).abs().max() > 1e-4)
    assert moved == len(start)   # every parameter took real steps


def test_norm_and_bias_parameters_keep_their_value_without_gradient_steps():
    """Decay alone (a zero gradient) shrinks a decayed weight and leaves norm/bias untouched:
    the wd_bn_bias=False rule at work in the optimizer itself, not only in its groups."""
    torch.manual_seed(0)
    model = create_model("resnet18", 32, outputs=2, weights="none")
    cfg = TrainConfig(model="resnet18", resolution=32)
    opt = build_optimizer(model, cfg, "unfrozen")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    after = dict(model.named_parameters())
    assert torch.equal(after["body.bn1.weight"], before["body.bn1.weight"])
    assert torch.equal(after["body.bn1.bias"], before["body.bn1.bias"])
    assert not torch.equal(after["body.conv1.weight"], before["body.conv1.weight"])
