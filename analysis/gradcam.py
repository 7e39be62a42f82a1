"""Grad-CAM heatmaps of a sweep's best checkpoint per task and resolution over given images.

The maps come from pytorch-grad-cam (the ``grad-cam`` package): Grad-CAM (Selvaraju et al. 2017)
by default, Grad-CAM++, HiResCAM, XGradCAM, LayerCAM or EigenCAM by ``--method``. The target
layer is ``model.body`` (trainer.models: CXRNet.body is the feature extractor, whatever the
architecture, timm models included), the target the task's logit. The package normalises each
map to [0, 1] and resizes it bilinearly to the input. The heatmap's coarseness is the feature
map's size, which is why each panel states it: at 160 px a ResNet's map is 5 x 5, at 480 px 15 x 15.

Images are preprocessed exactly as the store and the trainer's validation path do: grayscale,
Lanczos resize of the whole image to R x R (``preprocessing.resize.reference_resize``), repeated to
3 channels and normalised with ImageNet mean/std (``trainer.augment.to_model_input``).
"""
from __future__ import annotations

import argparse
import io
import math
import posixpath
import sys
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd

from common import storage
from common.cli import HelpFormatter, UserError, run_cli
from common.schema import TASK_KEYS, TASKS, task_key
from common.sweep_folder import SweepFolder

#: NIH ChestX-ray14 finding labels (BBox_List_2017.csv) that name one of our tasks differently.
NIH_LABEL_TO_TASK = {"effusion": "pleural_effusion"}

#: --method -> the pytorch-grad-cam class (methods that need one forward pass per channel, such
#: as ScoreCAM, are left out: too slow for a panel per task and resolution on a CPU).
CAM_METHODS = {"gradcam": "GradCAM", "gradcam++": "GradCAMPlusPlus", "hirescam": "HiResCAM",
               "xgradcam": "XGradCAM", "layercam": "LayerCAM", "eigencam": "EigenCAM"}


# --- Grad-CAM ------------------------------------------------------------------------------------
@dataclass
class CamResult:
    heatmaps: np.ndarray        # (N, R, R) float32 in [0, 1] (all zero when no positive evidence)
    probabilities: np.ndarray   # (N,) sigmoid of the task's logit
    feature_map: tuple[int, int]  # (h, w) of the body's output


def gradcam(model, images, output: int, method: str = "gradcam") -> CamResult:
    """The class-activation map of logit ``output`` for a batch of model inputs (N, 3, R, R).

    The model is used in eval mode (BatchNorm statistics, no dropout) and left in its prior mode,
    with no hooks left behind.
    """
    import pytorch_grad_cam
    import torch
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    if method not in CAM_METHODS:
        raise ValueError(f"unknown CAM method {method!r} (known: {', '.join(CAM_METHODS)})")
    cam_class = getattr(pytorch_grad_cam, CAM_METHODS[method])
    was_training = model.training
    # An input that needs a gradient gives the body's output one even when the body is frozen.
    x = images.detach().clone().requires_grad_(True)
    heatmaps = None
    try:
        with torch.enable_grad(), cam_class(model=model, target_layers=[model.body]) as cam:
            heatmaps = cam(input_tensor=x, targets=[ClassifierOutputTarget(output)] * len(x))
            logits = cam.outputs.detach().float()                       # N, outputs
            acts = cam.activations_and_grads.activations[0]             # N, F, h, w
    finally:
        model.train(was_training)
    if heatmaps is None:   # the package reports an IndexError by printing it and carrying on
        raise RuntimeError(f"{method}: no map computed for output {output}")
    probs = torch.sigmoid(logits[:, output])
    return CamResult(np.asarray(heatmaps, dtype=np.float32), probs.cpu().numpy(),
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


def read_boxes(location: str, task_keys: Sequence[str] = TASK_KEYS) -> list[Box]:
    """NIH ChestX-ray14 ``BBox_List_2017.csv``: Image Index, Finding Label, Bbox [x, y, w, h] (four
    columns, pixels of the original image). Columns are taken by position (the official header
    spreads 'Bbox [x,y,w,h]' over four cells). A finding names a task of ``task_keys`` directly
    (an NIH-trained sweep has 'Effusion') or through NIH_LABEL_TO_TASK (a CheXpert-trained one)."""
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
        if key not in task_keys:
            key = NIH_LABEL_TO_TASK.get(key, key)
        boxes.append(Box(posixpath.basename(str(row[0]).strip()), label,
                         key if key in task_keys else None, x, y, w, h))
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
    model_options: dict = field(default_factory=dict)   # the trial's head/body options (create_model)


def best_checkpoints(sweep_location: str, tasks: Sequence[str] | None = None,
                     resolutions: Sequence[int] | None = None, data=None) -> list[BestRun]:
    """Per task and resolution the run of analysis.tables.best_runs (the best model's best seed, in
    the sweep's main configuration) and its best checkpoint for that task. ``data``: the
    sweep already loaded (analysis.records.SweepData), to spare a second read."""
    from analysis.records import load_sweep
    from analysis.tables import best_runs
    data = data if data is not None else load_sweep(sweep_location)
    t = data.trials[data.trials["best_auroc"].notna()] if not data.trials.empty else data.trials
    if t.empty:
        raise UserError(f"sweep {storage.display(sweep_location)} has no finished trial with an AUROC")
    if tasks:
        t = t[t["task_key"].isin([task_key(x) for x in tasks])]
    if resolutions:
        t = t[t["resolution"].isin([int(r) for r in resolutions])]
    if t.empty:
        raise UserError("no finished trial matches --tasks / --resolutions")
    records = {r.trial_id: r for r in data.records}
    runs = []
    for _, row in best_runs(t).iterrows():
        rec = records[row["trial_id"]]
        runs.append(BestRun(task_key=row["task_key"], resolution=int(row["resolution"]),
                            model=str(row["model"]), auroc=float(row["best_auroc"]),
                            epoch=int(row["best_epoch"]), trial_id=row["trial_id"],
                            checkpoint=rec.folder.best_checkpoint(row["task_key"]),
                            outputs=_outputs_of(rec.result or {}, rec.config or {}),
                            model_options=_model_options_of(rec.config or {})))
    order = {k: i for i, k in enumerate(TASK_KEYS)}
    return sorted(runs, key=lambda r: (r.resolution, order.get(r.task_key, 99)))


def _outputs_of(result: dict, config: dict) -> list[str]:
    """The model's output order: result.json's ``tasks``, else from the trial's config."""
    if isinstance(result.get("tasks"), list):
        return [task_key(k) for k in result["tasks"]]
    if config.get("task_mode") == "single":
        return [task_key(config["task"])]
    return [task_key(k) for k in config.get("tasks", TASKS)]


def _model_options_of(config: dict) -> dict:
    """The architecture options the trial was built with, so the checkpoint is loaded into the same
    network (a trial config written before these fields existed used today's literal options)."""
    literal = {"head_bn_bias": 0.0, "pool_order": "avg,max", "densenet_final_relu": True}
    return {k: config.get(k, v) for k, v in literal.items()}


def load_model(run: BestRun, device: str = "cpu"):
    """The CXRNet of a best checkpoint (weights loaded by trainer.models with weights_only=True)."""
    from trainer.models import create_model
    if not storage.exists(run.checkpoint):
        raise FileNotFoundError(storage.display(run.checkpoint))
    model = create_model(run.model, run.resolution, outputs=len(run.outputs), weights=run.checkpoint,
                         **run.model_options)
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
                   progress: bool = False, method: str = "gradcam") -> list[Panel]:
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
        cam = gradcam(model, model_input(pixels).to(device), run.outputs.index(run.task_key), method)
        for k, (im, px) in enumerate(zip(images, pixels)):
            panels.append(Panel(run, im, px, cam.heatmaps[k], float(cam.probabilities[k]),
                                cam.feature_map))
        del model
        if device != "cpu":
            torch.cuda.empty_cache()
    return panels


