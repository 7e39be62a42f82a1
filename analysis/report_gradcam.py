"""The report's Grad-CAM figure: the best checkpoint per task and resolution (analysis.gradcam) on
images the user names, or on a default set drawn from the store's validation split.

The default set is the first ``n`` frontal validation images in image-id order, read at the
store's largest resolution (the Grad-CAM preprocessing resizes them down to each trial's
resolution with the store's own filter), so the same sweep always shows the same images.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field

from common import storage

DEFAULT_IMAGES = 2


@dataclass
class CamFigure:
    png: bytes | None
    images: list[str] = field(default_factory=list)   # what the rows show
    note: str = ""                                     # why there is no figure, or what is missing


def store_images(store_location: str, n: int = DEFAULT_IMAGES):
    """The first ``n`` frontal validation images of the store (image-id order) as PNG inputs."""
    import numpy as np
    from PIL import Image

    from analysis.gradcam import InputImage
    from preprocessing.store import open_store
    store = open_store(store_location, verify=False)
    res = max(store.resolutions)
    split = "valid" if "valid" in store.splits else sorted(store.splits)[-1]
    table = store.read(res, split, columns=["image_id", "view", "image"]).to_pandas()
    frontal = table[table["view"] == "Frontal"]
    chosen = (frontal if not frontal.empty else table).sort_values("image_id").head(n)
    images = []
    for _, row in chosen.iterrows():
        pixels = np.asarray(store.decode(row["image"]), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels, mode="L").save(buf, format="PNG")
        images.append(InputImage(storage.join(store_location, split, str(row["image_id"])),
                                 str(row["image_id"]), buf.getvalue(),
                                 (int(pixels.shape[1]), int(pixels.shape[0]))))
    return images


def read_images(paths: list[str]):
    """The user's images; a missing or unreadable one is a UserError naming the flag and file
    (the report is not written with panels the user asked for silently missing)."""
    from analysis.gradcam import read_image
    from common.cli import UserError
    images = []
    for p in paths:
        try:
            images.append(read_image(p))
        except UserError as exc:
            raise UserError(str(exc).replace("--images:", "--gradcam-images:", 1)) from None
    return images


def gradcam_figure(sweep_location: str, store_location: str | None,
                   image_paths: list[str] | None = None, device: str = "cpu",
                   n_default: int = DEFAULT_IMAGES, data=None) -> CamFigure:
    """Grad-CAM panels of the sweep's best checkpoint per task and resolution, or the reason why
    there are none (no checkpoints, no images); never raises for a missing record, only for an
    image the user named that cannot be read."""
    from analysis import gradcam
    images = read_images(image_paths) if image_paths else []
    if not images and not store_location:
        return CamFigure(None, note="no images given and no store to take validation images from")
    try:
        if not images:
            images = store_images(store_location, n_default)
        if not images:
            return CamFigure(None, note="the store's validation split holds no image")
        gradcam.unique_names(images)
        runs = gradcam.best_checkpoints(sweep_location, data=data)   # data: no second read
        panels = gradcam.compute_panels(runs, images, device=device)
    except Exception as exc:   # the report is still worth writing without its Grad-CAM figure
        first = str(exc).strip().splitlines()
        return CamFigure(None, note=f"Grad-CAM failed: {type(exc).__name__}: "
                                    f"{first[0] if first else ''}"[:300])
    errors = sorted({f"{p.run.trial_id}: {p.error}" for p in panels if p.error})
    if panels and len(errors) == len({p.run.trial_id for p in panels}) and all(p.error for p in panels):
        return CamFigure(None, [im.name for im in images],
                         note="no checkpoint could be used: " + "; ".join(errors)[:400])
    return CamFigure(gradcam.render(panels), [im.name for im in images],
                     note=("some panels are missing: " + "; ".join(errors)[:400]) if errors else "")
