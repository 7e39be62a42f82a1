"""What the project knows about a model besides its architecture (:class:`ModelInfo`), and the
name and resolution rules every model module shares. No imports of the registry or of timm, so
``registry`` and ``timm_body`` both build on it without importing each other in a circle."""
from __future__ import annotations

from dataclasses import dataclass

from common.cli import UserError


class UnknownModelError(UserError):
    """A model name that is not registered (or not a timm model after ``timm:``)."""


#: Smallest input every registered body turns into a feature map of at least 1 x 1 (DenseNet's
#: three 2x2 average-pool transitions are the limit).
MIN_RESOLUTION = 32

#: ``timm:<name>`` names any model of the installed timm (trainer/models/timm_body.py).
TIMM_PREFIX = "timm:"

@dataclass(frozen=True)
class ModelInfo:
    """What the project knows about a model besides its architecture.

    ``size_order`` sorts the members of one family from smallest to largest (the model-scaling
    comparisons pair them); for the registered families it is the variant's rank, for a timm model
    its body's parameter count (timm families have no registered ranks). ``published_gmacs_224``
    is a published forward cost (multiply-accumulates per image at 224 px, ``cost_source`` says
    whose); models without one are costed by counting (trainer.models.cost).
    """

    name: str
    family: str                          # 'resnet', 'densenet', 'efficientnet', 'timm:convnext', ...
    size_order: float = 0.0
    variant: str = ""                    # the name within the family: '152', 'b3', 'convnext_atto'
    source: str = ""                     # the package that defines the architecture
    weights_url: str | None = None       # where `trainer.weights download` fetches ImageNet weights
    weights_file: str | None = None      # its file name in the weights cache (None: no weights)
    classifier_prefix: str = ""          # state_dict prefix of the original classifier (dropped)
    compound_scaled: bool = False        # variants are matched to the resolution (EfficientNet)
    published_gmacs_224: float | None = None
    cost_source: str = ""

    @property
    def has_imagenet_weights(self) -> bool:
        return self.weights_file is not None


def check_resolution(resolution: int) -> int:
    try:
        value = int(resolution)
    except (TypeError, ValueError):
        raise UserError(f"resolution {resolution!r} is not an integer") from None
    if value != resolution or value < MIN_RESOLUTION:
        raise UserError(f"resolution {resolution!r}: need an integer >= {MIN_RESOLUTION} px")
    return value
