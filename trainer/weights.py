"""ImageNet weights from a local (or shared, or ``s3://``) cache, never from the network at train time.

Cache layout, one file per model::

    WEIGHTS_DIR/<model>-imagenet.pth          the published ImageNet state_dict of the original
                                              network (classifier included), keys as the installed
                                              torchvision / efficientnet-pytorch module names them
    WEIGHTS_DIR/<model>-imagenet.pth.sha256   "<hex>  <file name>" (sha256sum format), checked on load

``WEIGHTS_DIR`` is ``--weights-dir`` / ``weights_dir=``, else ``$CXR_WEIGHTS_DIR``, else
``~/.cache/cxr-sweep/weights``; any location common.storage reads (a path, a shared
filesystem, ``s3://bucket/prefix``). ``python -m trainer.weights download`` fills it once on a
machine with internet access. Sources: torchvision's ``IMAGENET1K_V1`` weights (those
``pretrained=True`` gave, which the thesis used) and efficientnet-pytorch's ``url_map``.

A missing file is a :class:`MissingWeightsError` naming the file and the download command: a run
asked for ImageNet weights never silently starts from random ones (``weights="none"`` does that,
on purpose). Every file is read with ``torch.load(..., weights_only=True)``.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import os
import re
import sys
import tempfile
from typing import Callable, Iterable, Sequence

import torch
import torch.nn as nn

from common import storage
from common.cli import EXIT_FAILURE, HelpFormatter, UserError, run_cli

ENV_DIR = "CXR_WEIGHTS_DIR"
DOWNLOAD_COMMAND = "python -m trainer.weights download"

#: torchvision's weights enum member used for every torchvision model.
TORCHVISION_WEIGHTS = "IMAGENET1K_V1"


class WeightsError(UserError):
    """A weights file that cannot be used (corrupt, wrong architecture, bad argument)."""


class MissingWeightsError(WeightsError):
    """The ImageNet weights of a model are not in the cache."""


class DownloadError(RuntimeError):
    """A source could not be fetched (offline, HTTP error, hash mismatch)."""


# --- names and locations ---------------------------------------------------------------------
def default_weights_dir() -> str:
    return os.environ.get(ENV_DIR) or os.path.join(os.path.expanduser("~"), ".cache", "cxr-sweep",
                                                   "weights")


def weights_file_name(model: str) -> str:
    return f"{model}-imagenet.pth"


def weights_location(model: str, weights_dir: str | None = None) -> str:
    return storage.join(weights_dir or default_weights_dir(), weights_file_name(model))


def classifier_prefix(model: str) -> str:
    """State_dict prefix of the ImageNet classifier the body drops."""
    if model.startswith("resnet"):
        return "fc."
    if model.startswith("densenet"):
        return "classifier."
    if model.startswith("efficientnet"):
        return "_fc."
    raise ValueError(f"no classifier rule for {model!r}")


def source_url(model: str) -> str:
    """Where ``download`` fetches the model's published ImageNet state_dict."""
    if model.startswith("efficientnet"):
        from efficientnet_pytorch.utils import url_map
        return url_map[model]
    import torchvision.models as tvm
    return getattr(tvm.get_model_weights(model), TORCHVISION_WEIGHTS).url


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
    sidecar = _sidecar(location)
    if storage.exists(sidecar):
        expected = storage.read_bytes(sidecar).decode().split()[0].strip().lower()
        if sha256_hex(data) != expected:
            raise WeightsError(f"{what} {storage.display(location)} does not match its sha256 "
                               f"({storage.display(sidecar)}): delete it and fetch it again")
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated file, a pickle with code in it, not a torch file at all
        raise WeightsError(f"{what} {storage.display(location)} cannot be read safely "
                           f"(torch.load weights_only=True): {str(exc).splitlines()[0]}") from None
    if not isinstance(obj, dict):
        raise WeightsError(f"{what} {storage.display(location)} holds a {type(obj).__name__}, "
                           "not a state_dict")
    return obj


def _sidecar(location: str) -> str:
    # s3://bucket/dir/file.pth?query -> s3://bucket/dir/file.pth.sha256?query
    if not storage.is_remote(location):
        return location + ".sha256"
    base, sep, query = location.partition("?")
    return base + ".sha256" + sep + query


