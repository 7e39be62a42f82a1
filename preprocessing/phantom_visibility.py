"""How much of each planted finding survives the store's resize: the phantom's resolution answer,
measured (``python -m preprocessing phantom --visibility``, docs/data.md)."""
from __future__ import annotations

from dataclasses import asdict

import numpy as np
from PIL import Image

from preprocessing.phantom import TASK_DESIGN, ImageSpec, render_image


def finding_signal(spec: ImageSpec, task: str) -> np.ndarray:
    """What ``task``'s finding adds to the 8-bit image at source size (float, height x width).

    The same spec is rendered with and without the finding (everything else identical: each finding
    draws from its own random stream), so anatomy and noise cancel exactly.
    """
    with_f = ImageSpec(**{**asdict(spec), "findings": {**spec.findings, task: spec.findings.get(task, 1.0)}})
    without = ImageSpec(**{**asdict(spec), "findings": {k: v for k, v in spec.findings.items() if k != task}})
    return render_image(with_f).astype(np.float32) - render_image(without).astype(np.float32)


def lanczos_square(pixels: np.ndarray, resolution: int) -> np.ndarray:
    """The store's resize (Pillow Lanczos to a square) in float, without the 8-bit rounding."""
    return np.asarray(Image.fromarray(pixels.astype(np.float32), "F").resize((resolution, resolution), Image.LANCZOS))


def visibility_table(resolutions=(160, 240, 320, 400, 480), images: int = 4, size: int = 1400,
                     seed: int = 0) -> dict:
    """Per task and resolution: % of the finding's RMS (at source size) left after the resize.

    A zero-mean band-limited pattern keeps its RMS under resampling while it is below the new
    Nyquist limit, so 100 % = fully kept and ~0 % = destroyed. The resize is linear, so resizing the
    difference equals the difference of the resized images (before the store rounds to 8 bits,
    which removes anything much below 0.5 grey levels as well). Mean over ``images`` frontal images.
    """
    table = {}
    for task in TASK_DESIGN:
        kept = {r: [] for r in resolutions}
        for i in range(images):
            spec = ImageSpec(path="x", width=size, height=int(size * 1.1), view="Frontal",
                             seed=[seed, 9, i], patient_seed=[seed, 8, i], findings={task: 0.7})
            diff = finding_signal(spec, task)
            full = float(np.sqrt(np.mean(diff ** 2)))
            for r in resolutions:
                kept[r].append(float(np.sqrt(np.mean(lanczos_square(diff, r) ** 2))) / full)
        table[task] = {r: round(100 * float(np.mean(v)), 1) for r, v in kept.items()}
    return table
