"""``python -m trainer.bench``: loader and training-step throughput (commands, not tests).

  loader  images/s per core of our loader (store read + decode + keyed augmentation, batched) next
          to the naive loader peers write (decode the full-size JPEG, Lanczos-resize, augment per
          sample with torchvision), at each resolution, in one run, on one thread.
  step    training images/s per model and resolution on the device at hand: with synthetic uint8
          batches (the device's ceiling) and with the real loader (the gap is the loader's cost).

Results go to stdout as a Markdown table and, with ``--json FILE``, as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch

from common.cli import HelpFormatter, UserError, parse_int_list, run_cli

EPILOG = """examples:
  # loader: make a small phantom (realistic 1000-3000 px JPEGs) and its store, compare at 160/320
  python -m trainer.bench loader --workdir /tmp/bench --studies 40 --resolutions 160,320

  # loader on an existing phantom/CheXpert image root and the store built from it
  python -m trainer.bench loader --image-root demo/phantom --store demo/store --resolutions 160,320

  # training step on the device at hand (synthetic data, and the real loader with 8 workers)
  python -m trainer.bench step --models resnet50,densenet121 --resolutions 160,320 \\
      --store demo/store --workers 8 --steps 30
"""


# ---- loader -----------------------------------------------------------------------------------

def _prepare_phantom(workdir: str, studies: int, min_size: int, max_size: int,
                     resolutions: list[int]) -> tuple[str, str]:
    from preprocessing.build import build_store
    from preprocessing.phantom import make_phantom
    root = os.path.join(workdir, "phantom")
    store = os.path.join(workdir, "store")
    if not os.path.exists(os.path.join(root, "train.csv")):
        make_phantom(root, studies=studies, seed=0, min_size=min_size, max_size=max_size,
                     workers=max(1, (os.cpu_count() or 1)))
    build_store(root, [os.path.join(root, "train.csv"), os.path.join(root, "valid.csv")], store,
                resolutions=resolutions, use_ray=False, progress=False)
    return root, store


def bench_ours(store_loc: str, resolution: int, limit_images: int, seed: int = 0) -> dict:
    """Store read + decode + augmentation (keyed params, batched grid_sample) on one thread."""
    from preprocessing.store import open_store
    from trainer.augment import AugmentSettings, to_model_input
    from trainer.data import StudyBatches, load_split
    from common.schema import TASKS
    t0 = time.perf_counter()
    store = open_store(store_loc, verify=False)
    data = load_split(store, resolution, "train", TASKS)
    t_read = time.perf_counter() - t0
    batches = StudyBatches(data, 40, seed=seed, augment=AugmentSettings())
    images = 0
    t_decode = t_aug = 0.0
    for b in range(len(batches)):
        t1 = time.perf_counter()
        batch = batches[(1, b)]
        t2 = time.perf_counter()
        x = to_model_input(batch["images"], batch["aug"])
        t3 = time.perf_counter()
        assert x.shape[1] == 3
        images += batch["images"].shape[0]
        t_decode += t2 - t1
        t_aug += t3 - t2
        if images >= limit_images:
            break
    # The read is amortised over the whole split; charge the share of the images measured.
    read_share = t_read * images / data.num_images
    total = read_share + t_decode + t_aug
    return {"loader": "ours", "resolution": resolution, "images": images,
            "images_per_s": images / total, "read_s": read_share, "decode_s": t_decode,
            "augment_s": t_aug,
            # with augmentation on the GPU, the CPU only reads, decodes and draws parameters
            "cpu_images_per_s_gpu_augment": images / (read_share + t_decode)}


def bench_naive(image_root: str, resolution: int, limit_images: int) -> dict:
    """The per-sample loader of a typical CheXpert script: full JPEG decode, resize, augment."""
    import pandas as pd
    from PIL import Image
    from torchvision import transforms as T
    paths = pd.read_csv(os.path.join(image_root, "train.csv"))["Path"].tolist()[:limit_images]
    transform = T.Compose([
        T.RandomRotation(30),
        T.RandomAffine(degrees=0, scale=(1 / 1.2, 1.0)),     # zoom-out, black padding
        T.RandomPerspective(distortion_scale=0.1, p=0.75),
        T.ColorJitter(brightness=0.2, contrast=0.2),
        T.Grayscale(num_output_channels=3),
        T.ToTensor(),
        T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ])
    t0 = time.perf_counter()
    for p in paths:
        with Image.open(os.path.join(image_root, p)) as im:
            im = im.convert("L").resize((resolution, resolution), Image.LANCZOS)
        x = transform(im)
        assert x.shape == (3, resolution, resolution)
    total = time.perf_counter() - t0
    return {"loader": "naive", "resolution": resolution, "images": len(paths),
            "images_per_s": len(paths) / total}


def run_loader(args) -> int:
    torch.set_num_threads(1)
    resolutions = parse_int_list(args.resolutions, "--resolutions")
    if args.store and args.image_root:
        root, store = args.image_root, args.store
    elif args.store or args.image_root:
        raise UserError("give both --store and --image-root, or neither (then --workdir is used)")
    else:
        workdir = args.workdir or tempfile.mkdtemp(prefix="trainer-bench-")
        root, store = _prepare_phantom(workdir, args.studies, args.min_size, args.max_size,
                                       resolutions)
    rows = []
    for res in resolutions:
        ours = bench_ours(store, res, args.images)
        naive = bench_naive(root, res, args.naive_images)
        ours["speedup_vs_naive"] = ours["images_per_s"] / naive["images_per_s"]
        rows += [ours, naive]
        print(f"res {res}: ours {ours['images_per_s']:.0f} img/s/core "
              f"(read {ours['read_s']:.2f}s decode {ours['decode_s']:.2f}s augment "
              f"{ours['augment_s']:.2f}s over {ours['images']} images; without the CPU augmentation "
              f"{ours['cpu_images_per_s_gpu_augment']:.0f} img/s/core); naive "
              f"{naive['images_per_s']:.1f} img/s/core over {naive['images']} images; "
              f"{ours['speedup_vs_naive']:.1f}x", flush=True)
    print("\n| resolution | ours, CPU augmentation (img/s/core) | ours, GPU-side augmentation: CPU "
          "share (img/s/core) | naive (img/s/core) | speedup (CPU aug) |\n|---|---|---|---|---|")
    for res in resolutions:
        o = next(r for r in rows if r["resolution"] == res and r["loader"] == "ours")
        n = next(r for r in rows if r["resolution"] == res and r["loader"] == "naive")
        print(f"| {res} | {o['images_per_s']:.0f} | {o['cpu_images_per_s_gpu_augment']:.0f} | "
              f"{n['images_per_s']:.1f} | "
              f"{o['speedup_vs_naive']:.1f}x |")
    _write_json(args.json, {"bench": "loader", "rows": rows})
    return 0


# ---- training step --------------------------------------------------------------------------

def _step_fn(model, optimizer, device, bf16, channels_last):
    from trainer.augment import to_model_input
    from trainer.data import segment_max
    from trainer.metrics import masked_bce_with_logits

    def step(batch):
        images = batch["images"].to(device, non_blocking=True)
        index = batch["study_index"].to(device, non_blocking=True)
        labels = batch["labels"].to(device, non_blocking=True)
        x = to_model_input(images, batch["aug"].to(device, non_blocking=True), channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        loss = masked_bce_with_logits(segment_max(logits.float(), index, labels.shape[0]), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss
    return step


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_step(model_name: str, resolution: int, device: torch.device, steps: int, warmup: int,
               batch_studies: int, store_loc: str | None, workers: int, bf16: bool,
               channels_last: bool) -> list[dict]:
    from trainer.augment import AugmentSettings, sample_params
    from trainer.data import StudyBatches, load_split, make_loader
    from trainer.models import create_model
    from common.schema import TASKS
    torch.manual_seed(0)
    model = create_model(model_name, resolution, outputs=5, weights="none").to(
        device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.99), weight_decay=0.1)
    step = _step_fn(model, optimizer, device, bf16, channels_last)
    rows = []
    # Synthetic: one study per image, the batch built once and reused (the device's ceiling).
    n = batch_studies
    synth = {"images": torch.randint(0, 256, (n, 1, resolution, resolution), dtype=torch.uint8),
             "study_index": torch.arange(n), "labels": torch.randint(0, 2, (n, 5)).float(),
             "aug": torch.from_numpy(sample_params(AugmentSettings(), 0, 1, np.arange(n)))}
    if device.type == "cuda":
        synth = {k: v.pin_memory() for k, v in synth.items()}
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        step(synth)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step(synth)
    _sync(device)
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    rows.append({"model": model_name, "resolution": resolution, "data": "synthetic",
                 "images_per_s": n * steps / dt, "peak_memory_bytes": peak,
                 "device": str(device), "bf16": bf16, "channels_last": channels_last})
    if store_loc:
        from preprocessing.store import open_store
        data = load_split(open_store(store_loc, verify=False), resolution, "train", TASKS)
        batches = StudyBatches(data, batch_studies, seed=0, augment=AugmentSettings())
        loader = make_loader(batches, workers, pin_memory=device.type == "cuda")
        images = done = 0
        t0 = None
        epoch = 1
        while done < warmup + steps:
            loader.sampler.epoch = epoch
            for batch in loader:
                if done == warmup:
                    _sync(device)
                    t0 = time.perf_counter()
                step(batch)
                done += 1
                if done > warmup:
                    images += batch["images"].shape[0]
                if done >= warmup + steps:
                    break
            epoch += 1
        _sync(device)
        dt = time.perf_counter() - t0
        rows.append({"model": model_name, "resolution": resolution,
                     "data": f"loader ({workers} workers)", "images_per_s": images / dt,
                     "peak_memory_bytes": peak, "device": str(device), "bf16": bf16,
                     "channels_last": channels_last})
    return rows


def run_step(args) -> int:
    from trainer.train import device_name
    device = torch.device(args.device if args.device != "auto" else
                          ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = args.cudnn_benchmark
    bf16 = device.type == "cuda" if args.amp == "auto" else args.amp == "bf16"
    channels_last = device.type == "cuda" if args.channels_last == "auto" else args.channels_last == "on"
    rows = []
    print(f"device: {device_name(device)}; bf16 {bf16}; channels_last {channels_last}; "
          f"cudnn.benchmark {args.cudnn_benchmark}; "
          f"torch threads {torch.get_num_threads()}", flush=True)
    for model in args.models.split(","):
        for res in parse_int_list(args.resolutions, "--resolutions"):
            for r in bench_step(model, res, device, args.steps, args.warmup, args.batch_studies,
                                args.store, args.workers, bf16, channels_last):
                rows.append(r)
                print(json.dumps(r), flush=True)
    print(f"\n| model | resolution | data | images/s | peak GPU memory |\n|---|---|---|---|---|")
    for r in rows:
        peak = f"{r['peak_memory_bytes'] / 2**30:.1f} GiB" if r["peak_memory_bytes"] else "-"
        print(f"| {r['model']} | {r['resolution']} | {r['data']} | {r['images_per_s']:.1f} | {peak} |")
    _write_json(args.json, {"bench": "step", "device": device_name(device), "rows": rows})
    return 0


def _write_json(path, obj) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(obj, f, indent=2)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer.bench", description=__doc__.split("\n")[0],
                                     epilog=EPILOG, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    lo = sub.add_parser("loader", help="loader images/s per core vs the naive per-sample loader",
                        epilog=EPILOG, formatter_class=HelpFormatter)
    lo.add_argument("--store", help="existing store (with --image-root)")
    lo.add_argument("--image-root", help="image root with train.csv the store was built from")
    lo.add_argument("--workdir", help="where to create the phantom and store when none is given")
    lo.add_argument("--studies", type=int, default=40, help="phantom studies to create")
    lo.add_argument("--min-size", type=int, default=1000, help="phantom source size, min")
    lo.add_argument("--max-size", type=int, default=3000, help="phantom source size, max")
    lo.add_argument("--resolutions", default="160,320")
    lo.add_argument("--images", type=int, default=400, help="images timed for our loader")
    lo.add_argument("--naive-images", type=int, default=30, help="images timed for the naive one")
    lo.add_argument("--json", help="also write the results here")
    lo.set_defaults(_run=run_loader)
    st = sub.add_parser("step", help="training-step images/s per model and resolution",
                        epilog=EPILOG, formatter_class=HelpFormatter)
    st.add_argument("--models", default="resnet50,densenet121")
    st.add_argument("--resolutions", default="160,320")
    st.add_argument("--store", help="store for the real-loader measurement (omit: synthetic only)")
    st.add_argument("--workers", type=int, default=8, help="loader workers for the real loader")
    st.add_argument("--steps", type=int, default=20)
    st.add_argument("--warmup", type=int, default=5)
    st.add_argument("--batch-studies", type=int, default=40)
    st.add_argument("--device", default="auto")
    st.add_argument("--amp", choices=("auto", "bf16", "off"), default="auto")
    st.add_argument("--channels-last", choices=("auto", "on", "off"), default="auto")
    st.add_argument("--cudnn-benchmark", action="store_true",
                    help="let cuDNN tune per input shape (re-tunes for every new batch size)")
    st.add_argument("--json", help="also write the results here")
    st.set_defaults(_run=run_step)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args._run(args)


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="trainer.bench"))