def _load_strict(module: nn.Module, state: dict, ignore_prefix: str, source: str) -> None:
    """Load ``state`` into ``module``: every key but those under ``ignore_prefix`` must be present
    on both sides with the same shape."""
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


def load_imagenet(net: nn.Module, model: str, weights_dir: str | None = None) -> None:
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
    _load_strict(net, state, classifier_prefix(model), storage.display(location))


def _strip_wrappers(state: dict) -> dict:
    # DataParallel ("module.") and torch.compile ("_orig_mod.") prefix every key.
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def load_weights_file(model: nn.Module, location: str) -> None:
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
    if any(k.startswith("head.") for k in state):
        _load_strict(model, state, "\0", source)  # "\0": no key is ignored
        return
    if state and all(k.startswith("body.") for k in state):
        state = {k[len("body."):]: v for k, v in state.items()}
    _load_strict(model.body, state, classifier_prefix(model.name), source)


# --- download --------------------------------------------------------------------------------
_DENSENET_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def normalise_keys(model: str, state: dict) -> dict:
    """The published DenseNet files name layers 'norm.1' where torchvision's module has 'norm1'
    (torchvision renames them on load the same way); other files are used as published."""
    if not model.startswith("densenet"):
        return dict(state)
    out = {}
    for key, value in state.items():
        m = _DENSENET_OLD_KEY.match(key)
        out[m.group(1) + m.group(2) if m else key] = value
    return out


def fetch_state_dict(model: str, cache_dir: str) -> dict:
    """Download the published ImageNet state_dict of ``model`` (the only network access here)."""
    url = source_url(model)
    try:
        # torchvision's file names carry a sha256 prefix; efficientnet-pytorch's are not documented
        # to, so only the former are hash-checked.
        return torch.hub.load_state_dict_from_url(
            url, model_dir=cache_dir, map_location="cpu", progress=True,
            check_hash=not model.startswith("efficientnet"), weights_only=True)
    except Exception as exc:
        raise DownloadError(f"cannot fetch {model} from {url}: {str(exc).splitlines()[0]}") from None


