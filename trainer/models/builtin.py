"""The registered models: the thesis's torchvision and efficientnet-pytorch networks, smaller
relatives for quick runs, and ``smallcnn``; their bodies and their fastai layer groups.

A builder returns the *original* ImageNet network (classifier included) with random weights;
:func:`body_of` keeps everything up to the last feature map under the original module names, so
``body.state_dict()`` has the keys of the published ImageNet state_dict minus its classifier.
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.models as tvm
from efficientnet_pytorch import EfficientNet

from trainer.models.registry import register_model

__all__ = ["SmallCNN", "ResNetBody", "DenseNetBody", "EfficientNetBody", "body_of",
           "NO_IMAGENET_WEIGHTS"]

#: torchvision's weights enum member for every torchvision model: what ``pretrained=True`` gave in
#: 2021, which the thesis used (the newer ``DEFAULT`` of ResNet-50/152 is V2).
TORCHVISION_WEIGHTS = "IMAGENET1K_V1"

#: Published forward cost, giga multiply-accumulates per image at 224 px.
_TORCHVISION_GMACS = {"resnet18": 1.82, "resnet34": 3.67, "resnet50": 4.11, "resnet152": 11.56,
                      "densenet121": 2.87, "densenet161": 7.73, "densenet169": 3.36}
_TORCHVISION_COST = "torchvision model docs (GFLOPS column, 224 px)"
#: EfficientNet paper (Tan and Le 2019, Table 2): (GMACs at the variant's native resolution,
#: native resolution); rescaled to 224 px by pixel count.
_EFFICIENTNET_GMACS = {0: (0.39, 224), 1: (0.70, 240), 2: (1.0, 260), 3: (1.8, 300),
                       4: (4.2, 380), 5: (9.9, 456), 6: (19.0, 528), 7: (37.0, 600)}


def _torchvision_url(name: str) -> str:
    return getattr(tvm.get_model_weights(name), TORCHVISION_WEIGHTS).url


def _register_torchvision(name: str, family: str, size_order: int, classifier: str,
                          doc: str) -> None:
    def build(resolution: int) -> nn.Module:
        return getattr(tvm, name)(weights=None)
    build.__doc__ = doc
    register_model(name, family=family, size_order=size_order, source="torchvision",
                   weights_url=_torchvision_url(name), classifier_prefix=classifier,
                   published_gmacs_224=_TORCHVISION_GMACS[name],
                   cost_source=_TORCHVISION_COST)(build)


for _rank, (_name, _f) in enumerate((("resnet18", 512), ("resnet34", 512), ("resnet50", 2048),
                                     ("resnet152", 2048))):
    _register_torchvision(_name, "resnet", _rank, "fc.", f"{_name} (torchvision), F={_f}.")
# size order by parameter count: 121 (8.0 M) < 169 (14.1 M) < 161 (28.7 M)
for _rank, (_name, _f) in enumerate((("densenet121", 1024), ("densenet169", 1664),
                                     ("densenet161", 2208))):
    _register_torchvision(_name, "densenet", _rank, "classifier.", f"{_name} (torchvision), F={_f}.")


def _efficientnet(variant: str, resolution: int) -> nn.Module:
    # image_size sets the static "same" padding of every conv for this input size (TensorFlow
    # semantics); it changes no parameter, so ImageNet weights load at any resolution.
    # from_name builds the architecture only; from_pretrained would download.
    return EfficientNet.from_name(variant, image_size=resolution)


def _register_efficientnets() -> None:
    from efficientnet_pytorch.utils import url_map
    for b, (gmacs, native) in _EFFICIENTNET_GMACS.items():
        name = f"efficientnet-b{b}"
        register_model(name, family="efficientnet", size_order=b, source="efficientnet-pytorch",
                       weights_url=url_map[name], classifier_prefix="_fc.", compound_scaled=True,
                       published_gmacs_224=gmacs * (224 / native) ** 2,
                       cost_source=f"EfficientNet paper ({native} px, scaled to 224 px)")(
            functools.partial(_efficientnet, name))


_register_efficientnets()


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


@register_model("smallcnn", family="smallcnn", source="cxr-sweep")
def smallcnn(resolution: int) -> nn.Module:
    """SmallCNN, F=128: CPU smoke runs and the phantom science check; no ImageNet weights."""
    return SmallCNN()


# --- bodies: the original networks up to their last feature map ------------------------------
def _params(*modules: nn.Module) -> list[nn.Parameter]:
    return [p for m in modules for p in m.parameters()]


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

    def layer_groups(self) -> list[list[nn.Parameter]]:
        """fastai's ``_resnet_split``: stem + layer1 + layer2, then layer3 + layer4."""
        return [_params(self.conv1, self.bn1, self.layer1, self.layer2),
                _params(self.layer3, self.layer4)]


class DenseNetBody(nn.Module):
    """torchvision DenseNet ``features`` (ending in the final ``norm5``); no ``classifier``.

    ``final_relu=False`` ends at ``norm5`` as fastai's DenseNet body does (``create_body`` cuts the
    classifier, and torchvision's ReLU lives in ``forward``, so fastai never applies it);
    ``final_relu=True`` adds the ReLU torchvision's own forward applies before pooling.
    """

    def __init__(self, net: tvm.DenseNet, final_relu: bool = False):
        super().__init__()
        self.features = net.features
        self.num_features = net.classifier.in_features
        self.final_relu = bool(final_relu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return F.relu(x) if self.final_relu else x

    def layer_groups(self) -> list[list[nn.Parameter]]:
        """fastai's ``_densenet_split``: features up to and including ``denseblock2``, then
        ``transition2`` .. ``norm5``."""
        children = list(self.features.children())
        return [_params(*children[:7]), _params(*children[7:])]


class EfficientNetBody(nn.Module):
    """efficientnet-pytorch's ``extract_features``: stem, MBConv blocks with their drop-connect
    schedule, ``_conv_head`` + ``_bn1`` + swish; no ``_avg_pooling``/``_dropout``/``_fc``.
    One layer group: fastai has no split for this package and uses ``default_split``."""

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


def body_of(net: nn.Module, densenet_final_relu: bool = False) -> nn.Module:
    """The body of an original network; a builder may also return a body itself (a module with
    an integer ``num_features`` whose forward gives the feature map, like SmallCNN)."""
    if isinstance(net, tvm.ResNet):
        return ResNetBody(net)
    if isinstance(net, tvm.DenseNet):
        return DenseNetBody(net, final_relu=densenet_final_relu)
    if isinstance(net, EfficientNet):
        return EfficientNetBody(net)
    if isinstance(getattr(net, "num_features", None), int):
        return net
    raise TypeError(f"no body rule for {type(net).__name__}: return a module with an integer "
                    "num_features whose forward gives the feature map, or add a rule here")
