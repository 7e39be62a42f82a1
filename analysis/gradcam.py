"""Grad-CAM heatmaps of a sweep's best checkpoint per task and resolution over given images.

Grad-CAM (Selvaraju et al. 2017): the gradient of a task's logit with respect to the body's last
feature map A (N, F, h, w), averaged over space, weighs A's channels; ReLU of the weighted sum is
the heatmap (h x w), upsampled bilinearly to the input. Plain forward/backward hooks on
``model.body`` (trainer.models: CXRNet.body is the feature extractor), no extra package. The
heatmap's coarseness is the feature map's size, which is why each panel states it: at 160 px a
ResNet's map is 5 x 5, at 480 px 15 x 15.

Images are preprocessed exactly as the store and the trainer's validation path do: grayscale,
Lanczos resize of the whole image to R x R (``preprocessing.resize.reference_resize``), repeated to
3 channels and normalised with ImageNet mean/std (``trainer.augment.to_model_input``).
"""
from __future__ import annotations

import argparse
import io
import math
import os
import posixpath
import sys
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd

from common import storage
from common.cli import HelpFormatter, UserError, run_cli
from common.schema import TASK_KEYS, TASKS, task_key

#: NIH ChestX-ray14 finding labels (BBox_List_2017.csv) that name one of our tasks differently.
NIH_LABEL_TO_TASK = {"effusion": "pleural_effusion"}


# --- Grad-CAM ------------------------------------------------------------------------------------
@dataclass
class CamResult:
    heatmaps: np.ndarray        # (N, R, R) float32 in [0, 1] (all zero when no positive evidence)
    probabilities: np.ndarray   # (N,) sigmoid of the task's logit
    feature_map: tuple[int, int]  # (h, w) of the body's output


def gradcam(model, images, output: int) -> CamResult:
    """Grad-CAM of logit ``output`` for a batch of model inputs (N, 3, R, R).

    The model is used in eval mode (BatchNorm statistics, no dropout) and left in its prior mode.
    """
    import torch
    import torch.nn.functional as F

    store: dict = {}

    def keep(module, inputs, out):
        store["acts"] = out
        out.register_hook(lambda grad: store.__setitem__("grads", grad))

    was_training = model.training
    model.eval()
    handle = model.body.register_forward_hook(keep)
    try:
        x = images.detach().clone().requires_grad_(True)   # a graph even when the body is frozen
        with torch.enable_grad():
            logits = model(x)                               # N, outputs
            model.zero_grad(set_to_none=True)
            # Images are independent in eval mode: the sum's gradient is each image's own.
            logits[:, output].sum().backward()
    finally:
        handle.remove()
        model.train(was_training)
    acts, grads = store["acts"].detach().float(), store["grads"].detach().float()  # N, F, h, w
    weights = grads.mean(dim=(2, 3), keepdim=True)                                  # N, F, 1, 1
    cam = F.relu((weights * acts).sum(dim=1, keepdim=True))                         # N, 1, h, w
    cam = F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).max(dim=1).values.clamp(min=1e-12).view(-1, 1, 1)
    cam = torch.where(peak > 1e-12, cam / peak, torch.zeros_like(cam))
    probs = torch.sigmoid(logits[:, output].detach().float())
    return CamResult(cam.cpu().numpy().astype(np.float32), probs.cpu().numpy(),
                     (int(acts.shape[-2]), int(acts.shape[-1])))


# --- images and boxes -----------------------------------------------------------------------------
@dataclass
class InputImage:
    location: str
    name: str                   # unique label in the figure (CheXpert names repeat: view1_frontal.jpg)
    data: bytes
    size: tuple[int, int]       # (width, height) of the file

    @property
    def file_name(self) -> str:
        """The base name, as NIH's box list names images."""
        return posixpath.basename(storage.display(self.location))


def unique_names(images: list[InputImage]) -> None:
    """Label each image by the shortest path suffix that tells it from the others
    (``patient00109/study1/view1_frontal.jpg`` rather than ``view1_frontal.jpg`` twice)."""
    parts = [storage.display(im.location).replace("\\", "/").split("/") for im in images]
    for depth in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            break
    for im, name in zip(images, names):
        im.name = name


def read_image(location: str) -> InputImage:
    from PIL import Image
    try:
        data = storage.read_bytes(location)
    except FileNotFoundError:
        raise UserError(f"--images: {location} does not exist") from None
    try:
        with Image.open(io.BytesIO(data)) as im:
            size = im.size
    except Exception as exc:
        raise UserError(f"--images: {location} is not a readable image ({exc})") from None
    return InputImage(location, posixpath.basename(storage.display(location)), data, size)


