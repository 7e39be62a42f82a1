"""``timm:<name>``: any model of the installed timm as a body under the protocol head.

The body is timm's own feature map: ``timm.create_model(name, pretrained=False, num_classes=0,
global_pool='')`` returns the network without its classifier and without pooling, and calling it
gives what the model's final norm produces before pooling. Three output layouts occur:

* ``N x F x h x w`` (ConvNeXt, ResNet, EfficientNet, most CNNs): used as is;
* ``N x h x w x F`` (``output_fmt == 'NHWC'``, e.g. Swin): permuted to ``N x F x h x w``;
* ``N x tokens x F`` (ViT, DeiT, EVA, ...): the class/register tokens are dropped and the patch
  tokens reshaped onto their ``h x w`` patch grid. We reshape rather than pool the tokens so the
  head's concat(max, avg) pooling and Grad-CAM see a spatial map like every other body.

ViT-like models are built with ``dynamic_img_size=True`` where the model takes it: the position
embedding stays at its pretrained size and is interpolated to the input's patch grid at run time,
so pretrained files load strictly at every resolution (``img_size=resolution`` would change the
embedding's shape and break loading).

The body's ``state_dict`` carries timm's own key names (no wrapper prefix), so a timm state_dict
without its classifier is a body state_dict.
"""
from __future__ import annotations

import difflib
import functools

import torch
import torch.nn as nn

from trainer.models.info import TIMM_PREFIX, ModelInfo, UnknownModelError, check_resolution

__all__ = ["TimmBody", "check_timm_name", "build_timm_net", "timm_info", "timm_feature_shape"]


@functools.lru_cache(maxsize=None)
def _timm_names() -> tuple[str, ...]:
    import timm
    return tuple(timm.list_models())


def check_timm_name(name: str) -> str:
    """timm's spelling of ``name`` (lower case; a ``.tag`` suffix allowed), or an
    :class:`UnknownModelError` suggesting close names."""
    import timm

    key = str(name).strip().lower()
    if key and timm.is_model(key):
        return key
    arch = key.split(".")[0]
    close = difflib.get_close_matches(arch, _timm_names(), n=5, cutoff=0.6)
    stem = arch.split("_")[0]
    if stem and len(close) < 5:
        close += [n for n in timm.list_models(f"{stem}*") if n not in close][:5 - len(close)]
    hint = (f"; close names: {', '.join(TIMM_PREFIX + n for n in close)}" if close
            else "; timm.list_models('*pattern*') lists the names")
    raise UnknownModelError(f"unknown timm model {name!r}{hint}")


@functools.lru_cache(maxsize=None)
def _extra_kwargs(name: str) -> tuple[tuple[str, object], ...]:
    """``dynamic_img_size=True`` for the models that take it (probed once on the meta device:
    timm raises TypeError for an argument a model does not have)."""
    import timm
    with torch.device("meta"):
        try:
            timm.create_model(name, pretrained=False, num_classes=0, global_pool="",
                              dynamic_img_size=True)
        except TypeError:
            return ()
    return (("dynamic_img_size", True),)


def build_timm_net(name: str, pretrained: bool = False) -> nn.Module:
    """timm's network without classifier and pooling (``pretrained=True`` downloads: only the
    weights CLI does that)."""
    import timm
    return timm.create_model(name, pretrained=pretrained, num_classes=0, global_pool="",
                             **dict(_extra_kwargs(name)))


