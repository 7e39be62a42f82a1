"""The models of PROTOCOL.md behind one registry and one factory, :func:`create_model`.

A registered model is a small builder function returning the *original* ImageNet network
(torchvision or efficientnet-pytorch, classifier included) with random weights. ``create_model``
loads the requested weights into that network, keeps everything up to the last feature map as
``.body`` and puts the protocol's head on top::

    body: images (N, 3, R, R) -> feature map (N, F, h, w)
    head: feature map -> concat(avgpool, maxpool) (N, 2F) -> BN -> Dropout(0.3) -> Linear(2F, 512)
          -> ReLU -> BN -> Dropout(0.6) -> Linear(512, outputs)  -> logits (N, outputs)

The body keeps the original module names, so ``model.body.state_dict()`` has the keys of the
published ImageNet state_dict minus its classifier, and ImageNet files load strictly.

``efficientnet`` is an alias: the variant the thesis matched to the resolution (see
:func:`resolve_model_name`). docs/models.md has the names, the parameter counts and the weights
cache.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.models as tvm
from efficientnet_pytorch import EfficientNet

from common.cli import UserError
from trainer import weights as _weights
from trainer.weights import MissingWeightsError, WeightsError  # noqa: F401  (re-exported)

__all__ = [
    "CXRNet", "CXRHead", "UnknownModelError", "MissingWeightsError", "WeightsError",
    "create_model", "list_models", "resolve_model_name", "register_model", "feature_map_size",
    "EFFICIENTNET_BY_RESOLUTION", "PROTOCOL_MODELS", "MIN_RESOLUTION",
]


class UnknownModelError(UserError):
    """A model name that is not registered."""


#: Smallest input every registered body turns into a feature map of at least 1 x 1 (DenseNet's
#: three 2x2 average-pool transitions are the limit).
MIN_RESOLUTION = 32

#: The thesis's EfficientNet variant per resolution (PROTOCOL.md).
EFFICIENTNET_BY_RESOLUTION = {160: "efficientnet-b0", 240: "efficientnet-b1", 320: "efficientnet-b3",
                              400: "efficientnet-b4", 480: "efficientnet-b5"}

#: The feature extractors PROTOCOL.md compares (the default download set of trainer.weights).
PROTOCOL_MODELS = ("resnet50", "resnet152", "densenet121", "densenet161",
                   *EFFICIENTNET_BY_RESOLUTION.values())

_ALIASES = ("efficientnet",)

# --- the registry ---------------------------------------------------------------------------
#: name -> builder(resolution) returning the original ImageNet network with random weights.
_REGISTRY: dict[str, Callable[[int], nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[[int], nn.Module]], Callable[[int], nn.Module]]:
    """Decorator: register ``fn(resolution) -> original network`` under ``name``.

    A second registration of a name is a programming error (two models would answer to it).
    """
    def decorate(fn: Callable[[int], nn.Module]) -> Callable[[int], nn.Module]:
        if name in _REGISTRY or name in _ALIASES:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn
    return decorate


@register_model("resnet18")
def resnet18(resolution: int) -> nn.Module:
    """ResNet-18 (torchvision), F=512: for quick runs."""
    return tvm.resnet18(weights=None)


@register_model("resnet34")
def resnet34(resolution: int) -> nn.Module:
    """ResNet-34 (torchvision), F=512: for quick runs."""
    return tvm.resnet34(weights=None)


@register_model("resnet50")
def resnet50(resolution: int) -> nn.Module:
    """ResNet-50 (torchvision), F=2048."""
    return tvm.resnet50(weights=None)


@register_model("resnet152")
def resnet152(resolution: int) -> nn.Module:
    """ResNet-152 (torchvision), F=2048."""
    return tvm.resnet152(weights=None)


@register_model("densenet121")
def densenet121(resolution: int) -> nn.Module:
    """DenseNet-121 (torchvision), F=1024."""
    return tvm.densenet121(weights=None)


@register_model("densenet161")
def densenet161(resolution: int) -> nn.Module:
    """DenseNet-161 (torchvision), F=2208."""
    return tvm.densenet161(weights=None)


@register_model("densenet169")
def densenet169(resolution: int) -> nn.Module:
    """DenseNet-169 (torchvision), F=1664."""
    return tvm.densenet169(weights=None)


class SmallCNN(nn.Module):
    """A plain 5-layer CNN (stride 32 like the ImageNet bodies, F=128) with no ImageNet weights.

    Why it exists: on a CPU a ResNet-18 trains at about 0.5 images/s at 480 px, too slow to run the
    five-resolution phantom science check or a demo on a laptop; this body is ~14x cheaper
    (0.6 GFLOPs forward at 480 px) and still sees full-resolution detail in its first, stride-2
    5x5 layer. It is not one of the thesis's models: use it for smoke runs and the phantom.
    """

    num_features = 128

    def __init__(self):
        super().__init__()

        def block(cin: int, cout: int, kernel: int = 3, stride: int = 1) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False),
                    nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(3, 16, 5, 2), nn.MaxPool2d(2),      # R/2 -> R/4
            *block(16, 32), nn.MaxPool2d(2),           # R/8
            *block(32, 64), nn.MaxPool2d(2),           # R/16
            *block(64, 128), nn.MaxPool2d(2),          # R/32
            *block(128, 128),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


#: Registered models that have no published ImageNet weights (weights='imagenet' is an error).
NO_IMAGENET_WEIGHTS = {"smallcnn"}


@register_model("smallcnn")
def smallcnn(resolution: int) -> nn.Module:
    """SmallCNN, F=128: CPU smoke runs and the phantom science check; no ImageNet weights."""
    return SmallCNN()


def _efficientnet(variant: str, resolution: int) -> nn.Module:
    # image_size sets the static "same" padding of every conv for this input size (TensorFlow
    # semantics); it changes no parameter, so ImageNet weights load at any resolution.
    # from_name builds the architecture only; from_pretrained would download.
    return EfficientNet.from_name(variant, image_size=resolution)


def _register_efficientnets() -> None:
    for b in range(8):
        name = f"efficientnet-b{b}"
        register_model(name)(functools.partial(_efficientnet, name))


_register_efficientnets()


def list_models() -> list[str]:
    """Every name :func:`create_model` accepts: the registered models, then the aliases."""
    return sorted(_REGISTRY) + list(_ALIASES)


def _efficientnet_for(resolution: int) -> str:
    # Nearest anchor resolution; a tie (e.g. 200 between 160 and 240) goes to the larger variant.
    anchor = min(EFFICIENTNET_BY_RESOLUTION, key=lambda r: (abs(r - resolution), -r))
    return EFFICIENTNET_BY_RESOLUTION[anchor]


def resolve_model_name(name: str, resolution: int) -> str:
    """The registered model ``name`` stands for at ``resolution``.

    ``efficientnet`` is the thesis's variant for the resolution: B0 at 160, B1 at 240, B3 at 320,
    B4 at 400, B5 at 480; any other resolution takes the variant of the nearest of those, ties
    going to the larger one (200 -> B1, 280 -> B3, 600 -> B5). Other names are returned as given
    (lower case, ``_`` read as ``-``) after checking that they are registered.

    >>> resolve_model_name("efficientnet", 320)
    'efficientnet-b3'
    >>> resolve_model_name("efficientnet", 200)
    'efficientnet-b1'
    >>> resolve_model_name("ResNet50", 320)
    'resnet50'
    """
    key = str(name).strip().lower().replace("_", "-")
    if key == "efficientnet":
        return _efficientnet_for(_check_resolution(resolution))
    if key not in _REGISTRY:
        raise UnknownModelError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    return key


def _check_resolution(resolution: int) -> int:
    try:
        value = int(resolution)
    except (TypeError, ValueError):
        raise UserError(f"resolution {resolution!r} is not an integer") from None
    if value != resolution or value < MIN_RESOLUTION:
        raise UserError(f"resolution {resolution!r}: need an integer >= {MIN_RESOLUTION} px")
    return value


# --- bodies: the original networks up to their last feature map ------------------------------
class ResNetBody(nn.Module):
    """torchvision ResNet up to ``layer4`` (no pooling, no ``fc``), original module names."""

    def __init__(self, net: tvm.ResNet):
        super().__init__()
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.num_features = net.fc.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class DenseNetBody(nn.Module):
    """torchvision DenseNet ``features`` (ending in the final ``norm5``) plus the ReLU that
    torchvision applies before its pooling; no ``classifier``."""

    def __init__(self, net: tvm.DenseNet):
        super().__init__()
        self.features = net.features
        self.num_features = net.classifier.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.features(x))


class EfficientNetBody(nn.Module):
    """efficientnet-pytorch's ``extract_features``: stem, MBConv blocks with their drop-connect
    schedule, ``_conv_head`` + ``_bn1`` + swish; no ``_avg_pooling``/``_dropout``/``_fc``."""

    def __init__(self, net: EfficientNet):
        super().__init__()
        self._conv_stem, self._bn0, self._blocks = net._conv_stem, net._bn0, net._blocks
        self._conv_head, self._bn1, self._swish = net._conv_head, net._bn1, net._swish
        self.drop_connect_rate = net._global_params.drop_connect_rate
        self.num_features = net._fc.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The same code as EfficientNet.extract_features (efficientnet-pytorch 0.7.1).
        x = self._swish(self._bn0(self._conv_stem(x)))
        for idx, block in enumerate(self._blocks):
            rate = self.drop_connect_rate
            if rate:
                rate *= float(idx) / len(self._blocks)  # deeper blocks drop more often
            x = block(x, drop_connect_rate=rate)
        return self._swish(self._bn1(self._conv_head(x)))


def _body_of(net: nn.Module) -> nn.Module:
    if isinstance(net, SmallCNN):
        return net  # already a body: it has no classifier to drop
    if isinstance(net, tvm.ResNet):
        return ResNetBody(net)
    if isinstance(net, tvm.DenseNet):
        return DenseNetBody(net)
    if isinstance(net, EfficientNet):
        return EfficientNetBody(net)
    raise TypeError(f"no body rule for {type(net).__name__}")


# --- the head and the whole network ----------------------------------------------------------
class CXRHead(nn.Module):
    """PROTOCOL.md's head: feature map (N, F, h, w) -> logits (N, outputs)."""

    def __init__(self, num_features: int, outputs: int, hidden: int = 512,
                 dropout: tuple[float, float] = (0.3, 0.6)):
        super().__init__()
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

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([self.avg_pool(features), self.max_pool(features)], dim=1)  # N, 2F, 1, 1
        return self.classifier(pooled)