def preprocess(image: InputImage, resolution: int) -> np.ndarray:
    """uint8 (R, R): the store's resize (grayscale, Lanczos, whole image squashed to a square)."""
    from preprocessing.resize import ImageRejected, reference_resize
    try:
        return reference_resize(image.data, int(resolution))
    except ImageRejected as exc:
        raise UserError(f"--images: {image.location}: {exc}") from None


def model_input(pixels: Sequence[np.ndarray]):
    """uint8 (R, R) images -> the trainer's validation input (N, 3, R, R)."""
    import torch
    from trainer.augment import to_model_input
    batch = torch.from_numpy(np.stack(pixels)[:, None])   # N, 1, R, R uint8
    return to_model_input(batch, None)


@dataclass
class Box:
    image: str                  # file name (NIH "Image Index")
    label: str                  # finding label as written
    task_key: str | None        # the task it maps to, None when it names no task
    x: float
    y: float
    w: float
    h: float


def read_boxes(location: str) -> list[Box]:
    """NIH ChestX-ray14 ``BBox_List_2017.csv``: Image Index, Finding Label, Bbox [x, y, w, h] (four
    columns, pixels of the original image). Columns are taken by position (the official header
    spreads 'Bbox [x,y,w,h]' over four cells)."""
    try:
        frame = pd.read_csv(io.BytesIO(storage.read_bytes(location)))
    except FileNotFoundError:
        raise UserError(f"--boxes: {location} does not exist") from None
    except Exception as exc:
        raise UserError(f"--boxes: {location} is not a readable CSV ({exc})") from None
    if frame.shape[1] < 6:
        raise UserError(f"--boxes: {location} needs 6 columns (Image Index, Finding Label, x, y, w, "
                        f"h), found {frame.shape[1]}")
    boxes = []
    for i, row in enumerate(frame.itertuples(index=False), start=2):
        try:
            x, y, w, h = (float(row[k]) for k in range(2, 6))
            if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
                raise ValueError("box needs finite x, y and positive w, h")
        except (TypeError, ValueError) as exc:
            raise UserError(f"--boxes: {location} line {i}: {exc}") from None
        label = str(row[1]).strip()
        key = task_key(label)
        key = NIH_LABEL_TO_TASK.get(key, key)
        boxes.append(Box(posixpath.basename(str(row[0]).strip()), label,
                         key if key in TASK_KEYS else None, x, y, w, h))
    return boxes


# --- the sweep's best checkpoints ------------------------------------------------------------------
@dataclass
class BestRun:
    task_key: str
    resolution: int
    model: str
    auroc: float
    epoch: int
    trial_id: str
    checkpoint: str
    outputs: list[str]          # task keys of the model's outputs, in order


def best_checkpoints(sweep_location: str, tasks: Sequence[str] | None = None,
                     resolutions: Sequence[int] | None = None) -> list[BestRun]:
    """Per task and resolution, the finished run with the highest best-epoch AUROC (the
    aggregator's table) and its ``checkpoints/best-<task>.pt``."""
    from analysis import aggregate as agg
    from orchestrator.ledger import trial_dir
    data = agg.load_sweep(sweep_location)
    t = data.trials[data.trials["best_auroc"].notna()] if not data.trials.empty else data.trials
    if t.empty:
        raise UserError(f"sweep {storage.display(sweep_location)} has no finished trial with an AUROC")
    if tasks:
        t = t[t["task_key"].isin([task_key(x) for x in tasks])]
    if resolutions:
        t = t[t["resolution"].isin([int(r) for r in resolutions])]
    if t.empty:
        raise UserError("no finished trial matches --tasks / --resolutions")
    idx = t.groupby(["task_key", "resolution"], sort=False)["best_auroc"].idxmax()
    runs = []
    for _, row in t.loc[idx.values].iterrows():
        tdir = trial_dir(sweep_location, row["trial_id"])
        runs.append(BestRun(task_key=row["task_key"], resolution=int(row["resolution"]),
                            model=str(row["model"]), auroc=float(row["best_auroc"]),
                            epoch=int(row["best_epoch"]), trial_id=row["trial_id"],
                            checkpoint=storage.join(tdir, "checkpoints", f"best-{row['task_key']}.pt"),
                            outputs=_outputs_of(tdir)))
    order = {k: i for i, k in enumerate(TASK_KEYS)}
    return sorted(runs, key=lambda r: (r.resolution, order.get(r.task_key, 99)))


