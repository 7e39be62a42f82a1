"""Decode a source image once and produce every requested square resolution from that decode.

The output of every resolution is grayscale (mode ``L``), square and resized with Pillow's Lanczos
filter from the WHOLE image: a non-square source is squashed to R x R, never cropped, so nothing
near the border (costophrenic angles, apices) is lost and every resolution sees the same anatomy.

The definition the store is held to is :func:`reference_resize`: full decode, Lanczos straight to
R x R. A Lanczos pass costs in proportion to the pixels it reads, so five of them from a 6-megapixel
film cost five times one. The default path decodes once at full size, shrinks the film with an
antialiased bicubic filter (Pillow's kernel, run by torch's uint8 fast path: :func:`bicubic`), aspect
kept, to ``reduce_factor`` (1.75) x R on its short side, and takes Lanczos from there; each smaller
resolution starts from the last such image still large enough (a pyramid). The
bicubic step's passband reaches far above the final Nyquist limit and its stopband folds almost
nothing into it, so the result stays >= 50 dB PSNR of the reference on films with burned-in text,
markers and collimation edges (tests/test_resize.py; measured in docs/store.md). ``reduce_factor=None``
gives the reference exactly.

A reduced JPEG decode (libjpeg's DCT scaling, ``Image.draft``, ``draft_factor``) stays available but
is off: it saves almost no decoding time, and its block-wise truncation aliases thin saturated strokes
into every band (about 41 dB on such films).

Conversions that change the pixel values are reported (never silent): colour images become ``L``
with Pillow's ITU-R 601-2 luma transform, 16-bit / 32-bit images are scaled to 0..255 by their own
minimum and maximum (a monotone window that keeps all contrast), other modes go through ``convert``.
"""
from __future__ import annotations

import io
import math
import re
import warnings
from dataclasses import dataclass
from typing import Iterable

import numpy as np
from PIL import Image

#: Reduced (DCT-scaled) JPEG decode: off by default. It saves almost no decoding time (entropy
#: decoding dominates) and departs from a full decode by up to 17 dB more than the floor allows on
#: films with burned-in text (docs/store.md). Kept as an option (--draft-factor).
DEFAULT_DRAFT_FACTOR = None
#: Bicubic pre-reduction to this factor x the largest resolution before the Lanczos step; smaller
#: resolutions use levels of PYRAMID_FACTOR x R, made when the last level exceeds PYRAMID_GAP x R.
#: Chosen by measurement (docs/store.md): worst PSNR and images/s on films with burned-in text.
DEFAULT_REDUCE_FACTOR = 1.75
#: Which implementation made the bicubic levels: part of every shard's key and of the manifest, so
#: that a store resumed after an upgrade never mixes pixels of two implementations.
PYRAMID_VERSION = 2
PYRAMID_FACTOR = 3.0
PYRAMID_GAP = 3.75
LANCZOS = Image.Resampling.LANCZOS
#: A source whose short side is below 1/MAX_UPSCALE of the largest resolution is flagged degenerate.
MAX_UPSCALE = 4.0
#: A source longer than MAX_ASPECT_RATIO x its short side is flagged degenerate (chest films are
#: about 0.8-1.25; a lateral or a cropped film stays well inside 3:1).
MAX_ASPECT_RATIO = 3.0


class ImageRejected(Exception):
    """The source image cannot be used; ``str(exc)`` is the reason written to rejects.csv."""


@dataclass
class Resized:
    images: dict[int, np.ndarray]     # resolution -> (R, R) uint8
    source_size: tuple[int, int]      # (width, height) of the source file
    source_mode: str                  # Pillow mode of the source file ('L', 'RGB', 'I;16', ...)
    conversion: str | None            # e.g. 'RGB->L', 'I;16->L (min-max scaled)'; None for 8-bit L
    decoded_size: tuple[int, int]     # (width, height) actually decoded (smaller when draft was used)
    degenerate: str | None = None     # degenerate_reason() of the source, None when fine


def _to_gray8(image: Image.Image) -> tuple[Image.Image, str | None]:
    mode = image.mode
    if mode == "L":
        return image, None
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = np.zeros(arr.shape, np.uint8) if hi <= lo else \
            np.rint((arr - lo) * (255.0 / (hi - lo))).astype(np.uint8)
        return Image.fromarray(scaled, mode="L"), f"{mode}->L (min-max scaled)"
    if mode in ("LA", "RGBA", "PA"):
        # Transparency has no meaning for a radiograph; drop alpha before the luma transform.
        image = image.convert("RGB") if mode != "LA" else image.getchannel(0)
    return image.convert("L"), f"{mode}->L"


