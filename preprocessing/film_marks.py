"""What real films carry besides anatomy: burned-in text, a laterality marker, collimation edges.

They matter to the store, not to the labels: thin saturated strokes and hard edges hold energy at
every spatial frequency, which is where a reduced (DCT-scaled) JPEG decode departs most from a full
one (docs/store.md). Measured on real radiographs, such films were the worst case; the phantom
draws them so that tests and the store benchmark see them too.

The marks are drawn from their own random stream keyed by the image (never by its labels), after
exposure and noise, so they are identical with and without a finding and carry no label signal:

- collimation (on 3 in 4 films): everything outside a rectangle inset 0.5-5 % per side is set to
  one level, bright (shutter processing) or black, with a hard one-pixel edge;
- a laterality marker: "L" or "R", 4-6 % of the film's height, white, in a white box outline;
- 1-3 lines of burned-in text (projection, a date, an accession number), 1.2-2.2 % of the height,
  white, in a corner.

Text smaller than 7 px is left out (tiny test images); the collimation edge is always kept.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

#: Random stream of the marks: (image seed..., MARKS_STREAM); findings use 0..4.
MARKS_STREAM = 77
MIN_TEXT_PX = 7
WORDS = ("PORTABLE", "AP SUPINE", "PA ERECT", "UPRIGHT", "SEMI-ERECT", "CHEST 1 VIEW", "INSP")


def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def add_film_marks(pixels: np.ndarray, seed) -> np.ndarray:
    """A copy of ``pixels`` (uint8, height x width) with collimation, a marker and text burned in."""
    rng = np.random.default_rng([*seed, MARKS_STREAM])
    height, width = pixels.shape
    image = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8), mode="L")
    draw = ImageDraw.Draw(image)
    insets = rng.uniform(0.005, 0.05, 4)
    x0, y0 = int(insets[0] * width), int(insets[1] * height)
    x1, y1 = width - int(insets[2] * width), height - int(insets[3] * height)
    collimate = rng.random() < 0.75
    shutter = int(rng.integers(225, 256)) if rng.random() < 0.6 else 0
    if collimate:
        for box in ((0, 0, width, y0), (0, y1, width, height), (0, 0, x0, height), (x1, 0, width, height)):
            if box[2] > box[0] and box[3] > box[1]:
                draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=shutter)
    else:
        x0, y0, x1, y1 = 0, 0, width, height
    field_w, field_h = x1 - x0, y1 - y0

    marker_px = int(round(height * rng.uniform(0.04, 0.06)))
    if marker_px >= MIN_TEXT_PX:
        letter = "L" if rng.random() < 0.5 else "R"
        font = _font(marker_px)
        left = rng.random() < 0.5
        mx = x0 + int(field_w * rng.uniform(0.04, 0.12)) if left else x1 - int(field_w * rng.uniform(0.10, 0.18))
        my = y0 + int(field_h * rng.uniform(0.03, 0.10))
        pad = max(2, marker_px // 6)
        l, t, r, b = draw.textbbox((mx, my), letter, font=font)
        draw.rectangle((l - pad, t - pad, r + pad, b + pad), outline=255, width=max(1, marker_px // 12))
        draw.text((mx, my), letter, fill=255, font=font)

    text_px = int(round(height * rng.uniform(0.012, 0.022)))
    if text_px >= MIN_TEXT_PX:
        font = _font(text_px)
        lines = [WORDS[int(rng.integers(len(WORDS)))],
                 f"20{int(rng.integers(10, 27)):02d}-{int(rng.integers(1, 13)):02d}-{int(rng.integers(1, 29)):02d} "
                 f"{int(rng.integers(0, 24)):02d}:{int(rng.integers(0, 60)):02d}",
                 f"ACC {int(rng.integers(10 ** 7, 10 ** 8))}"][: int(rng.integers(1, 4))]
        corner = int(rng.integers(4))
        tx = x0 + int(field_w * 0.03) if corner % 2 == 0 else x1 - int(field_w * 0.35)
        ty = y0 + int(field_h * 0.03) if corner < 2 else y1 - int(field_h * 0.03) - len(lines) * int(text_px * 1.3)
        for i, line in enumerate(lines):
            draw.text((tx, ty + i * int(text_px * 1.3)), line, fill=255, font=font)
    return np.asarray(image, dtype=np.uint8).copy()
