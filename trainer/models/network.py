"""The protocol's network, :class:`CXRNet` = a body (ImageNet feature extractor) + :class:`CXRHead`,
and the one factory, :func:`create_model`::

    body: images (N, 3, R, R) -> feature map (N, F, h, w)
    head: feature map -> concat(maxpool, avgpool) (N, 2F) -> BN -> Dropout(0.3) -> Linear(2F, 512)
          -> ReLU -> BN -> Dropout(0.6) -> Linear(512, outputs)  -> logits (N, outputs)

The head is fastai's ``create_head(F, outputs, lin_ftrs=[512], ps=0.6)`` initialised as
``create_vision_model`` does (Kaiming-normal linear layers, BatchNorm1d bias 1e-3), which is what
the thesis ran; ``pool_order``, ``head_bn_bias`` and ``densenet_final_relu`` bring back the
literal reading of its text. docs/models.md has the names, the parameter counts and the cache.
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn

from common.cli import UserError
from trainer.models import weights_cache
from trainer.models.builtin import NO_IMAGENET_WEIGHTS, body_of
from trainer.models.registry import (builder, check_resolution, is_timm, model_info,
                                     resolve_model_name)

__all__ = ["CXRHead", "CXRNet", "create_model", "feature_map_size", "POOL_ORDERS", "NORM_TYPES"]

#: The head's pooling orders: fastai's ``AdaptiveConcatPool2d`` puts max first.
POOL_ORDERS = ("max,avg", "avg,max")

#: Layers a frozen body keeps training: fastai's ``norm_types`` (``train_bn=True`` keeps every
#: norm layer's weight and bias trainable while the rest of the body is frozen).
NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.LayerNorm)


class CXRHead(nn.Module):
    """The protocol's head: feature map (N, F, h, w) -> logits (N, outputs).

    ``pool_order``: ``"max,avg"`` (fastai's order) or ``"avg,max"``; the two differ only in which
    half of the BatchNorm's input each pooling fills. ``bn_bias``: the initial bias of both
    BatchNorm1d layers (fastai's ``BatchNorm`` fills 1e-3).
    """

    def __init__(self, num_features: int, outputs: int, hidden: int = 512,
                 dropout: tuple[float, float] = (0.3, 0.6), pool_order: str = "max,avg",
                 bn_bias: float = 1e-3):
        super().__init__()
        if pool_order not in POOL_ORDERS:
            raise UserError(f"pool_order {pool_order!r}: need one of {', '.join(POOL_ORDERS)}")
        self.pool_order = pool_order
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.max_pool = nn.AdaptiveMaxPool2d(1)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.BatchNorm1d(2 * num_features),
            nn.Dropout(dropout[0]),
            nn.Linear(2 * num_features, hidden, bias=False),
            nn.ReLU(inplace=True),
            nn.BatchNorm1d(hidden),
            nn.Dropout(dropout[1]),
            nn.Linear(hidden, outputs, bias=False),
        )
        for m in self.classifier:
            if isinstance(m, nn.Linear):
                # Kaiming (He) normal for layers followed by a ReLU, as fastai's head does; the
                # draw comes from torch's global RNG, so torch.manual_seed fixes it.
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm1d):
                nn.init.constant_(m.bias, float(bn_bias))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        pools = (self.max_pool(features), self.avg_pool(features))
        if self.pool_order == "avg,max":
            pools = pools[::-1]
        return self.classifier(torch.cat(pools, dim=1))  # N, 2F, 1, 1 -> N, outputs


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, NORM_TYPES)


class CXRNet(nn.Module):
    """A body (ImageNet feature extractor) and the protocol head. ``forward`` returns logits; the
    sigmoid belongs to the loss (BCE-with-logits) and to evaluation."""

    def __init__(self, body: nn.Module, num_features: int, outputs: int, name: str = "",
                 resolution: int = 0, pool_order: str = "max,avg", head_bn_bias: float = 1e-3):
        super().__init__()
        self.body = body
        self.head = CXRHead(num_features, outputs, pool_order=pool_order, bn_bias=head_bn_bias)
        self.num_features = int(num_features)
        self.outputs = int(outputs)
        self.name = name
        self.resolution = int(resolution)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(images))  # N, 3, R, R -> N, F, h, w -> N, outputs

    def freeze_body(self) -> None:
        """Stop gradients to the body's weights, except its norm layers (the protocol's stage 1:
        "its BatchNorm layers still train"; fastai keeps every norm type trainable, LayerNorm
        included). Running statistics follow ``train()``/``eval()``."""
        for module in self.body.modules():
            trainable = _is_norm(module)
            for p in module.parameters(recurse=False):
                p.requires_grad_(trainable)

    def unfreeze_body(self) -> None:
        for p in self.body.parameters():
            p.requires_grad_(True)

    def body_parameters(self) -> list[nn.Parameter]:
        """All body parameters, frozen or not (one optimizer group)."""
        return list(self.body.parameters())

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.head.parameters())

    def layer_groups(self) -> list[list[nn.Parameter]]:
        """Parameter groups from input to head for discriminative learning rates, as fastai
        splits the same network: ResNet [stem + layer1 + layer2, layer3 + layer4, head]; DenseNet
        [features to denseblock2, transition2 .. norm5, head]; timm ResNet/ConvNeXt likewise in
        halves of their stages; anything else [body, head]. Every parameter is in exactly one
        group, frozen or not."""
        split = getattr(self.body, "layer_groups", None)
        body = split() if callable(split) else [self.body_parameters()]
        return [*body, self.head_parameters()]


def create_model(name: str, resolution: int, outputs: int, weights: str = "imagenet",
                 weights_dir: str | None = None, *, pool_order: str = "max,avg",
                 head_bn_bias: float = 1e-3, densenet_final_relu: bool = False) -> CXRNet:
    """Build a registered model (or ``timm:<name>``) with the protocol head.

    Args:
        name: one of :func:`list_models` (``efficientnet`` picks the variant for ``resolution``),
            or ``timm:<name>`` for any timm model.
        resolution: the square input size in pixels (>= 32); EfficientNet's padding depends on it.
        outputs: logits per image (5 in multi-task mode, 1 for a single task).
        weights: ``"imagenet"`` (the body from the local cache, see trainer/models/weights_cache.py),
            ``"none"`` (random body, on purpose), or a path/location of a state_dict file: a
            CXRNet state_dict (``body.*`` and ``head.*``, loaded whole), a trainer checkpoint
            holding one under ``"model"``, or a body state_dict in the ImageNet file format.
        weights_dir: the ImageNet cache (local path or ``s3://``); default ``$CXR_WEIGHTS_DIR`` or
            ``~/.cache/cxr-sweep/weights``.
        pool_order: ``"max,avg"`` (fastai's concat pooling, default) or ``"avg,max"``.
        head_bn_bias: initial bias of the head's BatchNorm1d layers (fastai: 1e-3; 0 = torch's).
        densenet_final_relu: end a DenseNet body with torchvision's ReLU after ``norm5``
            (default False: fastai's body ends at ``norm5``).

    The head's initialisation draws from torch's global RNG: call ``torch.manual_seed(seed)``
    first for a reproducible model.

    Examples:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> model = create_model("resnet18", 64, outputs=5, weights="none")
        >>> model(torch.zeros(2, 3, 64, 64)).shape
        torch.Size([2, 5])
        >>> model.body(torch.zeros(2, 3, 64, 64)).shape     # the feature map Grad-CAM uses
        torch.Size([2, 512, 2, 2])
        >>> [len(group) for group in model.layer_groups()]  # stem..layer2, layer3..4, head
        [30, 30, 6]
        >>> create_model("efficientnet", 320, outputs=1, weights="none").name
        'efficientnet-b3'
        >>> create_model("vgg16", 320, outputs=1)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        trainer.models.info.UnknownModelError: unknown model 'vgg16'; known models: densenet121, ...
    """
    resolution = check_resolution(resolution)
    resolved = resolve_model_name(name, resolution)
    if int(outputs) != outputs or outputs < 1:
        raise UserError(f"outputs {outputs!r}: need a positive integer")
    info = model_info(resolved)
    mode = weights_cache.weights_mode(weights)
    if is_timm(resolved):
        from trainer.models.timm_body import TimmBody, build_timm_net, timm_feature_shape
        num_features = timm_feature_shape(resolved[len("timm:"):], resolution)[0]
        net = build_timm_net(resolved[len("timm:"):])
    else:
        net = builder(resolved)(resolution)
    if mode == "imagenet":
        if resolved in NO_IMAGENET_WEIGHTS or not info.has_imagenet_weights:
            raise weights_cache.WeightsError(
                f"{resolved} has no ImageNet weights: use weights='none' (--weights none) or a "
                "state_dict file")
        weights_cache.load_imagenet(net, resolved, weights_dir, info.classifier_prefix)
    if is_timm(resolved):
        body = TimmBody(net, num_features)
    else:
        body = body_of(net, densenet_final_relu=densenet_final_relu)
    model = CXRNet(body, body.num_features, int(outputs), name=resolved, resolution=resolution,
                   pool_order=pool_order, head_bn_bias=head_bn_bias)
    if mode == "file":
        weights_cache.load_weights_file(model, str(weights), info.classifier_prefix)
    return model


@functools.lru_cache(maxsize=None)
def feature_map_size(name: str, resolution: int) -> tuple[int, int]:
    """(h, w) of the body's feature map for a square input (what Grad-CAM upsamples from).

    Computed by a forward pass on the ``meta`` device: exact for every body, and free (no memory,
    no arithmetic).

    >>> feature_map_size("resnet50", 320)
    (10, 10)
    >>> feature_map_size("efficientnet", 480)
    (15, 15)
    """
    resolution = check_resolution(resolution)
    resolved = resolve_model_name(name, resolution)
    if is_timm(resolved):
        from trainer.models.timm_body import timm_feature_shape
        return timm_feature_shape(resolved[len("timm:"):], resolution)[1:]
    with torch.device("meta"):
        body = body_of(builder(resolved)(resolution)).eval()
        out = body(torch.zeros(1, 3, resolution, resolution))
    return int(out.shape[-2]), int(out.shape[-1])