_ADDRESS = re.compile(r"\s*(?:at )?0x[0-9a-fA-F]+")


def stable_text(exc: BaseException) -> str:
    """The first line of an exception's message without memory addresses, so that the same bad
    input always gives the same reject reason (rejects.csv is compared between builds)."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return _ADDRESS.sub("", text).strip() or type(exc).__name__


def degenerate_reason(source_size: tuple[int, int], resolutions: Iterable[int]) -> str | None:
    """Why a decodable source makes a poor stored image, or None.

    Such images are stored (the label is still valid and the user chose the data) but counted, warned
    about in the build summary and listed in the manifest: a square resize invents detail when it
    upscales a tiny source, and squashes anatomy beyond recognition from a strip-shaped one.
    """
    width, height = source_size
    short, long = min(width, height), max(width, height)
    largest = max(int(r) for r in resolutions)
    if short <= 0:
        return "empty image"
    if long / short > MAX_ASPECT_RATIO:
        return f"extreme aspect ratio (more than {MAX_ASPECT_RATIO:g}:1)"
    if largest / short > MAX_UPSCALE:
        return f"upscaled more than {MAX_UPSCALE:g}x (short side below 1/{MAX_UPSCALE:g} of the largest resolution)"
    return None


def open_image(data: bytes, draft_size: tuple[int, int] | None = None) -> tuple[Image.Image, str, tuple[int, int]]:
    """Decode ``data`` fully (or at a reduced JPEG scale >= ``draft_size``).

    Returns (decoded image, source mode, source size). Undecodable or truncated data raises
    :class:`ImageRejected` with the reason.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            source_mode, source_size = image.mode, image.size
            if draft_size is not None and image.format == "JPEG":
                # Ask libjpeg for L directly: for a colour JPEG it does the luma transform itself.
                image.draft("L", draft_size)
            image.load()
    except ImageRejected:
        raise
    except Image.DecompressionBombWarning as exc:
        raise ImageRejected(f"image too large: {stable_text(exc)}") from None
    except Image.UnidentifiedImageError:
        # Its message names the in-memory stream ("<_io.BytesIO object at 0x...>"): not stable text.
        raise ImageRejected("undecodable image: not a recognised image format") from None
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ... for bad files
        text = stable_text(exc)
        if "truncated" in text.lower():
            raise ImageRejected(f"truncated image: {text}") from None
        raise ImageRejected(f"undecodable image: {text}") from None
    return image, source_mode, source_size


def resize_image(data: bytes, resolutions: Iterable[int], draft_factor: float | None = None,
                 reduce_factor: float | None = DEFAULT_REDUCE_FACTOR) -> Resized:
    """Decode ``data`` once and return every resolution (grayscale, squashed square, Lanczos).

    ``reduce_factor`` (module docstring): first shrink the decoded image with Pillow's bicubic filter,
    keeping its aspect ratio, to ``reduce_factor`` x the resolution on its short side, then Lanczos to
    R x R. Each smaller resolution starts from the smallest such image made so far (a pyramid), so
    only the first reduction reads the full-size image. ``reduce_factor=None`` and ``draft_factor=None`` give exactly
    :func:`reference_resize`.
    """
    resolutions = sorted({int(r) for r in resolutions}, reverse=True)
    if not resolutions:
        raise ValueError("no resolutions requested")
    draft_size = None
    if draft_factor is not None:
        side = int(math.ceil(resolutions[0] * float(draft_factor)))
        draft_size = (side, side)
    image, source_mode, source_size = open_image(data, draft_size)
    gray, conversion = _to_gray8(image)
    if conversion is None and source_mode != "L":
        conversion = f"{source_mode}->L"   # the JPEG decoder already converted (draft to 'L')
    try:
        if reduce_factor is None:
            out = {r: np.asarray(gray.resize((r, r), LANCZOS), dtype=np.uint8) for r in resolutions}
        else:
            out = _pyramid(gray, resolutions, float(reduce_factor))
    except Exception as exc:  # e.g. a zero-sized image
        raise ImageRejected(f"cannot resize image: {stable_text(exc)}") from None
    return Resized(images=out, source_size=source_size, source_mode=source_mode,
                   conversion=conversion, decoded_size=gray.size,
                   degenerate=degenerate_reason(source_size, resolutions))


