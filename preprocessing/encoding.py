"""Lossless encodings of a stored square grayscale image (the store's ``image`` column).

``raw-uint8`` (the default) stores the R*R pixel bytes as they are and lets Parquet's zstd compress
the column; decoding is a zero-copy ``numpy.frombuffer``. It was chosen by measurement against PNG
and lossless WebP (docs/store.md, ``python -m bench.store_bench``): reading is many times faster
and the store is about as large. PNG and WebP remain available (``--encoding``) and readable.
"""
from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

ENCODINGS = ("raw-uint8", "png", "webp-lossless")
DEFAULT_ENCODING = "raw-uint8"
#: Parquet column compression used with each encoding (PNG/WebP bytes do not compress further).
PARQUET_COMPRESSION = {"raw-uint8": "zstd", "png": "none", "webp-lossless": "none"}


def encode_image(pixels: np.ndarray, encoding: str) -> bytes:
    """(H, W) uint8 -> bytes, losslessly."""
    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    if pixels.ndim != 2:
        raise ValueError(f"expected a 2-D grayscale image, got shape {pixels.shape}")
    if encoding == "raw-uint8":
        return pixels.tobytes()
    buf = io.BytesIO()
    if encoding == "png":
        Image.fromarray(pixels, mode="L").save(buf, format="PNG", compress_level=1)
    elif encoding == "webp-lossless":
        Image.fromarray(pixels, mode="L").save(buf, format="WEBP", lossless=True, quality=0, method=0)
    else:
        raise ValueError(f"unknown image encoding {encoding!r} (known: {', '.join(ENCODINGS)})")
    return buf.getvalue()


def decode_image(blob: bytes, encoding: str, shape: tuple[int, int] | None = None) -> np.ndarray:
    """bytes -> (H, W) uint8. ``raw-uint8`` needs ``shape`` unless the image is square."""
    if encoding == "raw-uint8":
        if shape is None:
            side = math.isqrt(len(blob))
            if side * side != len(blob):
                raise ValueError(f"raw-uint8 blob of {len(blob)} bytes is not square: pass shape")
            shape = (side, side)
        arr = np.frombuffer(blob, dtype=np.uint8)
        if arr.size != shape[0] * shape[1]:
            raise ValueError(f"raw-uint8 blob of {len(blob)} bytes does not match shape {shape}")
        return arr.reshape(shape)
    if encoding in ("png", "webp-lossless"):
        with Image.open(io.BytesIO(blob)) as im:
            arr = np.asarray(im.convert("L") if im.mode != "L" else im, dtype=np.uint8)
        if shape is not None and arr.shape != tuple(shape):
            raise ValueError(f"decoded shape {arr.shape} does not match {tuple(shape)}")
        return arr
    raise ValueError(f"unknown image encoding {encoding!r} (known: {', '.join(ENCODINGS)})")
