"""``python -m trainer.weights``: fill and inspect the ImageNet weights cache (the only code that
downloads weights; trainer/models/weights_cache.py reads the cache at train time).

Sources, from each model's ``ModelInfo.weights_url``: torchvision's ``IMAGENET1K_V1`` weights for
every torchvision model (those ``pretrained=True`` gave, which the thesis used) with torchvision's
hash check, efficientnet-pytorch's ``url_map``, and for ``timm:<name>`` timm's default pretrained
tag of that name (through timm, from the Hugging Face hub). Each file is loaded strictly into a
freshly built network before it is written, so the cache never holds a file the trainer rejects.
"""
from __future__ import annotations

import argparse
import io
import re
import sys
import tempfile
from typing import Callable, Iterable, Sequence

import torch

from common import storage
from common.cli import EXIT_FAILURE, HelpFormatter, UserError, run_cli
from trainer.models import (EFFICIENTNET_BY_RESOLUTION, PROTOCOL_MODELS, UnknownModelError,
                            is_timm, list_models, model_info, resolve_model_name)
from trainer.models.registry import builder
from trainer.models.weights_cache import (DOWNLOAD_COMMAND, ENV_DIR,
                                          MissingWeightsError, WeightsError, default_weights_dir,
                                          expected_sha256, load_strict, sha256_hex,
                                          sidecar_location, weights_file_name, weights_location)

__all__ = ["download", "fetch_state_dict", "parse_models", "main", "DownloadError",
           "MissingWeightsError", "WeightsError", "ENV_DIR", "DOWNLOAD_COMMAND",
           "default_weights_dir", "weights_location", "classifier_prefix", "source_url"]


class DownloadError(RuntimeError):
    """A source could not be fetched (offline, HTTP error, hash mismatch)."""


def classifier_prefix(model: str) -> str:
    """State_dict prefix of the ImageNet classifier the body drops."""
    return model_info(model).classifier_prefix


def source_url(model: str) -> str:
    """Where ``download`` fetches the model's published ImageNet state_dict."""
    url = model_info(model).weights_url
    if url is None:
        raise UserError(f"{model} has no published ImageNet weights")
    return url


# --- download --------------------------------------------------------------------------------
_DENSENET_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def normalise_keys(model: str, state: dict) -> dict:
    """The published DenseNet files name layers 'norm.1' where torchvision's module has 'norm1'
    (torchvision renames them on load the same way); other files are used as published."""
    info = model_info(model)
    if not (info.family == "densenet" and info.source == "torchvision"):
        return dict(state)
    out = {}
    for key, value in state.items():
        m = _DENSENET_OLD_KEY.match(key)
        out[m.group(1) + m.group(2) if m else key] = value
    return out


def _build_original(model: str) -> torch.nn.Module:
    """The network a cache file must fit: the registered builder's, or timm's without classifier."""
    if is_timm(model):
        from trainer.models.timm_body import build_timm_net
        return build_timm_net(model[len("timm:"):])
    return builder(model)(224)


def _fetch_timm(model: str, cache_dir: str) -> dict:
    from trainer.models.timm_body import build_timm_net
    # timm downloads its default pretrained tag through the Hugging Face hub (into the hub's own
    # cache), drops the classifier for num_classes=0 and adapts what it must; we keep the result.
    return build_timm_net(model[len("timm:"):], pretrained=True).state_dict()


def fetch_state_dict(model: str, cache_dir: str) -> dict:
    """Download the published ImageNet state_dict of ``model`` (the only network access here)."""
    url = source_url(model)
    try:
        if is_timm(model):
            return _fetch_timm(model, cache_dir)
        # torchvision's file names carry a sha256 prefix; efficientnet-pytorch's are not documented
        # to, so only the former are hash-checked.
        return torch.hub.load_state_dict_from_url(
            url, model_dir=cache_dir, map_location="cpu", progress=True,
            check_hash=model_info(model).source == "torchvision", weights_only=True)
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
            net = _build_original(model)
            load_strict(net, state, "", f"downloaded {model} weights")
            data = _serialise(net.state_dict())
            storage.write_bytes(location, data)
            storage.write_bytes(sidecar_location(location),
                                f"{sha256_hex(data)}  {weights_file_name(model)}\n".encode())
            log(f"{model}: wrote {storage.display(location)} ({len(data) / 1e6:.1f} MB)")
            written.append(model)
    return written