def _pyramid(gray: Image.Image, resolutions: list[int], reduce_factor: float) -> dict[int, np.ndarray]:
    """Lanczos to each resolution (descending) from a bicubic pyramid: the first level is
    ``reduce_factor`` x the largest resolution on the short side, a new level (PYRAMID_FACTOR x R) is
    made when the current one exceeds PYRAMID_GAP x R. Only the first level reads the full image.
    The Lanczos step stays Pillow's, the store's definition."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # one image per core, like the shard task running it
    try:
        level = np.asarray(gray, dtype=np.uint8)
        source, out = gray, {}
        for i, r in enumerate(resolutions):
            height, width = level.shape
            target = r * (reduce_factor if i == 0 else PYRAMID_FACTOR)
            if min(height, width) > (target / 0.8 if i == 0 else r * PYRAMID_GAP):
                scale = target / min(height, width)
                level = bicubic(level, max(1, round(height * scale)), max(1, round(width * scale)))
                source = Image.fromarray(level, mode="L")
            out[r] = np.asarray(source.resize((r, r), LANCZOS), dtype=np.uint8)
        return out
    finally:
        torch.set_num_threads(threads)


#: Columns packed into one pixel for torch's resize: its uint8 antialiased kernels have a fast
#: path for 3- and 4-channel images; with the copies saved below, ~5x its one-channel path.
PACKED_COLUMNS = 4


def bicubic(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Antialiased bicubic (Pillow's kernel, a = -0.5) of a (H, W) uint8 array to (height, width).

    Two one-axis passes, rows then columns (through a transpose), each with PACKED_COLUMNS
    neighbouring columns packed as the channels of one pixel: a pass along one axis treats the other
    axis's pixels independently, so the packing changes nothing but the speed."""
    return np.ascontiguousarray(_resize_rows(np.ascontiguousarray(_resize_rows(image, height).T), width).T)


def _resize_rows(image: np.ndarray, rows: int) -> np.ndarray:
    """Resample the column axis of a contiguous (H, W) uint8 array to ``rows``, columns independent."""
    import torch
    import torch.nn.functional as F

    height, width = image.shape
    if rows == height:
        return image
    packed = width - width % PACKED_COLUMNS
    out = np.empty((rows, width), np.uint8)
    with warnings.catch_warnings():
        # Pillow hands numpy a read-only buffer; torch only reads it (no second copy).
        warnings.simplefilter("ignore", UserWarning)
        pixels = torch.from_numpy(image)
    if packed:
        main = pixels if packed == width else pixels[:, :packed].contiguous()
        done = out if packed == width else np.empty((rows, packed), np.uint8)
        # (H, W/C, C) is a channels-last (1, C, H, W/C) image; the kernel F.interpolate calls
        # writes straight into ``done`` through the same view (F.interpolate itself would return
        # channels-first: two copies). tests/test_resize.py holds it to F.interpolate's pixels.
        torch.ops.aten._upsample_bicubic2d_aa.out(
            _as_channels(main, PACKED_COLUMNS), [rows, packed // PACKED_COLUMNS], False, None, None,
            out=_as_channels(torch.from_numpy(done), PACKED_COLUMNS))
        if done is not out:
            out[:, :packed] = done
    if packed != width:
        rest = pixels[:, packed:].contiguous()[None, None]
        out[:, packed:] = F.interpolate(rest, size=(rows, width - packed), mode="bicubic",
                                        antialias=True, align_corners=False)[0, 0].numpy()
    return out


def _as_channels(plane, channels: int):
    """A (H, W) tensor viewed as a channels-last (1, channels, H, W/channels) image."""
    height, width = plane.shape
    return plane.view(height, width // channels, channels).permute(2, 0, 1)[None]


def reference_resize(data: bytes, resolution: int) -> np.ndarray:
    """The definition the store is held to: full decode, grayscale, Lanczos to R x R."""
    image, _, _ = open_image(data, None)
    gray, _ = _to_gray8(image)
    return np.asarray(gray.resize((resolution, resolution), LANCZOS), dtype=np.uint8)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two uint8 images (inf when equal)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(255.0 ** 2 / mse)
