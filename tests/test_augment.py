"""Augmentation: keyed randomness, identity, geometry and intensity as documented."""
import numpy as np
import torch

from trainer.augment import (IDENTITY, PARAMS, AugmentSettings, augment_batch, identity_params,
                             sample_one, sample_params, to_model_input)

S = AugmentSettings(style="literal")   # the literal style; the fastai style: test_fastai_augment.py


def test_params_are_keyed_by_seed_epoch_index():
    a = sample_params(S, 0, 1, np.arange(10))
    assert a.shape == (10, PARAMS) and a.dtype == np.float32
    assert np.array_equal(a, sample_params(S, 0, 1, np.arange(10)))
    # the same image gets the same draw wherever it sits in a batch
    assert np.array_equal(a[7], sample_params(S, 0, 1, np.array([3, 7]))[1])
    assert not np.array_equal(a, sample_params(S, 0, 2, np.arange(10)))
    assert not np.array_equal(a, sample_params(S, 1, 1, np.arange(10)))


def test_probabilities_and_ranges():
    p = sample_params(S, 0, 1, np.arange(400))
    geometric = ~np.all(p[:, :9] == IDENTITY[:9], axis=1)
    intensity = ~np.all(p[:, 9:] == IDENTITY[9:], axis=1)
    assert 0.65 < geometric.mean() < 0.85 and 0.65 < intensity.mean() < 0.85
    assert np.all((p[:, 9] >= 0.8) & (p[:, 9] <= 1.2)) and np.all(np.abs(p[:, 10]) <= 0.2)
    never = AugmentSettings(style="literal", p_geometric=0, p_intensity=0)
    assert np.array_equal(sample_params(never, 0, 1, np.arange(5)), identity_params(5))


def test_identity_leaves_pixels_unchanged():
    img = torch.randint(0, 256, (3, 1, 16, 16), dtype=torch.uint8)
    for style in ("literal", "fastai"):
        out = augment_batch(img.float() / 255, torch.from_numpy(identity_params(3)), style)
        assert torch.allclose(out, img.float() / 255, atol=1e-5), style


def test_zoom_out_pads_with_black_and_rotation_moves_pixels():
    img = torch.ones(1, 1, 32, 32)
    zoom = IDENTITY.copy()
    zoom[0] = zoom[4] = 1.5  # sample a 1.5x larger area: the border comes from outside -> black
    out = augment_batch(img, torch.from_numpy(zoom[None]), "literal")
    assert out[0, 0, 0, 0] == 0 and out[0, 0, 16, 16] == 1
    # 90 degrees: x' = -y, y' = x  (a column becomes a row)
    bar = torch.zeros(1, 1, 8, 8)
    bar[..., :, 2] = 1
    rot = np.array([0, -1, 0, 1, 0, 0, 0, 0, 1, 1, 0], dtype=np.float32)
    turned = augment_batch(bar, torch.from_numpy(rot[None]), "literal")[0, 0]
    assert torch.allclose(turned.sum(dim=1), torch.tensor([0, 0, 0, 0, 0, 8.0, 0, 0]), atol=1e-4)


def test_intensity_contrast_and_brightness():
    img = torch.tensor([[[[0.2, 0.4], [0.6, 0.8]]]])
    p = IDENTITY.copy()
    p[9], p[10] = 1.2, 0.1  # contrast 1.2 around the mean 0.5, then +0.1
    out = augment_batch(img, torch.from_numpy(p[None]), "literal")
    expected = ((img - 0.5) * 1.2 + 0.5 + 0.1).clamp(0, 1)
    assert torch.allclose(out, expected, atol=1e-5)


def test_model_input_normalises_and_repeats_channels():
    img = torch.full((2, 1, 4, 4), 255, dtype=torch.uint8)
    x = to_model_input(img, None, channels_last=True)
    assert x.shape == (2, 3, 4, 4) and x.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(x[0, :, 0, 0], torch.tensor([(1 - 0.485) / 0.229, (1 - 0.456) / 0.224,
                                                       (1 - 0.406) / 0.225]))


def test_perspective_is_slight_and_nonaffine():
    p = sample_one(AugmentSettings(style="literal", p_geometric=1.0, rotation_deg=0, zoom_out=0), 0, 1, 5)
    h = p[:9].reshape(3, 3)
    assert 0 < np.abs(h[2, :2]).max() < 0.2  # a real projective part, kept small