# --- command line ----------------------------------------------------------------------------
HELP = "Fill and inspect the local ImageNet weights cache (run download once where there is internet)."
EPILOG = f"""examples:
  {DOWNLOAD_COMMAND} --dir /shared/weights                  # the models the thesis compares
  {DOWNLOAD_COMMAND} --models resnet50,densenet121,efficientnet-b3 --dir DIR
  {DOWNLOAD_COMMAND} --models timm:convnext_tiny --dir DIR   # any timm model's pretrained weights
  {DOWNLOAD_COMMAND} --models all --dir s3://bucket/weights
  python -m trainer.weights list --dir /shared/weights --verify

--models takes registered names (python -m trainer.weights list --models all shows them),
timm:<name> for any timm model with pretrained weights, 'protocol' (default: {{protocol}}),
'all' (every registered model with weights), and 'efficientnet' (its five resolution-matched
variants). The cache directory defaults to ${ENV_DIR}, else ~/.cache/cxr-sweep/weights.

exit codes: 0 ok; 1 download failed, or (list) a file is missing or fails its sha256; 2 bad input.
"""


def parse_models(text: str) -> list[str]:
    names: list[str] = []
    for part in str(text).split(","):
        part = part.strip()
        key = part.lower().replace("_", "-")
        if not part:
            continue
        if key == "protocol":
            names += PROTOCOL_MODELS
        elif key == "all":
            names += [n for n in list_models()
                      if n != "efficientnet" and model_info(n).has_imagenet_weights]
        elif key == "efficientnet":
            names += EFFICIENTNET_BY_RESOLUTION.values()
        else:
            try:
                name = resolve_model_name(part, 224)
            except UnknownModelError as exc:
                if is_timm(part):
                    raise UnknownModelError(f"--models: {exc}") from None
                raise UnknownModelError(f"--models: unknown model {key!r}; known: "
                                        f"{', '.join(list_models())}, protocol, all, "
                                        "timm:<name>") from None
            if not model_info(name).has_imagenet_weights:
                raise UserError(f"--models: {name} has no ImageNet weights to download")
            names.append(name)
    if not names:
        raise UserError("--models: no models given")
    return list(dict.fromkeys(names))


def _build_parser() -> argparse.ArgumentParser:
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
                       help="comma-separated names, timm:<name>, or protocol / all / efficientnet")
        p.add_argument("--dir", default=default_weights_dir(),
                       help=f"the cache: a path or s3://... (env {ENV_DIR})")
        if name == "download":
            p.add_argument("--force", action="store_true", help="fetch again even if present")
        else:
            p.add_argument("--verify", action="store_true",
                           help="read every present file and check its sha256")
    return parser


def _status(location: str, verify: bool) -> tuple[str, str]:
    if not storage.exists(location):
        return "missing", ""
    fs, path = storage.resolve(location)
    size = f"{fs.get_file_info(path).size / 1e6:.1f}"
    if not verify:
        return "present", size
    expected = expected_sha256(location)
    if expected is None:
        return "no-sha256", size
    return ("ok" if sha256_hex(storage.read_bytes(location)) == expected else "CORRUPT"), size


def _list(models: Sequence[str], weights_dir: str, verify: bool) -> int:
    bad, corrupt = [], []
    width = max([18, *(len(m) + 1 for m in models)])
    print(f"{'model':<{width}} {'status':<10} {'MB':>8}  file")
    for model in models:
        location = weights_location(model, weights_dir)
        status, size = _status(location, verify)
        if status in ("missing", "CORRUPT"):
            bad.append(model)
        if status == "CORRUPT":
            corrupt.append(model)
        print(f"{model:<{width}} {status:<10} {size:>8}  {storage.display(location)}")
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