def _serialise(state: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def download(models: Iterable[str], weights_dir: str, force: bool = False,
             fetch: Callable[[str, str], dict] | None = None, log=print) -> list[str]:
    """Fetch each model's ImageNet weights into ``weights_dir``; returns the models written.

    Each file is checked by loading it strictly into a freshly built network before it is written
    (atomically, with its sha256 next to it), so the cache never holds a file the trainer rejects.
    """
    from tqdm import tqdm

    from trainer.models import _REGISTRY  # late: trainer.models imports this module

    fetch = fetch or fetch_state_dict
    storage.makedirs(weights_dir)
    written = []
    models = list(models)
    with tempfile.TemporaryDirectory(prefix="cxr-weights-") as tmp:
        for model in tqdm(models, desc="weights", unit="model", disable=len(models) < 2):
            location = weights_location(model, weights_dir)
            if storage.exists(location) and not force:
                log(f"{model}: present ({storage.display(location)})")
                continue
            state = normalise_keys(model, fetch(model, tmp))
            net = _REGISTRY[model](224)
            _load_strict(net, state, "\0", f"downloaded {model} weights")
            data = _serialise(net.state_dict())
            storage.write_bytes(location, data)
            storage.write_bytes(_sidecar(location),
                                f"{sha256_hex(data)}  {weights_file_name(model)}\n".encode())
            log(f"{model}: wrote {storage.display(location)} ({len(data) / 1e6:.1f} MB)")
            written.append(model)
    return written


# --- command line ----------------------------------------------------------------------------
HELP = "Fill and inspect the local ImageNet weights cache (run download once where there is internet)."
EPILOG = f"""examples:
  {DOWNLOAD_COMMAND} --dir /shared/weights                  # the models PROTOCOL.md compares
  {DOWNLOAD_COMMAND} --models resnet50,densenet121,efficientnet-b3 --dir DIR
  {DOWNLOAD_COMMAND} --models all --dir s3://bucket/weights
  python -m trainer.weights list --dir /shared/weights --verify

--models takes registered names (python -m trainer.weights list --models all shows them),
'protocol' (default: {{protocol}}), 'all', and 'efficientnet' (its five resolution-matched variants).
The cache directory defaults to ${ENV_DIR}, else ~/.cache/cxr-sweep/weights.

exit codes: 0 ok; 1 download failed, or (list) a file is missing or fails its sha256; 2 bad input.
"""


def parse_models(text: str) -> list[str]:
    from trainer.models import (EFFICIENTNET_BY_RESOLUTION, NO_IMAGENET_WEIGHTS, PROTOCOL_MODELS,
                                UnknownModelError, _REGISTRY, list_models)
    names: list[str] = []
    for part in str(text).split(","):
        part = part.strip().lower().replace("_", "-")
        if not part:
            continue
        if part == "protocol":
            names += PROTOCOL_MODELS
        elif part == "all":
            names += sorted(n for n in _REGISTRY if n not in NO_IMAGENET_WEIGHTS)
        elif part == "efficientnet":
            names += EFFICIENTNET_BY_RESOLUTION.values()
        elif part in NO_IMAGENET_WEIGHTS:
            raise UserError(f"--models: {part} has no ImageNet weights to download")
        elif part in _REGISTRY:
            names.append(part)
        else:
            raise UnknownModelError(f"--models: unknown model {part!r}; known: "
                                    f"{', '.join(list_models())}, protocol, all")
    if not names:
        raise UserError("--models: no models given")
    return list(dict.fromkeys(names))


def _build_parser() -> argparse.ArgumentParser:
    from trainer.models import PROTOCOL_MODELS
    epilog = EPILOG.replace("{protocol}", ",".join(PROTOCOL_MODELS))
    parser = argparse.ArgumentParser(prog="python -m trainer.weights", description=HELP,
                                     epilog=epilog, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="{download,list}")
    sub.required = True
    for name, text in (("download", "fetch ImageNet weights into the cache (needs internet)"),
                       ("list", "show which models' weights are present or missing")):
        p = sub.add_parser(name, help=text, description=text, epilog=epilog,
                           formatter_class=HelpFormatter)
        p.add_argument("--models", default="protocol",
                       help="comma-separated names, or protocol / all / efficientnet")
        p.add_argument("--dir", default=default_weights_dir(),
                       help=f"the cache: a path or s3://... (env {ENV_DIR})")
        if name == "download":
            p.add_argument("--force", action="store_true", help="fetch again even if present")
        else:
            p.add_argument("--verify", action="store_true",
                           help="read every present file and check its sha256")
    return parser


def _list(models: Sequence[str], weights_dir: str, verify: bool) -> int:
    bad, corrupt = [], []
    print(f"{'model':<18} {'status':<10} {'MB':>8}  file")
    for model in models:
        location = weights_location(model, weights_dir)
        size = ""
        if not storage.exists(location):
            status = "missing"
        else:
            status = "present"
            fs, path = storage.resolve(location)
            size = f"{fs.get_file_info(path).size / 1e6:.1f}"
            if verify:
                sidecar = _sidecar(location)
                if not storage.exists(sidecar):
                    status = "no-sha256"
                else:
                    expected = storage.read_bytes(sidecar).decode().split()[0].strip().lower()
                    status = "ok" if sha256_hex(storage.read_bytes(location)) == expected else "CORRUPT"
        if status in ("missing", "CORRUPT"):
            bad.append(model)
        if status == "CORRUPT":
            corrupt.append(model)
        print(f"{model:<18} {status:<10} {size:>8}  {storage.display(location)}")
    if bad:
        print(f"{len(bad)} of {len(models)} unusable; fetch them with: {DOWNLOAD_COMMAND} "
              f"--models {','.join(bad)} --dir {storage.display(weights_dir)}"
              + (" --force" if corrupt else ""), file=sys.stderr)
        return EXIT_FAILURE
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    models = parse_models(args.models)
    if args.command == "list":
        return _list(models, args.dir, args.verify)
    try:
        download(models, args.dir, force=args.force)
    except DownloadError as exc:
        print(f"python -m trainer.weights: error: {exc} (run this where there is internet, or "
              f"copy {weights_file_name('<model>')} files into {storage.display(args.dir)})",
              file=sys.stderr)
        return EXIT_FAILURE
    except storage.StorageError as exc:
        raise UserError(str(exc)) from None
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="python -m trainer.weights"))
