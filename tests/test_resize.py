"""Decode once, every resolution: exactness of the full decode, PSNR of the reduced JPEG decode."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from bench.store_bench import synthetic_radiograph
from preprocessing.encoding import ENCODINGS, decode_image, encode_image
from preprocessing.resize import ImageRejected, psnr, reference_resize, resize_image


def jpeg(pixels: np.ndarray, quality=95, mode="L") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="module")
def radiograph() -> bytes:
    # Large enough that libjpeg can decode at 1/2 (and 1/4) scale for the resolutions below.
    return jpeg(synthetic_radiograph(1160, 1416, seed=7))


def test_full_decode_equals_reference_for_every_resolution(radiograph):
    result = resize_image(radiograph, [96, 48, 160], draft_factor=None)
    assert sorted(result.images) == [48, 96, 160]
    assert result.decoded_size == result.source_size == (1160, 1416) and result.conversion is None
    for r, img in result.images.items():
        assert img.shape == (r, r) and img.dtype == np.uint8
        np.testing.assert_array_equal(img, reference_resize(radiograph, r))


@pytest.mark.parametrize("factor", [2.0, 1.0])
def test_reduced_jpeg_decode_stays_within_50db(radiograph, factor):
    resolutions = [128, 256, 288] if factor == 2.0 else [160, 288]
    result = resize_image(radiograph, resolutions, draft_factor=factor)
    # The decode really was reduced (else the test would prove nothing) ...
    assert result.decoded_size[0] < 1160
    assert min(result.decoded_size) >= factor * max(resolutions)
    # ... and every resolution is within 50 dB PSNR of the full-decode Lanczos reference.
    for r in resolutions:
        assert psnr(result.images[r], reference_resize(radiograph, r)) >= 50.0, r


def test_non_square_source_is_squashed_not_cropped():
    pixels = np.zeros((300, 150), np.uint8)
    pixels[:, :75] = 255          # left half white: a crop to the centre square would keep 50 % white
    pixels[:30, :] = 255          # a top band a centre crop would cut away
    img = resize_image(jpeg(pixels, quality=100), [32], draft_factor=None).images[32]
    assert img.shape == (32, 32)
    assert img[0, 24] > 200       # the top band survives (squash keeps the whole height)
    assert img[20, 4] > 200 and img[20, 28] < 50


def test_conversions_are_reported():
    gray = synthetic_radiograph(200, 240, seed=1)
    rgb = resize_image(jpeg(gray, mode="RGB"), [16], draft_factor=None)
    assert rgb.conversion == "RGB->L" and rgb.source_mode == "RGB"
    rgb_draft = resize_image(jpeg(gray, mode="RGB"), [16])
    assert rgb_draft.conversion == "RGB->L"
    buf = io.BytesIO()
    Image.fromarray(gray.astype(np.uint16) * 200 + 500).save(buf, format="PNG")
    deep = resize_image(buf.getvalue(), [16])
    assert deep.source_mode.startswith("I") and "min-max scaled" in deep.conversion
    assert deep.images[16].max() >= 200
    assert resize_image(jpeg(gray), [16]).conversion is None


@pytest.mark.parametrize("data,reason", [(b"", "undecodable"), (b"GIF89a not really", "undecodable")])
def test_undecodable_input_is_rejected(data, reason):
    with pytest.raises(ImageRejected, match=reason):
        resize_image(data, [16])


def test_truncated_jpeg_is_rejected():
    data = jpeg(synthetic_radiograph(400, 400, seed=2))
    with pytest.raises(ImageRejected, match="truncated"):
        resize_image(data[: len(data) // 2], [16], draft_factor=None)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_encodings_are_lossless(encoding):
    pixels = synthetic_radiograph(48, 48, seed=3)
    blob = encode_image(pixels, encoding)
    np.testing.assert_array_equal(decode_image(blob, encoding), pixels)
    with pytest.raises(ValueError):
        encode_image(pixels, "jpeg")


def test_reduced_decode_on_a_phantom_radiograph_with_every_finding():
    """The demo data's finest findings (docs/data.md) must survive the reduced decode too."""
    phantom = pytest.importorskip("preprocessing.phantom")
    if not hasattr(phantom, "ImageSpec") or not hasattr(phantom, "render_image"):
        pytest.skip("preprocessing.phantom has no ImageSpec/render_image")
    findings = {t: 1.0 for t in phantom.TASK_DESIGN}
    spec = phantom.ImageSpec(path="x", width=1940, height=2240, view="Frontal", seed=[5, 1, 1, 1, 1],
                             patient_seed=[5, 2, 1], findings=findings)
    data = jpeg(phantom.render_image(spec))
    result = resize_image(data, [160, 480])               # default draft factor
    assert result.decoded_size == (970, 1120)             # decoded at 1/2 scale
    for r in (160, 480):
        assert psnr(result.images[r], reference_resize(data, r)) >= 50.0, r