def _is_batchnorm(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


class CXRNet(nn.Module):
    """A body (ImageNet feature extractor) and the protocol head. ``forward`` returns logits; the
    sigmoid belongs to the loss (BCE-with-logits) and to evaluation."""

    def __init__(self, body: nn.Module, num_features: int, outputs: int, name: str = "",
                 resolution: int = 0):
        super().__init__()
        self.body = body
        self.head = CXRHead(num_features, outputs)
        self.num_features = int(num_features)
        self.outputs = int(outputs)
        self.name = name
        self.resolution = int(resolution)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(images))  # N, 3, R, R -> N, F, h, w -> N, outputs

    def freeze_body(self) -> None:
        """Stop gradients to the body's weights, except its BatchNorm layers (PROTOCOL.md stage 1:
        "its BatchNorm layers still train"). Running statistics follow ``train()``/``eval()``."""
        for module in self.body.modules():
            trainable = _is_batchnorm(module)
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


def create_model(name: str, resolution: int, outputs: int, weights: str = "imagenet",
                 weights_dir: str | None = None) -> CXRNet:
    """Build a registered model with the protocol head.

    Args:
        name: one of :func:`list_models` (``efficientnet`` picks the variant for ``resolution``).
        resolution: the square input size in pixels (>= 32); EfficientNet's padding depends on it.
        outputs: logits per image (5 in multi-task mode, 1 for a single task).
        weights: ``"imagenet"`` (the body from the local cache, see trainer/weights.py),
            ``"none"`` (random body, on purpose), or a path/location of a state_dict file: a
            CXRNet state_dict (``body.*`` and ``head.*``, loaded whole), a trainer checkpoint
            holding one under ``"model"``, or a body state_dict in the ImageNet file format.
        weights_dir: the ImageNet cache (local path or ``s3://``); default ``$CXR_WEIGHTS_DIR`` or
            ``~/.cache/cxr-sweep/weights``.

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
        >>> create_model("efficientnet", 320, outputs=1, weights="none").name
        'efficientnet-b3'
        >>> create_model("vgg16", 320, outputs=1)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        trainer.models.UnknownModelError: unknown model 'vgg16'; known models: densenet121, ...
    """
    resolution = _check_resolution(resolution)
    resolved = resolve_model_name(name, resolution)
    if int(outputs) != outputs or outputs < 1:
        raise UserError(f"outputs {outputs!r}: need a positive integer")
    net = _REGISTRY[resolved](resolution)
    mode = _weights.weights_mode(weights)
    if mode == "imagenet":
        if resolved in NO_IMAGENET_WEIGHTS:
            raise _weights.WeightsError(f"{resolved} has no ImageNet weights: use weights='none' "
                                        "(--weights none) or a state_dict file")
        _weights.load_imagenet(net, resolved, weights_dir)
    body = _body_of(net)
    model = CXRNet(body, body.num_features, int(outputs), name=resolved, resolution=resolution)
    if mode == "file":
        _weights.load_weights_file(model, str(weights))
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
    resolution = _check_resolution(resolution)
    resolved = resolve_model_name(name, resolution)
    with torch.device("meta"):
        body = _body_of(_REGISTRY[resolved](resolution)).eval()
        out = body(torch.zeros(1, 3, resolution, resolution))
    return int(out.shape[-2]), int(out.shape[-1])
