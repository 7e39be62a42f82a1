"""What a model costs: forward FLOPs per image, counted or published, and where the figure came from.

The dry-run estimate and GPU packing need a cost for every model a sweep may name, ``timm:<name>``
included. :func:`model_flops` counts it for any model without running it: the network is built on
the ``meta`` device (shapes only, no memory, no arithmetic) and one forward of one image runs under
``torch.utils.flop_counter.FlopCounterMode``, which counts 2 FLOPs per multiply-accumulate of
convolutions and matrix products (elementwise work, norms and pooling are not counted; published
figures leave them out too). :func:`forward_cost` prefers a published figure where the model
registered one and says which source it used.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from trainer.models.registry import check_resolution, model_info, resolve_model_name

__all__ = ["model_flops", "forward_cost", "ForwardCost", "COUNTED"]

#: ``ForwardCost.source`` of a counted figure.
COUNTED = "counted: torch FlopCounterMode on the meta device"


@functools.lru_cache(maxsize=None)
def _flops(resolved: str, resolution: int) -> float:
    from trainer.models.network import create_model
    with torch.device("meta"):
        model = create_model(resolved, resolution, outputs=1, weights="none").eval()
        counter = FlopCounterMode(display=False)
        with counter:
            model(torch.zeros(1, 3, resolution, resolution))
    return float(counter.get_total_flops())


def model_flops(name: str, resolution: int) -> float:
    """Forward FLOPs for one image at ``resolution`` px, body and head with one output (counted,
    cached per model and resolution).

    >>> round(model_flops("resnet50", 224) / 1e9, 2)   # torchvision publishes 4.09 GMACs
    8.18
    """
    resolution = check_resolution(resolution)
    return _flops(resolve_model_name(name, resolution), resolution)


@dataclass(frozen=True)
class ForwardCost:
    flops: float       # forward FLOPs per image (2 per multiply-accumulate)
    source: str        # 'published: <whose figure>' or COUNTED


def forward_cost(name: str, resolution: int) -> ForwardCost:
    """Forward FLOPs per image at ``resolution``: the model's published figure at 224 px scaled by
    pixel count where it registered one, else :func:`model_flops`.

    >>> forward_cost("resnet50", 448).source
    'published: torchvision model docs (GFLOPS column, 224 px), scaled by pixels'
    >>> forward_cost("smallcnn", 480).source == COUNTED
    True
    """
    resolution = check_resolution(resolution)
    info = model_info(name, resolution)
    if info.published_gmacs_224 is not None:
        flops = 2e9 * info.published_gmacs_224 * (resolution / 224) ** 2
        return ForwardCost(flops, f"published: {info.cost_source}, scaled by pixels")
    return ForwardCost(model_flops(info.name, resolution), COUNTED)
