"""Training-time augmentation (PROTOCOL.md): rotation, brightness/contrast, black-pixel padding
(zoom-out) and a slight perspective warp, drawn on the CPU and applied on the device.

Two halves, so that the result never depends on where or in how many processes it runs:

* :func:`sample_params` (loader workers, numpy) draws each image's parameters from a generator keyed
  by ``(seed, epoch, sample index)``. The same image in the same epoch gets the same transform
  whatever the number of workers, and a resumed run sees exactly what an uninterrupted one would.
  The result is a small ``(N, PARAMS)`` float32 array: a 3x3 homography and two intensity numbers.
* :func:`augment_batch` (the training device, torch) applies a whole batch at once: intensity
  change, then one ``grid_sample`` through each image's homography with zeros padding (the black
  pixels). It runs in fp32 on whatever device the batch is on, so the CPU path and the GPU path are
  the same code.

Normalisation to the network's input (:func:`to_model_input`) also lives here: it is the step
after augmentation on the device (grayscale -> 3 channels, ImageNet mean/std).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

#: Per-image parameter vector: H (row-major 3x3, output -> input normalised coordinates),
#: contrast factor, brightness shift.
PARAMS = 11
IDENTITY = np.array([1, 0, 0, 0, 1, 0, 0, 0, 1, 1, 0], dtype=np.float32)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# A constant mixed into every key so augmentation streams never collide with other numpy streams
# that might be keyed by (seed, epoch, ...) elsewhere.
_STREAM = 0xA9C3


@dataclass(frozen=True)
class AugmentSettings:
    """The augmentation half of TrainConfig (see trainer/config.py for meanings and defaults)."""
    p_geometric: float = 0.75
    p_intensity: float = 0.75
    rotation_deg: float = 30.0
    brightness: float = 0.2
    contrast: float = 0.2
    zoom_out: float = 0.2
    perspective: float = 0.1

    @classmethod
    def from_config(cls, cfg) -> "AugmentSettings":
        return cls(p_geometric=cfg.aug_p_geometric, p_intensity=cfg.aug_p_intensity,
                   rotation_deg=cfg.aug_rotation_deg, brightness=cfg.aug_brightness,
                   contrast=cfg.aug_contrast, zoom_out=cfg.aug_zoom_out,
                   perspective=cfg.aug_perspective)


_CORNERS = np.array([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]])


def _homography(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 3x3 homography mapping the 4 points ``src`` onto ``dst`` (direct linear solve)."""
    a = np.zeros((8, 8))
    b = np.zeros(8)
    for i, ((x, y), (u, v)) in enumerate(zip(src, dst)):
        a[2 * i] = [x, y, 1, 0, 0, 0, -u * x, -u * y]
        a[2 * i + 1] = [0, 0, 0, x, y, 1, -v * x, -v * y]
        b[2 * i], b[2 * i + 1] = u, v
    h = np.linalg.solve(a, b)
    return np.append(h, 1.0).reshape(3, 3)


def sample_one(settings: AugmentSettings, seed: int, epoch: int, index: int) -> np.ndarray:
    """Parameters of one image, a pure function of ``(seed, epoch, index)``."""
    rng = np.random.default_rng([_STREAM, seed, epoch, index])
    # Always draw every number, used or not, so the stream never depends on the probabilities.
    u = rng.random(12)
    out = IDENTITY.astype(np.float64).copy()
    if u[0] < settings.p_geometric:
        theta = math.radians(settings.rotation_deg) * (2 * u[1] - 1)
        scale = 1.0 + settings.zoom_out * u[2]          # sample a larger area -> image shrinks
        offsets = settings.perspective * (2 * u[4:12].reshape(4, 2) - 1)
        warp = _homography(_CORNERS, _CORNERS + offsets)  # output corners -> jittered input corners
        c, s = math.cos(theta), math.sin(theta)
        rot_scale = np.array([[c * scale, -s * scale, 0], [s * scale, c * scale, 0], [0, 0, 1]])
        h = rot_scale @ warp
        out[:9] = (h / h[2, 2]).ravel()
    if u[3] < settings.p_intensity:
        v = rng.random(2)
        out[9] = 1.0 + settings.contrast * (2 * v[0] - 1)
        out[10] = settings.brightness * (2 * v[1] - 1)
    return out.astype(np.float32)