def render(panels: list[Panel], boxes: list[Box] | None = None, method: str = "gradcam") -> bytes:
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
    fig.suptitle(f"{CAM_METHODS.get(method, method)} of the best checkpoint per task and resolution"
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
      --boxes BBox_List_2017.csv --tasks Atelectasis,Cardiomegaly --method gradcam++

--boxes reads NIH ChestX-ray14's BBox_List_2017.csv format (Image Index, Finding Label, x, y, w, h in
pixels of the original image); boxes are drawn where the image name and the finding match a task
(Effusion -> Pleural Effusion). Rows = image x resolution, columns = tasks. The maps are computed
by pytorch-grad-cam on the model's body (its last feature map)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sweep", required=True, help="the sweep's storage location; required")
    parser.add_argument("--images", nargs="+", required=True, help="image files (JPEG, PNG, ...); required")
    parser.add_argument("--boxes", default=None, help="ground-truth boxes, NIH BBox_List CSV format")
    parser.add_argument("--out", default=None, help="output PNG (default: SWEEP/results/gradcam.png)")
    parser.add_argument("--tasks", default=None, help="comma-separated tasks (default: all)")
    parser.add_argument("--resolutions", default=None, help="comma-separated resolutions (default: all)")
    parser.add_argument("--method", default="gradcam", choices=list(CAM_METHODS),
                        help="class-activation method of pytorch-grad-cam")
    parser.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', 'cuda:N'")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _sweep_tasks(data) -> list[str]:
    """Task keys the sweep knows: its store's task list, else the tasks of its trials."""
    names = list((data.manifest or {}).get("tasks") or [])
    keys = [task_key(str(t)) for t in names]
    if not data.trials.empty:
        keys += [k for k in dict.fromkeys(data.trials["task_key"]) if k not in keys]
    return keys or list(TASK_KEYS)


def run(args: argparse.Namespace) -> int:
    from analysis.records import load_sweep
    from common.cli import parse_int_list
    resolutions = parse_int_list(args.resolutions, "--resolutions") if args.resolutions else None
    if not storage.exists(args.sweep):
        raise UserError(f"--sweep: {storage.display(args.sweep)} does not exist")
    data = load_sweep(args.sweep)
    tasks = None
    if args.tasks:
        known = _sweep_tasks(data)
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        for t in tasks:
            if task_key(t) not in known:
                names = dict(zip(TASK_KEYS, TASKS))
                raise UserError(f"--tasks: {t!r} is not a task of this sweep "
                                f"({', '.join(names.get(k, k) for k in known)})")
    images = [read_image(p) for p in args.images]
    if len({storage.display(im.location) for im in images}) != len(images):
        raise UserError("--images: an image is given twice")
    unique_names(images)
    boxes = read_boxes(args.boxes, _sweep_tasks(data)) if args.boxes else []
    device = args.device
    if device == "auto":
        import torch
        device = "cuda" if torch.cuda.is_available() else "cpu"
    runs = best_checkpoints(args.sweep, tasks, resolutions, data=data)
    panels = compute_panels(runs, images, device=device, progress=not args.quiet, method=args.method)
    png = render(panels, boxes, method=args.method)
    out = args.out or storage.join(SweepFolder(args.sweep).results_dir, "gradcam.png")
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
