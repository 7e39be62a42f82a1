"""The models of the thesis protocol (and any timm model) behind one registry and one factory.

::

    from trainer.models import create_model, list_models, model_info, model_flops
    model = create_model("resnet50", 320, outputs=5)                  # ImageNet body from the cache
    model = create_model("timm:convnext_tiny", 320, 5, weights="none")
    model.layer_groups()                                              # fastai's split, input -> head

Modules: ``registry`` (names, ModelInfo, aliases), ``builtin`` (the registered torchvision /
efficientnet-pytorch models and their bodies), ``timm_body`` (``timm:<name>``), ``network`` (the
head, CXRNet, create_model), ``weights_cache`` (reading the ImageNet cache), ``cost`` (FLOPs).
docs/models.md shows how to add a model.
"""
from trainer.models.builtin import NO_IMAGENET_WEIGHTS, SmallCNN  # importing it registers them
from trainer.models.cost import COUNTED, ForwardCost, forward_cost, model_flops
from trainer.models.network import (NORM_TYPES, POOL_ORDERS, CXRHead, CXRNet, create_model,
                                    feature_map_size)
from trainer.models.registry import (EFFICIENTNET_BY_RESOLUTION, MIN_RESOLUTION, PROTOCOL_MODELS,
                                     TIMM_PREFIX, ModelInfo, UnknownModelError, is_timm,
                                     list_models, model_info, register_model, resolve_model_name)
from trainer.models.weights_cache import MissingWeightsError, WeightsError

__all__ = [
    "CXRNet", "CXRHead", "SmallCNN", "ModelInfo", "ForwardCost", "UnknownModelError",
    "MissingWeightsError", "WeightsError", "create_model", "list_models", "resolve_model_name",
    "register_model", "model_info", "is_timm", "feature_map_size", "model_flops", "forward_cost",
    "EFFICIENTNET_BY_RESOLUTION", "PROTOCOL_MODELS", "MIN_RESOLUTION", "NO_IMAGENET_WEIGHTS",
    "TIMM_PREFIX", "POOL_ORDERS", "NORM_TYPES", "COUNTED",
]
