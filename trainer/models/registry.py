"""The model registry: one builder and one :class:`ModelInfo` per name, and name resolution.

Everything the rest of the project needs to know about a model (its family, where it ranks in
size within that family, where its ImageNet weights come from, what its published cost is) is
registered next to its builder, so no other module parses model names.
"""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

from common.cli import UserError
from trainer.models.info import (MIN_RESOLUTION, TIMM_PREFIX, ModelInfo,  # noqa: F401  (re-exported)
                                 UnknownModelError, check_resolution)

__all__ = ["ModelInfo", "UnknownModelError", "register_model", "model_info", "list_models",
           "resolve_model_name", "check_resolution", "MIN_RESOLUTION",
           "EFFICIENTNET_BY_RESOLUTION", "PROTOCOL_MODELS", "TIMM_PREFIX"]


#: The thesis's EfficientNet variant per resolution (the thesis protocol, docs/trainer.md).
EFFICIENTNET_BY_RESOLUTION = {160: "efficientnet-b0", 240: "efficientnet-b1", 320: "efficientnet-b3",
                              400: "efficientnet-b4", 480: "efficientnet-b5"}

#: The feature extractors the thesis compares (the default download set of trainer.weights).
PROTOCOL_MODELS = ("resnet50", "resnet152", "densenet121", "densenet161",
                   *EFFICIENTNET_BY_RESOLUTION.values())

_ALIASES = ("efficientnet",)


Builder = Callable[[int], nn.Module]

#: name -> builder(resolution) returning the original network (or a body) with random weights.
_REGISTRY: dict[str, Builder] = {}
_INFO: dict[str, ModelInfo] = {}


def register_model(name: str, *, family: str | None = None, size_order: float = 0.0,
                   source: str = "", weights_url: str | None = None,
                   classifier_prefix: str = "", compound_scaled: bool = False,
                   published_gmacs_224: float | None = None,
                   cost_source: str = "") -> Callable[[Builder], Builder]:
    """Decorator: register ``fn(resolution) -> network`` under ``name`` with its metadata.

    ``weights_url`` set means the model has published ImageNet weights (cached as
    ``<name>-imagenet.pth``). A second registration of a name is a programming error (two models
    would answer to it).
    """
    from trainer.models.weights_cache import weights_file_name

    key = str(name).lower()
    if key in _REGISTRY or key in _ALIASES or key.startswith(TIMM_PREFIX):
        raise ValueError(f"model {name!r} is already registered")

    def decorate(fn: Builder) -> Builder:
        if key in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[key] = fn
        fam = family or key
        variant = key[len(fam):].lstrip("-_") if key.startswith(fam) else key
        _INFO[key] = ModelInfo(
            name=key, family=fam, size_order=float(size_order), variant=variant, source=source,
            weights_url=weights_url,
            weights_file=weights_file_name(key) if weights_url else None,
            classifier_prefix=classifier_prefix, compound_scaled=compound_scaled,
            published_gmacs_224=published_gmacs_224, cost_source=cost_source)
        return fn
    return decorate


def list_models() -> list[str]:
    """Every registered name :func:`create_model` accepts, then the aliases (``timm:<name>``
    accepts any timm model besides these)."""
    return sorted(_REGISTRY) + list(_ALIASES)


def is_timm(name: str) -> bool:
    return str(name).strip().lower().startswith(TIMM_PREFIX)


def model_info(name: str, resolution: int | None = None) -> ModelInfo:
    """The metadata of a model name (registered, ``timm:<name>``, or ``efficientnet`` with a
    ``resolution`` to pick its variant).

    >>> model_info("resnet152").family, model_info("resnet152").size_order
    ('resnet', 3.0)
    >>> model_info("efficientnet-b3").variant
    'b3'
    >>> model_info("efficientnet", 320).name
    'efficientnet-b3'
    """
    if is_timm(name):
        from trainer.models.timm_body import timm_info
        return timm_info(resolve_model_name(name, resolution or MIN_RESOLUTION))
    key = str(name).strip().lower().replace("_", "-")
    if key == "efficientnet" and resolution is None:
        # the alias without a resolution: the family, not a variant (no weights, no cost)
        return ModelInfo(name=key, family="efficientnet", source="efficientnet-pytorch",
                         compound_scaled=True)
    return _INFO[resolve_model_name(name, resolution or MIN_RESOLUTION)]


def builder(name: str) -> Builder:
    """The builder of a resolved, registered name."""
    return _REGISTRY[name]


def _efficientnet_for(resolution: int) -> str:
    # Nearest anchor resolution; a tie (e.g. 200 between 160 and 240) goes to the larger variant.
    anchor = min(EFFICIENTNET_BY_RESOLUTION, key=lambda r: (abs(r - resolution), -r))
    return EFFICIENTNET_BY_RESOLUTION[anchor]


def resolve_model_name(name: str, resolution: int) -> str:
    """The registered model ``name`` stands for at ``resolution``.

    ``efficientnet`` is the thesis's variant for the resolution: B0 at 160, B1 at 240, B3 at 320,
    B4 at 400, B5 at 480; any other resolution takes the variant of the nearest of those, ties
    going to the larger one (200 -> B1, 280 -> B3, 600 -> B5). Other names are returned as given
    (lower case, ``_`` read as ``-``) after checking that they are registered. ``timm:<name>``
    keeps timm's own spelling (lower case, underscores) and is checked against the installed timm.

    >>> resolve_model_name("efficientnet", 320)
    'efficientnet-b3'
    >>> resolve_model_name("efficientnet", 200)
    'efficientnet-b1'
    >>> resolve_model_name("ResNet50", 320)
    'resnet50'
    >>> resolve_model_name("timm:ConvNeXt_Atto", 320)
    'timm:convnext_atto'
    """
    if is_timm(name):
        from trainer.models.timm_body import check_timm_name
        return TIMM_PREFIX + check_timm_name(str(name).strip()[len(TIMM_PREFIX):])
    key = str(name).strip().lower().replace("_", "-")
    if key == "efficientnet":
        return _efficientnet_for(check_resolution(resolution))
    if key not in _REGISTRY:
        raise UnknownModelError(f"unknown model {name!r}; known models: {', '.join(list_models())}"
                                f", or {TIMM_PREFIX}<any timm model>")
    return key