def _outputs_of(tdir: str) -> list[str]:
    """The model's output order: result.json's ``tasks``, else from its config."""
    result = storage.read_json(storage.join(tdir, "result.json"))
    if isinstance(result.get("tasks"), list):
        return [task_key(k) for k in result["tasks"]]
    cfg = result.get("config") or {}
    if cfg.get("task_mode") == "single":
        return [task_key(cfg["task"])]
    return [task_key(k) for k in cfg.get("tasks", TASKS)]


def load_model(run: BestRun, device: str = "cpu"):
    """The CXRNet of a best checkpoint (weights loaded by trainer.models with weights_only=True)."""
    from trainer.models import create_model
    if not storage.exists(run.checkpoint):
        raise FileNotFoundError(storage.display(run.checkpoint))
    model = create_model(run.model, run.resolution, outputs=len(run.outputs), weights=run.checkpoint)
    return model.to(device).eval()


# --- the figure -----------------------------------------------------------------------------------
@dataclass
class Panel:
    run: BestRun
    image: InputImage
    pixels: np.ndarray | None          # (R, R) uint8
    heatmap: np.ndarray | None         # (R, R) in [0, 1]
    probability: float = math.nan
    feature_map: tuple[int, int] | None = None
    error: str = ""


def compute_panels(runs: list[BestRun], images: list[InputImage], device: str = "cpu",
                   progress: bool = False) -> list[Panel]:
    """One panel per (image, run); a run whose checkpoint cannot be loaded gives panels that say so."""
    panels = []
    iterator = runs
    if progress:
        from tqdm import tqdm
        iterator = tqdm(runs, desc="checkpoints", unit="ckpt", file=sys.stderr)
    import torch
    for run in iterator:
        pixels = [preprocess(im, run.resolution) for im in images]
        try:
            model = load_model(run, device)
        except Exception as exc:   # missing or unreadable checkpoint: say so in its panels
            msg = f"checkpoint not usable: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            panels += [Panel(run, im, px, None, error=msg[:160]) for im, px in zip(images, pixels)]
            continue
        if run.task_key not in run.outputs:
            panels += [Panel(run, im, px, None, error=f"model has no output {run.task_key}")
                       for im, px in zip(images, pixels)]
            continue
        cam = gradcam(model, model_input(pixels).to(device), run.outputs.index(run.task_key))
        for k, (im, px) in enumerate(zip(images, pixels)):
            panels.append(Panel(run, im, px, cam.heatmaps[k], float(cam.probabilities[k]),
                                cam.feature_map))
        del model
        if device != "cpu":
            torch.cuda.empty_cache()
    return panels


def render(panels: list[Panel], boxes: list[Box] | None = None) -> bytes:
    """PNG: rows = image x resolution, columns = tasks."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    order = {k: i for i, k in enumerate(TASK_KEYS)}
    tasks = sorted({p.run.task_key for p in panels}, key=lambda k: order.get(k, 99))
    resolutions = sorted({p.run.resolution for p in panels})
    names = list(dict.fromkeys(p.image.name for p in panels))
    rows = [(n, r) for n in names for r in resolutions]
    fig = Figure(figsize=(2.7 * len(tasks), 2.95 * len(rows)), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), len(tasks), squeeze=False)
    by = {(p.image.name, p.run.resolution, p.run.task_key): p for p in panels}
    boxes = boxes or []
    for i, (name, res) in enumerate(rows):
        for j, key in enumerate(tasks):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(dict(zip(TASK_KEYS, TASKS)).get(key, key), fontsize=10, pad=14)
            if j == 0:
                ax.set_ylabel(f"{name}\n{res} px", fontsize=8)
            p = by.get((name, res, key))
            if p is None:
                ax.text(0.5, 0.5, "no finished run", ha="center", va="center", fontsize=8,
                        transform=ax.transAxes)
                continue
            ax.imshow(p.pixels, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            if p.heatmap is not None:
                ax.imshow(p.heatmap, cmap="jet", alpha=0.4, vmin=0, vmax=1, interpolation="bilinear")
                fh, fw = p.feature_map
                ax.text(0.02, 0.98, f"p={p.probability:.3f}  map {fh}×{fw}", transform=ax.transAxes,
                        va="top", ha="left", fontsize=7, color="white",
                        bbox=dict(facecolor="black", alpha=0.55, pad=1.5, lw=0))
            else:
                ax.text(0.5, 0.5, p.error, ha="center", va="center", fontsize=6, wrap=True,
                        color="red", transform=ax.transAxes)
            ax.set_xlabel(f"{p.run.model}  val AUROC {p.run.auroc:.3f}", fontsize=7)
            sx, sy = res / p.image.size[0], res / p.image.size[1]
            for b in boxes:
                if b.image == p.image.file_name and b.task_key == key:
                    ax.add_patch(Rectangle((b.x * sx - 0.5, b.y * sy - 0.5), b.w * sx, b.h * sy,
                                           fill=False, edgecolor="lime", lw=1.4))
    fig.suptitle("Grad-CAM of the best checkpoint per task and resolution"
                 + ("  (green: ground-truth boxes)" if any(b.task_key for b in boxes) else ""),
                 fontsize=11)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


# --- command line ---------------------------------------------------------------------------------
HELP = "Grad-CAM heatmaps of a sweep's best checkpoint per task and resolution"
EPILOG = """examples:
  python -m analysis.gradcam --sweep sweeps/thesis --images view1_frontal.jpg
  python -m analysis.gradcam --sweep sweeps/thesis --images 00000013_005.png 00000032_037.png \\
      --boxes BBox_List_2017.csv --tasks Atelectasis,Cardiomegaly --out results/thesis/gradcam.png