def sample_params(settings: AugmentSettings, seed: int, epoch: int,
                  indices: np.ndarray) -> np.ndarray:
    """(N,) global sample indices -> (N, PARAMS) float32 parameters."""
    if len(indices) == 0:
        return np.zeros((0, PARAMS), dtype=np.float32)
    return np.stack([sample_one(settings, seed, epoch, int(i)) for i in indices])


def identity_params(n: int) -> np.ndarray:
    return np.tile(IDENTITY, (n, 1))


def _pixel_centres(size: int, device: torch.device) -> torch.Tensor:
    """(size,) pixel-centre coordinates in [-1, 1] (grid_sample's align_corners=False)."""
    return (torch.arange(size, device=device, dtype=torch.float32) * 2 + 1) / size - 1


def homography_grid(h: torch.Tensor, size: int) -> torch.Tensor:
    """(N, 3, 3) output->input homographies -> (N, size, size, 2) sampling grid.

    Each of the three homogeneous planes is h[:, r, 0] * x + h[:, r, 1] * y + h[:, r, 2], a sum of a
    column term and a row term, so it is built by broadcasting (N, 1, R) + (N, R, 1) instead of a
    (N, R*R, 3) product: about half the memory traffic.
    """
    n = h.shape[0]
    c = _pixel_centres(size, h.device)
    xs = c.view(1, 1, size)
    ys = c.view(1, size, 1)

    def plane(r: int) -> torch.Tensor:
        return (h[:, r, 0].view(n, 1, 1) * xs) + (h[:, r, 1].view(n, 1, 1) * ys + h[:, r, 2].view(n, 1, 1))

    w = plane(2).clamp_(min=1e-6)
    return torch.stack([plane(0).div_(w), plane(1).div_(w)], dim=-1)


def augment_batch(images01: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Apply per-image parameters to a batch.

    images01: (N, 1, R, R) float32 in [0, 1]; params: (N, PARAMS) float32 (same device).
    Returns (N, 1, R, R) float32 in [0, 1]; pixels mapped from outside the source are black (0).
    """
    n, _, height, width = images01.shape
    if height != width:
        raise ValueError(f"expected square images, got {height}x{width}")
    params = params.to(device=images01.device, dtype=torch.float32)
    # Intensity first, so that the padding added by the geometric step stays black:
    # (x - mean) * c + mean + b = x * c + (mean * (1 - c) + b), one fused pass.
    contrast = params[:, 9].view(n, 1, 1, 1)
    brightness = params[:, 10].view(n, 1, 1, 1)
    mean = images01.mean(dim=(1, 2, 3), keepdim=True)
    x = (images01 * contrast).add_(mean * (1 - contrast) + brightness).clamp_(0.0, 1.0)
    # Geometry: every output pixel centre -> homography -> input coordinates.
    grid = homography_grid(params[:, :9].view(n, 3, 3), height)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def to_model_input(images_u8: torch.Tensor, params: torch.Tensor | None,
                   channels_last: bool = False) -> torch.Tensor:
    """uint8 (N, 1, R, R) on the device -> normalised float32 (N, 3, R, R) network input.

    ``params`` None = no augmentation (validation). Grayscale is repeated to the 3 channels the
    ImageNet bodies expect, then each channel is normalised with ImageNet mean/std.
    """
    x = images_u8.to(torch.float32).div_(255.0)
    if params is not None:
        x = augment_batch(x, params)
    # One fused pass per channel: (x - mean_c) / std_c = x * (1 / std_c) - mean_c / std_c.
    scale = torch.tensor([1 / s for s in IMAGENET_STD], device=x.device, dtype=x.dtype)
    shift = torch.tensor([-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)], device=x.device,
                         dtype=x.dtype)
    out = torch.addcmul(shift.view(1, 3, 1, 1), x, scale.view(1, 3, 1, 1))  # N, 3, R, R
    if channels_last:
        out = out.contiguous(memory_format=torch.channels_last)
    return out
