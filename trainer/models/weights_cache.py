"""ImageNet weights from a local (or shared, or ``s3://``) cache, never from the network at train time.

This module reads the cache; ``python -m trainer.weights`` (trainer/weights.py) fills it. It knows
no model: the registry passes each model's file name and classifier prefix in.

Cache layout, one file per model::

    WEIGHTS_DIR/<model>-imagenet.pth          the published ImageNet state_dict of the original
                                              network (classifier included), keys as the installed
                                              torchvision / efficientnet-pytorch module names them
    WEIGHTS_DIR/<model>-imagenet.pth.sha256   "<hex>  <file name>" (sha256sum format), checked on load

``WEIGHTS_DIR`` is ``--weights-dir`` / ``weights_dir=``, else ``$CXR_WEIGHTS_DIR``, else
``~/.cache/cxr-sweep/weights``; any location common.storage reads (a path, a shared
filesystem, ``s3://bucket/prefix``). ``python -m trainer.weights download`` fills it once on a
machine with internet access (the sources are each model's ``ModelInfo.weights_url``).

A missing file is a :class:`MissingWeightsError` naming the file and the download command: a run
asked for ImageNet weights never silently starts from random ones (``weights="none"`` does that,
on purpose). Every file is read with ``torch.load(..., weights_only=True)``.
"""
from __future__ import annotations

import hashlib
import io
import os

import torch
import torch.nn as nn

from common import storage
from common.cli import UserError

ENV_DIR = "CXR_WEIGHTS_DIR"
DOWNLOAD_COMMAND = "python -m trainer.weights download"


class WeightsError(UserError):
    """A weights file that cannot be used (corrupt, wrong architecture, bad argument)."""


class MissingWeightsError(WeightsError):
    """The ImageNet weights of a model are not in the cache."""


# --- names and locations ---------------------------------------------------------------------
def default_weights_dir() -> str:
    return os.environ.get(ENV_DIR) or os.path.join(os.path.expanduser("~"), ".cache", "cxr-sweep",
                                                   "weights")


def weights_file_name(model: str) -> str:
    """``resnet50-imagenet.pth``; ``timm:convnext_tiny`` -> ``timm-convnext_tiny-imagenet.pth``
    (no ':' in file names: it is not portable)."""
    return f"{model.replace(':', '-')}-imagenet.pth"


def weights_location(model: str, weights_dir: str | None = None) -> str:
    return storage.join(weights_dir or default_weights_dir(), weights_file_name(model))


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- loading ---------------------------------------------------------------------------------
def weights_mode(weights) -> str:
    """'imagenet', 'none' or 'file' for a ``weights`` argument; a path that does not exist is an
    error here, before any network is built."""
    if weights is None:
        raise WeightsError("weights: give 'imagenet', 'none' or a path to a state_dict file")
    text = os.fspath(weights) if isinstance(weights, os.PathLike) else str(weights)
    if text.lower() in ("imagenet", "none"):
        return text.lower()
    if not storage.exists(text):
        raise WeightsError(f"weights file {storage.display(text)} not found (weights must be "
                           "'imagenet', 'none' or a path to a state_dict file)")
    return "file"


def _read_state(location: str, what: str) -> dict:
    try:
        data = storage.read_bytes(location)
    except FileNotFoundError:
        raise WeightsError(f"{what} {storage.display(location)} not found") from None
    expected = expected_sha256(location)
    if expected is not None:
        if sha256_hex(data) != expected:
            raise WeightsError(f"{what} {storage.display(location)} does not match its sha256 "
                               f"({storage.display(sidecar_location(location))}): delete it and "
                               "fetch it again")
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated file, a pickle with code in it, not a torch file at all
        raise WeightsError(f"{what} {storage.display(location)} cannot be read safely "
                           f"(torch.load weights_only=True): {str(exc).splitlines()[0]}") from None
    if not isinstance(obj, dict):
        raise WeightsError(f"{what} {storage.display(location)} holds a {type(obj).__name__}, "
                           "not a state_dict")
    return obj