--boxes reads NIH ChestX-ray14's BBox_List_2017.csv format (Image Index, Finding Label, x, y, w, h in
pixels of the original image); boxes are drawn where the image name and the finding match a task
(Effusion -> Pleural Effusion). Rows = image x resolution, columns = tasks."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sweep", required=True, help="the sweep's storage location")
    parser.add_argument("--images", nargs="+", required=True, help="image files (JPEG, PNG, ...)")
    parser.add_argument("--boxes", default=None, help="ground-truth boxes, NIH BBox_List CSV format")
    parser.add_argument("--out", default=None,
                        help="output PNG (default: results/<sweep name>/gradcam.png)")
    parser.add_argument("--tasks", default=None, help="comma-separated tasks (default: all)")
    parser.add_argument("--resolutions", default=None, help="comma-separated resolutions (default: all)")
    parser.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', 'cuda:N'")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from common.cli import parse_int_list
    tasks = None
    if args.tasks:
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        for t in tasks:
            if task_key(t) not in TASK_KEYS:
                raise UserError(f"--tasks: {t!r} is not one of {', '.join(TASKS)}")
    resolutions = parse_int_list(args.resolutions, "--resolutions") if args.resolutions else None
    if not storage.exists(args.sweep):
        raise UserError(f"--sweep: {storage.display(args.sweep)} does not exist")
    images = [read_image(p) for p in args.images]
    if len({storage.display(im.location) for im in images}) != len(images):
        raise UserError("--images: an image is given twice")
    unique_names(images)
    boxes = read_boxes(args.boxes) if args.boxes else []
    device = args.device
    if device == "auto":
        import torch
        device = "cuda" if torch.cuda.is_available() else "cpu"
    runs = best_checkpoints(args.sweep, tasks, resolutions)
    panels = compute_panels(runs, images, device=device, progress=not args.quiet)
    png = render(panels, boxes)
    out = args.out
    if out is None:
        from analysis.aggregate import load_sweep
        out = os.path.join("results", load_sweep(args.sweep).name, "gradcam.png")
    storage.write_bytes(out, png)
    failed = sorted({p.run.trial_id + ": " + p.error for p in panels if p.error})
    for line in failed:
        print(f"warning: {line}", file=sys.stderr)
    names = {im.file_name for im in images}
    used = [b for b in boxes if b.image in names]
    unmatched = sorted({b.label for b in used if b.task_key is None})
    print(f"wrote {storage.display(out)}: {len(images)} image(s) x {len({r.resolution for r in runs})} "
          f"resolution(s) x {len({r.task_key for r in runs})} task(s); {len(used)} box(es) for these "
          f"images" + (f" ({', '.join(unmatched)}: not a task, not drawn)" if unmatched else ""))
    return 1 if failed else 0   # the figure is written, but a panel is missing: say so


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.gradcam", description=HELP,
                                     epilog=EPILOG, formatter_class=HelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="analysis.gradcam"))
