"""The fastai augmentation style against fastai's own aug_transforms(max_rotate=30, pad_mode='zeros').

Two claims: with the same draws our pixels are fastai's pixels (flip, warp, rotate, zoom, zeros
padding, logit-space lighting, in fastai's order); and our keyed draws follow fastai's
distributions (flip rate, each part's probability and range, independent parts). fastai is a
test-only dependency; without it these tests skip.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytest.importorskip("fastai.vision.augment")   # a partial fastai install skips, not errors
pytest.importorskip("scipy")
from fastai.torch_core import TensorImage  # noqa: E402
from fastai.vision import augment as fa  # noqa: E402
from scipy.stats import ks_2samp  # noqa: E402

from trainer.augment import AugmentSettings, augment_batch, fastai_draws, fastai_params  # noqa: E402

N = 2000                      # images per distribution sample
SETTINGS = AugmentSettings()  # the default: fastai style with aug_transforms' numbers


def _thesis_tfms():
    """What the thesis's code used: aug_transforms(max_rotate=30, pad_mode='zeros')."""
    return fa.aug_transforms(max_rotate=30, pad_mode="zeros")


def test_pixels_equal_fastais_for_the_same_draws():
    torch.manual_seed(0)
    x = torch.rand(4, 1, 24, 24)
    draws = {"flip": [1, 0, 1, 0], "warp_x": [0.1, -0.15, 0.0, 0.19],
             "warp_y": [-0.05, 0.12, 0.2, 0.0], "rotate_deg": [20.0, -7.0, 29.0, 0.0],
             "zoom": [1.05, 1.0, 1.09, 1.02], "zoom_col": [0.3, 0.5, 0.9, 0.0],
             "zoom_row": [0.8, 0.1, 0.5, 1.0], "brightness": [0.45, 0.5, 0.58, 0.41],
             "contrast": [1.1, 0.85, 1.0, 1.2]}
    pad = {"pad_mode": "zeros"}
    # aug_transforms' parts in its order, each told its draws (p=1: always applied)
    parts = [fa.Flip(p=1.0, draw=draws["flip"], **pad),
             fa.Warp(magnitude=0.2, p=1.0, draw_x=draws["warp_x"], draw_y=draws["warp_y"], **pad),
             fa.Rotate(max_deg=30, p=1.0, draw=draws["rotate_deg"], **pad),
             fa.Zoom(max_zoom=1.1, p=1.0, draw=draws["zoom"], draw_x=draws["zoom_col"],
                     draw_y=draws["zoom_row"], **pad),
             fa.Brightness(max_lighting=0.2, p=1.0, draw=draws["brightness"]),
             fa.Contrast(max_lighting=0.2, p=1.0, draw=draws["contrast"])]
    theirs = TensorImage(x.clone())
    for tfm in fa.setup_aug_tfms(parts):
        theirs = tfm(theirs, split_idx=0)
    params = np.stack([fastai_params(**{k: v[i] for k, v in draws.items()}) for i in range(4)])
    ours = augment_batch(x.clone(), torch.from_numpy(params), "fastai")
    assert torch.as_tensor(theirs).abs().sum() > 0
    torch.testing.assert_close(ours, torch.as_tensor(theirs).as_subclass(torch.Tensor),
                               rtol=0, atol=1e-4)
    # zeros padding: a rotated corner comes from outside the image and stays (near) black
    assert float(ours[2, 0, 0, 0]) < 1e-3


def _fastai_sample(n: int) -> dict[str, np.ndarray]:
    """n images' draws from aug_transforms itself, read back from its matrices and changes."""
    torch.manual_seed(0)
    tfms = _thesis_tfms()
    assert [type(t).__name__ for t in tfms] == ["Flip", "Brightness"]   # composed: affine, lighting
    affine, lighting = tfms
    x = TensorImage(torch.zeros(n, 1, 4, 4))
    affine.before_call(x, split_idx=0)
    for t in affine.coord_fs:
        t.before_call(x)
    lighting.before_call(x, split_idx=0)
    m = affine.mat.double()                                           # n, 2, 3 = (flip rot zoom)[:2]
    s = torch.hypot(m[:, 1, 0], m[:, 1, 1])                          # 1 / zoom
    det = m[:, 0, 0] * m[:, 1, 1] - m[:, 0, 1] * m[:, 1, 0]          # flip * s^2
    theta = torch.atan2(-m[:, 1, 0], m[:, 1, 1])
    targ = affine.coord_fs[0].targ_pts.double()                      # n, 4, 2
    return {"flip": (det < 0).numpy(), "rotate_deg": torch.rad2deg(theta).numpy(),
            "zoom": (1 / s).numpy(), "warp_x": (-1 - targ[:, 0, 1]).numpy(),
            "warp_y": (-1 - targ[:, 0, 0]).numpy(),
            "brightness": lighting.fs[0].change.double().numpy(),
            "contrast": lighting.fs[1].change.double().numpy()}


def _our_sample(n: int) -> dict[str, np.ndarray]:
    draws = [fastai_draws(SETTINGS, 0, 1, i) for i in range(n)]
    return {k: np.array([d[k] for d in draws], dtype=np.float64 if k != "flip" else bool)
            for k in draws[0]}


NEUTRAL = {"rotate_deg": 0.0, "zoom": 1.0, "warp_x": 0.0, "warp_y": 0.0, "brightness": 0.5,
           "contrast": 1.0}
RANGE = {"rotate_deg": (-30, 30), "zoom": (1.0, 1.1), "warp_x": (-0.2, 0.2),
         "warp_y": (-0.2, 0.2), "brightness": (0.4, 0.6), "contrast": (0.8, 1.25)}


@pytest.fixture(scope="module")
def samples():
    return _our_sample(N), _fastai_sample(N)


def _applied(values: np.ndarray, neutral: float) -> np.ndarray:
    return np.abs(values - neutral) > 1e-6


def test_flip_rate(samples):
    ours, theirs = samples
    sigma = math.sqrt(0.25 / N)
    assert abs(ours["flip"].mean() - 0.5) < 4 * sigma and abs(theirs["flip"].mean() - 0.5) < 4 * sigma


@pytest.mark.parametrize("part", list(NEUTRAL))
def test_each_part_has_fastais_probability_range_and_distribution(samples, part):
    ours, theirs = samples
    a, b = ours[part], theirs[part]
    pa, pb = _applied(a, NEUTRAL[part]).mean(), _applied(b, NEUTRAL[part]).mean()
    assert abs(pa - pb) < 4 * math.sqrt(2 * 0.75 * 0.25 / N), (pa, pb)
    lo, hi = RANGE[part]
    for v in (a, b):
        assert v.min() >= lo - 1e-5 and v.max() <= hi + 1e-5
    # the whole distribution (the neutral atom and the spread) is fastai's; fastai's values are
    # float32, so its neutral atom sits within ~1e-7 of the exact value
    assert ks_2samp(np.round(a, 6), np.round(b, 6)).pvalue > 1e-3, part


def test_parts_are_drawn_independently(samples):
    """fastai draws one Bernoulli per part: rotation and zoom together ~ 0.75^2, not 0.75."""
    ours, theirs = samples
    for sample in (ours, theirs):
        both = (_applied(sample["rotate_deg"], 0) & _applied(sample["zoom"], 1)).mean()
        assert abs(both - 0.75 ** 2) < 4 * math.sqrt(0.5625 * 0.4375 / N), both