def _to_feature_map(net: nn.Module, out: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if out.ndim == 3:  # N x tokens x F
        tokens = out[:, int(getattr(net, "num_prefix_tokens", 0)):]
        patch_embed = getattr(net, "patch_embed", None)
        if patch_embed is not None and hasattr(patch_embed, "dynamic_feat_size"):
            h, w = patch_embed.dynamic_feat_size(size)
        else:
            h = w = int(round(tokens.shape[1] ** 0.5))
        if h * w != tokens.shape[1]:
            raise RuntimeError(f"{tokens.shape[1]} patch tokens do not form a {h} x {w} grid")
        return tokens.reshape(tokens.shape[0], h, w, tokens.shape[2]).permute(0, 3, 1, 2)
    if out.ndim == 4 and getattr(net, "output_fmt", "NCHW") == "NHWC":
        return out.permute(0, 3, 1, 2)
    if out.ndim != 4:
        raise RuntimeError(f"timm output of shape {tuple(out.shape)} is not a feature map")
    return out


class TimmBody(nn.Module):
    """A timm network (no classifier, no pooling) whose output is turned into N x F x h x w."""

    def __init__(self, net: nn.Module, num_features: int):
        super().__init__()
        self.net = net
        self.num_features = int(num_features)
        # state_dict keys as timm names them ("stem.0.weight", not "net.stem.0.weight"), so timm
        # files and this body's files are interchangeable
        self.register_state_dict_post_hook(_drop_net_prefix)
        self.register_load_state_dict_pre_hook(_add_net_prefix)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _to_feature_map(self.net, self.net(x), (x.shape[-2], x.shape[-1]))

    def layer_groups(self) -> list[list[nn.Parameter]]:
        """[stem + first half of the stages, the rest] for timm's ResNet and ConvNeXt (the same cut
        as fastai's torchvision ResNet split); one group for any other timm model."""
        from timm.models.convnext import ConvNeXt
        from timm.models.resnet import ResNet
        net = self.net
        if isinstance(net, ResNet):
            early = [net.conv1, net.bn1, net.layer1, net.layer2]
        elif isinstance(net, ConvNeXt) and len(net.stages) == 4:
            early = [net.stem, net.stages[0], net.stages[1]]
        else:
            return [list(self.parameters())]
        first = [p for m in early for p in m.parameters()]
        seen = {id(p) for p in first}
        return [first, [p for p in self.parameters() if id(p) not in seen]]


def _drop_net_prefix(module, state_dict, prefix, local_metadata) -> None:
    inner = prefix + "net."
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner):]] = state_dict.pop(key)


def _add_net_prefix(module, state_dict, prefix, local_metadata, strict, missing_keys,
                    unexpected_keys, error_msgs) -> None:
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(prefix + "net.")]:
        state_dict[prefix + "net." + key[len(prefix):]] = state_dict.pop(key)


def _meta_net(name: str) -> nn.Module:
    """The body network on the meta device, or a UserError when timm cannot build it as one."""
    from common.cli import UserError
    with torch.device("meta"):
        try:
            return build_timm_net(name)
        except (AssertionError, ValueError, RuntimeError) as exc:  # e.g. a head that must pool
            first = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise UserError(f"{TIMM_PREFIX}{name} cannot be built without its classifier and "
                            f"pooling (num_classes=0, global_pool=''): {first}") from None


@functools.lru_cache(maxsize=None)
def timm_feature_shape(name: str, resolution: int) -> tuple[int, int, int]:
    """(F, h, w) of the body's feature map, from a forward on the meta device (free). A model that
    cannot be a body (its head must pool) or cannot run at ``resolution`` (a fixed input size,
    too small for its strides) is a UserError."""
    from common.cli import UserError
    resolution = check_resolution(resolution)
    with torch.device("meta"):
        net = _meta_net(name).eval()
        try:
            out = _to_feature_map(net, net(torch.zeros(1, 3, resolution, resolution)),
                                  (resolution, resolution))
        except Exception as exc:  # timm's own assertion on input sizes, a vanishing map, ...
            first = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise UserError(f"{TIMM_PREFIX}{name} cannot run at {resolution} px: {first}") from None
    return int(out.shape[1]), int(out.shape[2]), int(out.shape[3])


@functools.lru_cache(maxsize=None)
def timm_info(model: str) -> ModelInfo:
    """ModelInfo of a resolved ``timm:<name>``: family = timm's module (``timm:convnext``), size
    order = the body's parameter count (counted on the meta device), weights = timm's default
    pretrained tag for the name."""
    import timm
    from timm.models import get_pretrained_cfg

    from trainer.models.weights_cache import weights_file_name

    name = model[len(TIMM_PREFIX):]
    arch = timm.models.get_arch_name(name)
    module = timm.models._registry._model_to_module.get(arch, arch)  # e.g. 'convnext'
    params = sum(p.numel() for p in _meta_net(name).parameters())
    cfg = get_pretrained_cfg(name)
    source = (cfg.hf_hub_id or cfg.url or None) if cfg is not None else None
    classifier = cfg.classifier if cfg is not None and isinstance(cfg.classifier, str) else ""
    return ModelInfo(name=model, family=TIMM_PREFIX + module, size_order=float(params),
                     variant=name,
                     source=f"timm {timm.__version__}",
                     weights_url=f"timm pretrained: {source}" if source else None,
                     weights_file=weights_file_name(model) if source else None,
                     classifier_prefix=classifier + "." if classifier else "")
