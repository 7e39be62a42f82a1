"""The one throughput model: estimated training images/s of a (model, resolution) on one H100.

Both the GPU-hour estimate (orchestrator/estimate.py) and the GPU packing (orchestrator/packing.py)
use :func:`images_per_s`; measured figures (bench/gpu_check.py JSONs) replace it per group where
they exist (``packing.load_measurements``).

The model: a training step costs 3 x the forward FLOPs (forward + backward), and a family turns
FLOPs into images/s at its own efficiency:

    images/s = ANCHOR_FLOPS_PER_S x FAMILY_EFFICIENCY[family] / (3 x forward FLOPs per image)

* The anchor (published, docs/sweep.md): ResNet50 trains at ~2,470 images/s at 224 px on one A100
  with AMP (NVIDIA DeepLearningExamples); an H100 is ~1.8x an A100 on ResNet50 (MLPerf).
* ResNet: 1.0 (the anchor family). DenseNet: 0.51, so that DenseNet121 lands at 0.735 x ResNet50
  (6,400 vs 8,700 img/s at 160 px). EfficientNet: 0.133, so that B0 at 224 px trains ~1.4x
  faster than ResNet50 (depthwise convolutions and SiLU make it far slower than its FLOPs
  suggest; the H100 measurement of B5 at 480 px, 198 img/s, agrees within 12%). Any other model
  (smallcnn, timm:*): 0.5, a guess that says "unknown" in every report that uses it.
* Forward FLOPs: counted on CPU for the registry's models (``CPU_PROFILE``, at 128 px; cost scales
  with pixels), else counted for the model asked (``trainer.models.model_flops``).
"""
from __future__ import annotations

from common.schema import images_per_batch

#: ResNet50, one H100, bf16/AMP, 224 px: 2,470 img/s (A100) x 1.8.
ANCHOR_IMAGES_PER_S = 2470.0 * 1.8
ANCHOR_RESOLUTION = 224
FAMILY_EFFICIENCY = {"resnet": 1.0, "densenet": 0.51, "efficientnet": 0.133, "other": 0.5}
REFERENCE_RESOLUTION = 128


def protocol_images_per_batch() -> int:
    """The images in one protocol batch (TrainConfig.batch_studies CheXpert studies)."""
    from trainer.config import TrainConfig
    return images_per_batch(TrainConfig.batch_studies)


#: Measured on CPU (this repository's models, ``weights='none'``, 5 outputs) by
#: ``python -m orchestrator.packing --profile-cpu``: parameters, bytes autograd saves per image at
#: 128 px in fp32 (distinct storages), forward FLOPs per image at 128 px (torch FlopCounterMode),
#: aten operations one forward dispatches (~ kernels launched).
_CPU_PROFILE_ROWS = """
resnet18 11706432 30715136 1185420288 129
resnet34 21814592 54230528 2393379840 217
resnet50 25616960 79542016 2673349632 301
resnet152 60252736 178992896 7521965056 845
densenet121 8010112 58891072 1852314624 693
densenet161 28745408 137526880 5049881600 913
densenet169 14198656 80318784 2196509696 957
efficientnet-b0 5326972 41832304 254596096 468
efficientnet-b1 7832608 59127436 375301120 672
efficientnet-b2 9152002 64009420 434082176 672
efficientnet-b3 12278824 84963784 633360000 762
efficientnet-b4 19394376 119145680 988718784 942
efficientnet-b5 30449712 171371692 1548735104 1146
efficientnet-b6 43107800 227936500 2207690432 1326
efficientnet-b7 66422224 323253068 3395843072 1620
"""


def _load_profile_rows(text: str) -> dict[str, dict[str, float]]:
    out = {}
    for line in text.strip().splitlines():
        name, params, saved, flops, ops = line.split()
        out[name] = {"params": float(params), "saved_bytes_at128": float(saved),
                     "fwd_flops_at128": float(flops), "fwd_ops": float(ops)}
    return out


CPU_PROFILE: dict[str, dict[str, float]] = _load_profile_rows(_CPU_PROFILE_ROWS)
ANCHOR_FLOPS_PER_S = (ANCHOR_IMAGES_PER_S * 3 * CPU_PROFILE["resnet50"]["fwd_flops_at128"]
                      * (ANCHOR_RESOLUTION / REFERENCE_RESOLUTION) ** 2)

_counted: dict[tuple[str, int], float | None] = {}


def family(model: str) -> str:
    """The model's registered family where FAMILY_EFFICIENCY has a factor for it, else 'other'
    (timm families included: 'timm:resnet' is not torchvision's ResNet)."""
    from trainer.models import UnknownModelError, model_info
    try:
        fam = model_info(model).family
    except UnknownModelError:
        return "other"
    return fam if fam in FAMILY_EFFICIENCY else "other"


def counted_flops(model: str, resolution: int) -> float | None:
    """Forward FLOPs per image of a model without a profile row, counted once per process
    (``trainer.models.model_flops``; None when the model cannot be built)."""
    key = (model, int(resolution))
    if key not in _counted:
        from trainer.models import model_flops
        try:
            _counted[key] = float(model_flops(model, int(resolution)))
        except Exception:
            _counted[key] = None
    return _counted[key]


def forward_flops(model: str, resolution: int) -> tuple[float | None, str]:
    """(forward FLOPs per image, where they come from: 'table' or 'FLOPs estimate')."""
    p = CPU_PROFILE.get(model)
    if p is not None:
        return p["fwd_flops_at128"] * (resolution / REFERENCE_RESOLUTION) ** 2, "table"
    return counted_flops(model, resolution), "FLOPs estimate"


def images_per_s(model: str, resolution: int) -> float:
    """Estimated training images/s of ``model`` at ``resolution`` px on one H100 (bf16).
    ValueError for a model whose FLOPs cannot be counted (it cannot be built)."""
    flops, _ = forward_flops(model, resolution)
    if not flops:
        raise ValueError(f"no throughput estimate for {model!r}: its FLOPs cannot be counted")
    return ANCHOR_FLOPS_PER_S * FAMILY_EFFICIENCY[family(model)] / (3 * flops)


def source(model: str) -> str:
    """Where :func:`images_per_s` gets a model's figure: 'table' or 'FLOPs estimate'."""
    return "table" if model in CPU_PROFILE else "FLOPs estimate"


def profile_cpu(model: str, resolution: int = REFERENCE_RESOLUTION) -> dict[str, float]:
    """Parameters, fp32 bytes autograd saves per image, forward FLOPs per image and aten ops of
    one model at ``resolution``, measured on CPU with a batch of 2 (training mode)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import FlopCounterMode

    from trainer.models import create_model
    torch.manual_seed(0)
    net = create_model(model, resolution, outputs=5, weights="none").train()
    saved, seen = [0], set()

    def pack(t):
        key = (t.untyped_storage().data_ptr(), t.dtype)
        if key not in seen:   # count each storage once (views share one)
            seen.add(key)
            saved[0] += t.untyped_storage().nbytes()
        return t

    class CountOps(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            CountOps.ops += 1
            return func(*args, **(kwargs or {}))

    x = torch.randn(2, 3, resolution, resolution)
    with FlopCounterMode(display=False) as counter, CountOps():
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            net(x)
    return {"params": float(sum(p.numel() for p in net.parameters())),
            "saved_bytes_at128": saved[0] / 2, "fwd_flops_at128": counter.get_total_flops() / 2,
            "fwd_ops": float(CountOps.ops)}
