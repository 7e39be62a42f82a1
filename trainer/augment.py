"""Training-time augmentation, drawn on the CPU and applied on the device, in one of two styles.

``style="fastai"`` (the default recipe) is fastai's ``aug_transforms(max_rotate=30,
pad_mode='zeros')`` as the thesis ran it: a horizontal flip (p 0.5), a perspective warp, a
rotation and a zoom in (each with its own draw at p_affine 0.75), then brightness and contrast in
logit space (each with its own draw at p_lighting 0.75); geometry first (zeros padding, fastai's
``align_corners=True`` grid), lighting after. Every number is drawn from the distribution fastai
draws it from (fastai.vision.augment: flip_mat, _WarpCoord, rotate_mat, zoom_mat, _BrightnessLogit,
_ContrastLogit); tests/test_fastai_augment.py checks the draws and the pixels against fastai.

``style="literal"`` is the earlier reading of the thesis's text: rotation, zoom out and a corner
jitter in one draw, linear brightness/contrast before the geometry.

Two halves, so that the result never depends on where or in how many processes it runs:

* :func:`sample_params` (loader workers, numpy) draws each image's parameters from a generator keyed
  by ``(seed, epoch, sample index)``. The same image in the same epoch gets the same transform
  whatever the number of workers, and a resumed run sees exactly what an uninterrupted one would.
  The result is a small ``(N, PARAMS)`` float32 array: a 3x3 homography and two intensity numbers.
* :func:`augment_batch` (the training device, torch) applies a whole batch at once with one
  ``grid_sample`` through each image's homography (zeros padding: the black pixels). It runs in
  fp32 on whatever device the batch is on, so the CPU path and the GPU path are the same code.

Normalisation to the network's input (:func:`to_model_input`) also lives here: it is the step
after augmentation on the device (grayscale -> 3 channels, ImageNet mean/std).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

#: Per-image parameter vector: H (row-major 3x3, output -> input normalised coordinates), then
#: contrast and brightness. Style "literal": contrast factor around the image mean and an additive
#: shift; style "fastai": a factor on the logit and a shift added to the logit (logit(change)).
PARAMS = 11
IDENTITY = np.array([1, 0, 0, 0, 1, 0, 0, 0, 1, 1, 0], dtype=np.float32)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# A constant mixed into every key so augmentation streams never collide with other numpy streams
# that might be keyed by (seed, epoch, ...) elsewhere.
_STREAM = 0xA9C3


STYLES = ("fastai", "literal")


@dataclass(frozen=True)
class AugmentSettings:
    """The augmentation half of TrainConfig (see trainer/config.py for meanings and defaults)."""
    style: str = "fastai"
    p_geometric: float = 0.75
    p_intensity: float = 0.75
    rotation_deg: float = 30.0
    # style "fastai"
    flip_p: float = 0.5
    max_zoom: float = 1.1
    max_warp: float = 0.2
    max_lighting: float = 0.2
    # style "literal"
    brightness: float = 0.2
    contrast: float = 0.2
    zoom_out: float = 0.2
    perspective: float = 0.1

    def __post_init__(self):
        if self.style not in STYLES:
            raise ValueError(f"augmentation style {self.style!r} is not one of {STYLES}")

    @classmethod
    def from_config(cls, cfg) -> "AugmentSettings":
        return cls(style=cfg.aug_style, p_geometric=cfg.aug_p_geometric,
                   p_intensity=cfg.aug_p_intensity, rotation_deg=cfg.aug_rotation_deg,
                   flip_p=cfg.aug_flip_p, max_zoom=cfg.aug_max_zoom, max_warp=cfg.aug_max_warp,
                   max_lighting=cfg.aug_max_lighting, brightness=cfg.aug_brightness,
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
    if settings.style == "fastai":
        return _sample_fastai(settings, rng)
    return _sample_literal(settings, rng)


def _sample_literal(settings: AugmentSettings, rng: np.random.Generator) -> np.ndarray:
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


def _sample_fastai(settings: AugmentSettings, rng: np.random.Generator) -> np.ndarray:
    return fastai_params(**_fastai_draws(settings, rng))


def fastai_draws(settings: AugmentSettings, seed: int, epoch: int, index: int) -> dict[str, float]:
    """The draws behind one image's fastai-style parameters (keyword arguments of
    :func:`fastai_params`), a pure function of ``(seed, epoch, index)``."""
    return _fastai_draws(settings, np.random.default_rng([_STREAM, seed, epoch, index]))


def _fastai_draws(st: AugmentSettings, rng: np.random.Generator) -> dict[str, float]:
    """fastai's draws, one independent Bernoulli per part (fastai's _draw_mask): flip at
    flip_p; warp x and warp y uniform in [-max_warp, max_warp] at p_geometric each; rotation
    uniform in [-deg, deg] at p_geometric; zoom uniform in [1, max_zoom] at p_geometric with a
    centre uniform in [0, 1]^2 (always drawn); brightness uniform in 0.5 * [1 - L, 1 + L] and
    contrast exp(uniform[log(1 - L), -log(1 - L)]) at p_intensity each."""
    u = rng.random(15)   # every number drawn, used or not: the stream never depends on p
    pa, pl, light = st.p_geometric, st.p_intensity, st.max_lighting

    def uniform(lo: float, hi: float, v: float) -> float:
        return lo + (hi - lo) * float(v)

    return {
        "flip": bool(u[0] < st.flip_p),
        "warp_x": uniform(-st.max_warp, st.max_warp, u[2]) if u[1] < pa else 0.0,
        "warp_y": uniform(-st.max_warp, st.max_warp, u[4]) if u[3] < pa else 0.0,
        "rotate_deg": uniform(-st.rotation_deg, st.rotation_deg, u[6]) if u[5] < pa else 0.0,
        "zoom": uniform(1.0, st.max_zoom, u[8]) if u[7] < pa else 1.0,
        "zoom_col": float(u[9]), "zoom_row": float(u[10]),
        "brightness": uniform(0.5 * (1 - light), 0.5 * (1 + light), u[12]) if u[11] < pl else 0.5,
        "contrast": math.exp(uniform(math.log(1 - light), -math.log(1 - light), u[14]))
        if u[13] < pl else 1.0,
    }


def fastai_params(*, flip: bool = False, warp_x: float = 0.0, warp_y: float = 0.0,
                  rotate_deg: float = 0.0, zoom: float = 1.0, zoom_col: float = 0.5,
                  zoom_row: float = 0.5, brightness: float = 0.5,
                  contrast: float = 1.0) -> np.ndarray:
    """The parameter vector of fastai's transforms with these draws (neutral values = no change).

    Geometry, in fastai's order: the affine matrix flip @ rotate @ zoom (fastai's
    AffineCoordTfm multiplies them in aug_transforms' order), then the warp's perspective on the
    resulting coordinates (_WarpCoord maps its target corners back onto the image corners).
    Lighting: ``sigmoid((logit(x) + logit(brightness)) * contrast)``.
    """
    f = -1.0 if flip else 1.0
    t = math.radians(rotate_deg)
    s = 1.0 / zoom
    flip_m = np.array([[f, 0, 0], [0, 1, 0], [0, 0, 1]])
    rot_m = np.array([[math.cos(t), math.sin(t), 0], [-math.sin(t), math.cos(t), 0], [0, 0, 1]])
    zoom_m = np.array([[s, 0, (1 - s) * (2 * zoom_col - 1)], [0, s, (1 - s) * (2 * zoom_row - 1)],
                       [0, 0, 1]])
    orig = np.array([[-1, -1], [-1, 1], [1, -1], [1, 1]], dtype=np.float64)
    targ = np.array([[-1 - warp_y, -1 - warp_x], [-1 + warp_y, 1 + warp_x],
                     [1 + warp_y, -1 + warp_x], [1 - warp_y, 1 - warp_x]])
    h = _homography(targ, orig) @ flip_m @ rot_m @ zoom_m
    out = np.empty(PARAMS, dtype=np.float64)
    out[:9] = (h / h[2, 2]).ravel()
    out[9] = contrast
    out[10] = math.log(brightness / (1 - brightness))   # fastai adds logit(change)
    return out.astype(np.float32)


def sample_params(settings: AugmentSettings, seed: int, epoch: int,
                  indices: np.ndarray) -> np.ndarray:
    """(N,) global sample indices -> (N, PARAMS) float32 parameters."""
    if len(indices) == 0:
        return np.zeros((0, PARAMS), dtype=np.float32)
    return np.stack([sample_one(settings, seed, epoch, int(i)) for i in indices])


def identity_params(n: int) -> np.ndarray:
    return np.tile(IDENTITY, (n, 1))


def _pixel_coords(size: int, device: torch.device, align_corners: bool) -> torch.Tensor:
    """(size,) pixel coordinates in [-1, 1]: the centres of the edge pixels at +-1
    (``align_corners=True``, fastai's grid) or the outer pixel edges at +-1 (False)."""
    if align_corners:
        return torch.linspace(-1, 1, size, device=device, dtype=torch.float32)
    return (torch.arange(size, device=device, dtype=torch.float32) * 2 + 1) / size - 1


def homography_grid(h: torch.Tensor, size: int, align_corners: bool = False) -> torch.Tensor:
    """(N, 3, 3) output->input homographies -> (N, size, size, 2) sampling grid.

    Each of the three homogeneous planes is h[:, r, 0] * x + h[:, r, 1] * y + h[:, r, 2], a sum of a
    column term and a row term, so it is built by broadcasting (N, 1, R) + (N, R, 1) instead of a
    (N, R*R, 3) product: about half the memory traffic.
    """
    n = h.shape[0]
    c = _pixel_coords(size, h.device, align_corners)
    xs = c.view(1, 1, size)
    ys = c.view(1, size, 1)

    def plane(r: int) -> torch.Tensor:
        return (h[:, r, 0].view(n, 1, 1) * xs) + (h[:, r, 1].view(n, 1, 1) * ys + h[:, r, 2].view(n, 1, 1))

    w = plane(2).clamp_(min=1e-6)
    return torch.stack([plane(0).div_(w), plane(1).div_(w)], dim=-1)


def logit(x: torch.Tensor) -> torch.Tensor:
    """fastai's logit: clamped to [1e-7, 1 - 1e-7] so that black and white stay finite."""
    x = x.clamp(1e-7, 1 - 1e-7)
    return -(1 / x - 1).log()


def augment_batch(images01: torch.Tensor, params: torch.Tensor, style: str = "fastai") -> torch.Tensor:
    """Apply per-image parameters to a batch.

    images01: (N, 1, R, R) float32 in [0, 1]; params: (N, PARAMS) float32 (same device).
    Returns (N, 1, R, R) float32 in [0, 1]; pixels mapped from outside the source are black (0).
    """
    n, _, height, width = images01.shape
    if height != width:
        raise ValueError(f"expected square images, got {height}x{width}")
    params = params.to(device=images01.device, dtype=torch.float32)
    contrast = params[:, 9].view(n, 1, 1, 1)
    brightness = params[:, 10].view(n, 1, 1, 1)
    homographies = params[:, :9].view(n, 3, 3)
    if style == "fastai":
        # fastai's order: the geometric transform (order 30), then lighting in logit space
        # (order 40); the padding's black pixels pass through the lighting as fastai's do.
        grid = homography_grid(homographies, height, align_corners=True)
        x = F.grid_sample(images01, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        return torch.sigmoid((logit(x) + brightness) * contrast)
    if style != "literal":
        raise ValueError(f"augmentation style {style!r} is not one of {STYLES}")
    # Intensity first, so that the padding added by the geometric step stays black:
    # (x - mean) * c + mean + b = x * c + (mean * (1 - c) + b), one fused pass.
    mean = images01.mean(dim=(1, 2, 3), keepdim=True)
    x = (images01 * contrast).add_(mean * (1 - contrast) + brightness).clamp_(0.0, 1.0)
    # Geometry: every output pixel centre -> homography -> input coordinates.
    grid = homography_grid(homographies, height)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def to_model_input(images_u8: torch.Tensor, params: torch.Tensor | None,
                   channels_last: bool = False, style: str = "fastai") -> torch.Tensor:
    """uint8 (N, 1, R, R) on the device -> normalised float32 (N, 3, R, R) network input.

    ``params`` None = no augmentation (validation). Grayscale is repeated to the 3 channels the
    ImageNet bodies expect, then each channel is normalised with ImageNet mean/std.
    """
    x = images_u8.to(torch.float32).div_(255.0)
    if params is not None:
        x = augment_batch(x, params, style)
    # One fused pass per channel: (x - mean_c) / std_c = x * (1 / std_c) - mean_c / std_c.
    scale = torch.tensor([1 / s for s in IMAGENET_STD], device=x.device, dtype=x.dtype)
    shift = torch.tensor([-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)], device=x.device,
                         dtype=x.dtype)
    out = torch.addcmul(shift.view(1, 3, 1, 1), x, scale.view(1, 3, 1, 1))  # N, 3, R, R
    if channels_last:
        out = out.contiguous(memory_format=torch.channels_last)
    return out
