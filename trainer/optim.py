"""The optimizer and the one-cycle schedule of a trial, as fastai's ``fit_one_cycle`` runs them.

fastai's recipe (``recipe="fastai"``, docs/trainer.md has the table):

* **Parameter groups** are the model's layer groups (``CXRNet.layer_groups()``, input to head).
  ``fit_one_cycle(lr_max=slice(lo, hi))`` gives them max LRs spaced geometrically from ``lo`` to
  ``hi`` (fastai's ``even_mults``); stage 1 gives every group ``lr_frozen``.
* **Weight decay** is decoupled (``p *= 1 - lr * wd`` before the Adam update: fastai's ``true_wd``,
  which is torch's AdamW). With ``wd_bn_bias=False`` it skips every normalisation-layer parameter
  and every bias, so each layer group becomes two torch param groups: with and without decay.
* **Adam** with eps 1e-5 and beta2 0.99; beta1 follows the same cosine phases as the LR,
  0.95 -> 0.85 -> 0.95 (fastai's ``moms``). torch's Adam debiases with the current beta1 as fastai does.
* **Stage 2 starts with fresh Adam moments.** fastai freezes by switching ``requires_grad`` off
  (a parameter without a gradient is not stepped and keeps no state), and ``Learner.unfreeze()``
  then clears the optimizer's state (``Optimizer.clear_state``): moments and step counts restart
  in stage 2. ``carry_optimizer=True`` keeps them instead; torch's AdamW skips a parameter whose
  ``.grad`` is None, so one optimizer can serve both stages.
* **The curve** per stage is ``combined_cos(pct_start, lr_max/div, lr_max, lr_max/div_final)``
  evaluated at ``step / steps`` before each step, as fastai's ParamScheduler does.

``recipe="literal"`` keeps the earlier reading: body and head as two groups, decay on everything,
eps 1e-8, a fixed beta1 and torch's OneCycleLR curve (which ends at ``lr_max / (div * final_div)``).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from trainer.models.network import NORM_TYPES   # fastai.torch_core.norm_types: exempt from weight decay


def layer_groups(model: nn.Module, split: str) -> list[list[nn.Parameter]]:
    """The model's parameters as LR groups, input side first, head last.

    ``split``: 'model' = the CXRNet's ``layer_groups()`` (fastai's split for its family);
    'body-head' = two groups."""
    if split == "body-head":
        return [list(model.body.parameters()), list(model.head.parameters())]
    return [list(g) for g in model.layer_groups()]


def no_decay_parameters(model: nn.Module) -> set[int]:
    """ids of the parameters fastai's ``wd_bn_bias=False`` exempts: every parameter of a
    normalisation layer and every bias (fastai.torch_core.norm_bias_params)."""
    out: set[int] = set()
    for module in model.modules():
        if isinstance(module, NORM_TYPES):
            out.update(id(p) for p in module.parameters(recurse=False))
        bias = getattr(module, "bias", None)
        if isinstance(bias, nn.Parameter):
            out.add(id(bias))
    return out


def even_mults(start: float, stop: float, n: int) -> list[float]:
    """``n`` values from ``start`` to ``stop`` spaced geometrically (fastai's even_mults)."""
    if n == 1:
        return [stop]
    mult = (stop / start) ** (1 / (n - 1))
    return [start * mult ** i for i in range(n)]


def stage_lrs(cfg, stage: str, n_groups: int) -> list[float]:
    """Max LR per layer group in a stage: ``lr_frozen`` everywhere in stage 1 (fastai sets one LR
    for all groups; the frozen ones have no gradient), the slice in stage 2."""
    if stage == "frozen":
        return [cfg.lr_frozen] * n_groups
    if cfg.lr_groups == "body-head":
        return [cfg.lr_body] * (n_groups - 1) + [cfg.lr_head]
    return even_mults(cfg.lr_body, cfg.lr_head, n_groups)


def set_stage(model: nn.Module, stage: str) -> None:
    """Freeze the body except its BatchNorm layers (stage 1), or unfreeze everything."""
    if stage == "frozen":
        model.freeze_body()
    else:
        model.unfreeze_body()


def build_optimizer(model: nn.Module, cfg, stage: str | None = None) -> torch.optim.AdamW:
    """AdamW over the layer groups (each split into decayed and undecayed params).

    Each torch param group records its ``layer_group`` index, which the schedule reads. With
    ``stage`` given, the model's trainable set is set for it first."""
    if stage is not None:
        set_stage(model, stage)
    groups = layer_groups(model, cfg.lr_groups)
    exempt = set() if cfg.wd_bn_bias else no_decay_parameters(model)
    lrs = stage_lrs(cfg, stage or "unfrozen", len(groups))
    param_groups = []
    for i, (params, lr) in enumerate(zip(groups, lrs)):
        decay = [p for p in params if id(p) not in exempt]
        plain = [p for p in params if id(p) in exempt]
        for members, wd in ((decay, cfg.weight_decay), (plain, 0.0)):
            if members:
                param_groups.append({"params": members, "lr": lr, "weight_decay": wd,
                                     "layer_group": i})
    covered = sum(len(g["params"]) for g in param_groups)
    if covered != len(list(model.parameters())):
        raise RuntimeError(f"layer groups cover {covered} of the model's "
                           f"{len(list(model.parameters()))} parameters")  # a models bug
    return torch.optim.AdamW(param_groups, lr=lrs[-1], betas=(cfg.beta1_cycle[0], cfg.beta2),
                             eps=cfg.adam_eps, weight_decay=cfg.weight_decay)


# --- the curves ------------------------------------------------------------------------------
def sched_cos(start: float, end: float, pos: float) -> float:
    """fastai's cosine from ``start`` (pos 0) to ``end`` (pos 1)."""
    return start + (1 + math.cos(math.pi * (1 - pos))) * (end - start) / 2


def combined_cos(pct: float, start: float, middle: float, end: float, pos: float) -> float:
    """fastai's ``combined_cos(pct, start, middle, end)`` at ``pos`` in [0, 1]."""
    if pos < pct:
        return sched_cos(start, middle, pos / pct)
    return sched_cos(middle, end, (pos - pct) / (1 - pct))


def onecycle_lr(step: int, total: int, pct: float, lr_max: float, div: float,
                final_div: float) -> float:
    """torch's OneCycleLR (cosine, two phases) at ``step`` of ``total`` (>= 2) steps."""
    initial = lr_max / div
    phases = ((float(pct * total) - 1, initial, lr_max), (total - 1, lr_max, initial / final_div))
    start_step = 0.0
    for i, (end_step, start, end) in enumerate(phases):
        if step <= end_step or i == len(phases) - 1:
            frac = (step - start_step) / (end_step - start_step)
            return end + (start - end) / 2.0 * (math.cos(math.pi * frac) + 1)
        start_step = end_step
    raise AssertionError("unreachable")


class OneCycle:
    """The LR and beta1 of every param group over one stage, set before each step.

    Used like a torch scheduler: built after the optimizer (it sets step 0's values), then
    ``step()`` after every ``optimizer.step()``. Its state is the step count, so a resumed stage
    continues on the same curve."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg, stage: str, steps_per_epoch: int):
        self.optimizer, self.cfg, self.stage = optimizer, cfg, stage
        epochs = cfg.epochs_frozen if stage == "frozen" else cfg.epochs_unfrozen
        self.total = max(1, epochs * steps_per_epoch)
        n_groups = 1 + max(g["layer_group"] for g in optimizer.param_groups)
        self.lr_max = stage_lrs(cfg, stage, n_groups)
        self.steps = 0
        self._apply()

    def values(self, step: int) -> tuple[list[float], float]:
        """(LR per layer group, beta1) before ``step`` (0-based)."""
        c = self.cfg
        pct, div, final = c.onecycle_pct_start, c.onecycle_div, c.onecycle_final_div
        if c.lr_schedule == "onecycle_lr":
            total = max(2, self.total)   # OneCycleLR needs a warm-up and an annealing step
            lrs = [onecycle_lr(step, total, pct, m, div, final) for m in self.lr_max]
        else:
            pos = step / self.total
            lrs = [combined_cos(pct, m / div, m, m / final, pos) for m in self.lr_max]
        return lrs, combined_cos(pct, *c.beta1_cycle, step / self.total)

    def _apply(self) -> None:
        lrs, beta1 = self.values(min(self.steps, self.total - 1))
        for group in self.optimizer.param_groups:
            group["lr"] = lrs[group["layer_group"]]
            group["betas"] = (beta1, self.cfg.beta2)

    def step(self) -> None:
        self.steps += 1
        self._apply()

    def state_dict(self) -> dict:
        return {"stage": self.stage, "steps": self.steps, "total": self.total}

    def load_state_dict(self, state: dict) -> None:
        if state.get("stage") != self.stage or state.get("total") != self.total:
            raise ValueError(f"schedule state of stage {state.get('stage')} with "
                             f"{state.get('total')} steps does not fit stage {self.stage} "
                             f"with {self.total}")
        self.steps = int(state["steps"])
        self._apply()


def build_scheduler(optimizer: torch.optim.Optimizer, cfg, stage: str,
                    steps_per_epoch: int) -> OneCycle:
    return OneCycle(optimizer, cfg, stage, steps_per_epoch)