def expected_sha256(location: str) -> str | None:
    """The hex digest recorded next to a cache file, or None when it has no ``.sha256`` file."""
    sidecar = sidecar_location(location)
    if not storage.exists(sidecar):
        return None
    return storage.read_bytes(sidecar).decode().split()[0].strip().lower()


def sidecar_location(location: str) -> str:
    # s3://bucket/dir/file.pth?query -> s3://bucket/dir/file.pth.sha256?query
    if not storage.is_remote(location):
        return location + ".sha256"
    base, sep, query = location.partition("?")
    return base + ".sha256" + sep + query


def load_strict(module: nn.Module, state: dict, ignore_prefix: str, source: str) -> None:
    """Load ``state`` into ``module``: every key but those under ``ignore_prefix`` must be present
    on both sides with the same shape. An empty ``ignore_prefix`` ignores nothing."""
    ignore_prefix = ignore_prefix or "\0"   # no key starts with NUL
    state = {k: v for k, v in state.items() if not k.startswith(ignore_prefix)}
    expected = {k for k in module.state_dict() if not k.startswith(ignore_prefix)}
    # Files saved before PyTorch 0.4.1 (torchvision's DenseNets, efficientnet-pytorch's ports)
    # have no BatchNorm step counters; BatchNorm fills them in itself and never reads them when
    # its momentum is set, so their absence is not a mismatch.
    missing = sorted(k for k in expected - set(state) if not k.endswith(".num_batches_tracked"))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
        raise WeightsError(f"{source} does not fit this network: {'; '.join(parts)}")
    try:
        module.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        detail = next((ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln),
                      str(exc).splitlines()[0])
        raise WeightsError(f"{source} does not fit this network: {detail}") from None


def load_imagenet(net: nn.Module, model: str, weights_dir: str | None,
                  classifier_prefix: str) -> None:
    """Load ``<model>-imagenet.pth`` from the cache into the original network ``net``
    (strict on every key but the classifier's, which the body drops anyway)."""
    weights_dir = weights_dir or default_weights_dir()
    location = weights_location(model, weights_dir)
    if not storage.exists(location):
        raise MissingWeightsError(
            f"no ImageNet weights for {model}: {storage.display(location)} does not exist; fetch "
            f"them once where there is internet: {DOWNLOAD_COMMAND} --models {model} "
            f"--dir {storage.display(weights_dir)} (or set weights='none' for a random body)")
    state = _read_state(location, "ImageNet weights")
    load_strict(net, state, classifier_prefix, storage.display(location))


def _strip_wrappers(state: dict) -> dict:
    # DataParallel ("module.") and torch.compile ("_orig_mod.") prefix every key.
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def load_weights_file(model: nn.Module, location: str, classifier_prefix: str) -> None:
    """Load a weights file given as ``weights=<path>`` into a CXRNet.

    Accepted: a CXRNet state_dict (``body.*`` and ``head.*`` keys; loaded whole and strictly, so
    ``outputs`` must match), a trainer checkpoint with such a state_dict under ``"model"``, or a
    body state_dict (``model.body.state_dict()``, with or without the ``body.`` prefix, or a
    cache file ``<model>-imagenet.pth``; the classifier keys are ignored, the head stays fresh).
    """
    state = _read_state(location, "weights file")
    if isinstance(state.get("model"), dict):
        state = state["model"]
    state = _strip_wrappers(state)
    source = storage.display(location)
    # a CXRNet state_dict has only body.* and head.* keys; a body's own keys may start with
    # "head." too (timm's ConvNeXt keeps its final norm in "head.norm")
    prefixes = {k.split(".", 1)[0] for k in state}
    if prefixes == {"body", "head"}:
        load_strict(model, state, "", source)
        return
    if state and all(k.startswith("body.") for k in state):
        state = {k[len("body."):]: v for k, v in state.items()}
    load_strict(model.body, state, classifier_prefix, source)
