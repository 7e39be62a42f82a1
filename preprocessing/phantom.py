"""A synthetic chest-radiograph dataset, in CheXpert's layout or any other the store reads
(preprocessing.phantom_layouts); its command line is ``python -m preprocessing phantom``.

It is the demo and test data, and it answers the resolution question by construction: each task's
pixel evidence lives in a known band of spatial frequencies, measured in cycles per image extent
(the image is resized to a square, so cycles per image = cycles per stored image):

====================  ========  ===============================================  ==================
task                  scale     evidence                                         cycles per image
====================  ========  ===============================================  ==================
Cardiomegaly          coarse    heart silhouette wider than 0.6 of the thorax    < 20
Pleural Effusion      coarse    fluid meniscus blunting a costophrenic angle     < 20
Consolidation         medium    zero-mean alveolar texture patch in one lung     60 - 110
Edema                 fine      zero-mean Kerley-B line grating, lateral bases   125 - 215
Atelectasis           fine      zero-mean plate-like line packets, mid/low lung  140 - 215
====================  ========  ===============================================  ==================

A square image of R pixels holds at most R/2 cycles; Pillow's Lanczos keeps ~90 % of a component at
0.75 R/2 and under 1 % above 1.5 R/2 (measured, docs/data.md). So at 160 px (80 cycles) the fine
findings are gone, at 480 px (240 cycles) all of them survive, and the per-image frequency drawn
uniformly from the band makes detectability rise step by step over 240, 320, 400, 480. The fine and
medium findings are zero-mean (a carrier under a smooth envelope, values never clipped), so no
downscaled mean brightness leaks the label. All geometry is defined in normalised image coordinates,
so smaller source images (``--min-size``/``--max-size``) keep the same answer as long as they hold
the finest band (>= 600 px; below that a warning is printed and kept in phantom.json).

Films also carry burned-in text, a laterality marker and collimation edges (preprocessing.film_marks),
drawn independently of the labels, because real films do and the store's decode must cope with them.

Every output says it is synthetic: ``phantom.json`` next to the tables (``"synthetic": true``), a
comment in every image, the ``CheXpert-phantom`` folder in every CheXpert ``Path``, and the banner of
``python -m preprocessing stats``.
"""
from __future__ import annotations

import io
import json
import math
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from common import storage
from common.cli import UserError
from common.schema import OBSERVATIONS, TASKS
from preprocessing import __version__
from preprocessing.film_marks import add_film_marks
from preprocessing.phantom_layouts import LAYOUTS, TABLES, layout_files, layout_tables


PREFIX = "CheXpert-phantom"
MARKER = "phantom.json"
JPEG_COMMENT = b"SYNTHETIC PHANTOM chest radiograph (cxr-sweep preprocessing.phantom); not a patient image"
#: Smallest source side that still holds the finest band (215 cycles) below 0.4 x the source size.
FINE_MIN_SOURCE = 600
FINE_MAX_CYCLES = 0.4  # components above this fraction of the source size are not drawn (no aliasing)

#: Per-task design: scale, evidence, frequency band (cycles per image extent) and label rates.
#: Train rates (positive, uncertain, blank; negative = the rest) keep CheXpert's pattern of many
#: uncertain Atelectasis/Consolidation labels and many blanks, with enough positives for tiny demos.
TASK_DESIGN = {
    "Cardiomegaly": {"scale": "coarse", "band_cycles": [0, 20],
                     "evidence": "heart width / thorax width (cardiothoracic ratio): negatives 0.36-0.50, "
                                 "positives 0.61-0.68",
                     "train_rates": [0.28, 0.05, 0.35], "valid_positive": 0.33},
    "Pleural Effusion": {"scale": "coarse", "band_cycles": [0, 20],
                         "evidence": "dense fluid meniscus filling the lateral base of a lung "
                                     "(blunted costophrenic angle), 18-28 % of lung height at the lateral wall",
                         "train_rates": [0.35, 0.05, 0.25], "valid_positive": 0.32},
    "Consolidation": {"scale": "medium", "band_cycles": [60, 110],
                      "evidence": "zero-mean isotropic alveolar texture (band-pass noise) in a soft patch "
                                  "of one lung",
                      "train_rates": [0.22, 0.12, 0.33], "valid_positive": 0.25},
    "Edema": {"scale": "fine", "band_cycles": [125, 215],
              "evidence": "zero-mean Kerley-B-like horizontal line grating at the lateral lung bases; "
                          "one period per image drawn uniformly from the band",
              "train_rates": [0.30, 0.06, 0.30], "valid_positive": 0.30},
    "Atelectasis": {"scale": "fine", "band_cycles": [140, 215],
                    "evidence": "1-3 zero-mean plate-like line packets (Gabor, oblique up to 25 deg) in "
                                "the mid/lower lung",
                    "train_rates": [0.25, 0.15, 0.30], "valid_positive": 0.35},
}
#: Truth behind labels that are not 1/0: an uncertain mention is a coin flip, a blank mostly absent.
P_TRUE_IF_UNCERTAIN, P_TRUE_IF_BLANK = 0.5, 0.1
#: Observations outside the five tasks carry no pixel evidence; train rates (pos, unc, blank).
OTHER_RATES, OTHER_VALID_POSITIVE = (0.08, 0.03, 0.80), 0.08
VIEWS_PER_STUDY = (0.58, 0.37, 0.05)  # 1, 2, 3 images (CheXpert train: 82 %, 17 %, 1 %; valid: 84/14/2)
STUDIES_PER_PATIENT = (0.6, 0.3, 0.1)  # train; valid has one study per patient like CheXpert


@dataclass
class ImageSpec:
    """Everything needed to render one image; rendering is a pure function of it."""
    path: str
    width: int
    height: int
    view: str  # Frontal / Lateral
    seed: list  # entropy for this image's generator
    patient_seed: list  # entropy shared by the patient's images (anatomy)
    findings: dict = field(default_factory=dict)  # task -> severity in (0, 1]; absent tasks missing
    marks: bool = True  # burned-in text, laterality marker, collimation (preprocessing.film_marks)


# --- planning: patients, studies, labels (cheap, from one generator) ----------------------------------
def _draw_label(rng, rates, valid_positive, valid: bool) -> str:
    if valid:
        return "1.0" if rng.random() < valid_positive else "0.0"
    pos, unc, blank = rates
    r = rng.random()
    return "1.0" if r < pos else "-1.0" if r < pos + unc else "" if r < pos + unc + blank else "0.0"


def _truth(rng, label: str) -> bool:
    if label in ("1.0", "0.0"):
        return label == "1.0"
    return rng.random() < (P_TRUE_IF_UNCERTAIN if label == "-1.0" else P_TRUE_IF_BLANK)


def _size(rng, min_size: int, max_size: int, square: bool) -> tuple[int, int]:
    height = int(rng.integers(min_size, max_size + 1))
    if square:
        return height, height
    # Chest films are mostly portrait or near-square landscape: width 0.8-1.05 x height, in range.
    width = int(np.clip(round(height * rng.uniform(0.80, 1.05)), min_size, max_size))
    if width == height:
        width = width - 1 if width > min_size else width + 1 if width < max_size else width
    return width, height


def plan_phantom(studies: int, seed: int, valid_fraction: float = 0.2, min_size: int = 1000,
                 max_size: int = 3000, square: bool = False, prefix: str = PREFIX, film_marks: bool = True):
    """CSV rows per split and the image specs, all decided by ``seed``."""
    rng = np.random.default_rng([seed, 0])
    n_valid = min(studies - 1, max(1, round(studies * valid_fraction))) if studies > 1 else 0
    n_train = studies - n_valid
    rows = {"train": [], "valid": []}
    specs = []
    patient = 0
    for split, n in (("train", n_train), ("valid", n_valid)):
        made = 0
        while made < n:
            patient += 1
            k = 1 if split == "valid" else int(rng.choice(3, p=STUDIES_PER_PATIENT)) + 1
            k = min(k, n - made)
            sex = "Female" if rng.random() < 0.45 else "Male"
            age = int(rng.integers(18, 91))
            width, height = _size(rng, min_size, max_size, square)
            for s in range(1, k + 1):
                made += 1
                labels, findings = {}, {}
                for task, design in TASK_DESIGN.items():
                    labels[task] = _draw_label(rng, design["train_rates"], design["valid_positive"], split == "valid")
                    severity = rng.uniform(0.45, 1.0)
                    if _truth(rng, labels[task]):
                        findings[task] = round(float(severity), 4)
                for obs in OBSERVATIONS:
                    if obs not in labels and obs != "No Finding":
                        labels[obs] = _draw_label(rng, OTHER_RATES, OTHER_VALID_POSITIVE, split == "valid")
                mentioned = any(labels[o] in ("1.0", "-1.0") for o in OBSERVATIONS if o != "No Finding")
                labels["No Finding"] = ("0.0" if mentioned else "1.0") if split == "valid" else \
                    ("" if mentioned else "1.0")
                n_images = int(rng.choice(3, p=VIEWS_PER_STUDY)) + 1
                views = ["Frontal", "Lateral", "Frontal" if rng.random() < 0.5 else "Lateral"][:n_images]
                ap_pa = "AP" if rng.random() < 0.7 else "PA"
                for v, view in enumerate(views, start=1):
                    path = f"{prefix}/{split}/patient{patient:05d}/study{s}/view{v}_{view.lower()}.jpg"
                    rows[split].append([path, sex, str(age), view, ap_pa if view == "Frontal" else "",
                                        *[labels[o] for o in OBSERVATIONS]])
                    specs.append(ImageSpec(path=path, width=width, height=height, view=view,
                                           seed=[seed, 1, patient, s, v], patient_seed=[seed, 2, patient],
                                           findings=dict(findings), marks=film_marks))
    return rows, specs


# --- rendering -----------------------------------------------------------------------------------------
_GRID = 384  # anatomy canvas (cycles < 40 are drawn here and upsampled)
_MID = 512   # medium-band canvas (Consolidation texture, < 110 cycles)


def _smoothstep(e0, e1, x):
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def _inside_ellipse(u, v, cx, cy, a, b, edge=0.006):
    r = np.sqrt(((u - cx) / a) ** 2 + ((v - cy) / b) ** 2)
    return 1.0 - _smoothstep(1.0 - edge / min(a, b), 1.0 + edge / min(a, b), r)


def _upsample(arr: np.ndarray, width: int, height: int, box=None) -> np.ndarray:
    """A float canvas over the unit square (or over ``box`` = (x0, y0, x1, y1) pixels) at pixel size."""
    img = Image.fromarray(arr.astype(np.float32), mode="F")
    if box is None:
        return np.asarray(img.resize((width, height), Image.BICUBIC))
    x0, y0, x1, y1 = box
    gh, gw = arr.shape
    src = (x0 / width * gw, y0 / height * gh, x1 / width * gw, y1 / height * gh)
    return np.asarray(img.resize((x1 - x0, y1 - y0), Image.BICUBIC, box=src))


def _lungs(view: str, anat: dict) -> list[dict]:
    """Lung fields in normalised coordinates; ``side`` points to the lateral (or posterior) wall."""
    if view == "Frontal":
        return [{"cx": 0.5 - anat["sep"], "cy": anat["cy"], "a": anat["a"], "b": anat["b"], "side": -1.0},
                {"cx": 0.5 + anat["sep"], "cy": anat["cy"], "a": anat["a"] * 0.96, "b": anat["b"] * 0.97,
                 "side": 1.0}]
    return [{"cx": 0.5, "cy": anat["cy"], "a": anat["a"] * 2.0, "b": anat["b"], "side": 1.0}]


def _lung_mask(u, v, lung, dome=0.07):
    cx, cy, a, b = lung["cx"], lung["cy"], lung["a"], lung["b"]
    s = (u - cx) / a
    # Diaphragm: a dome highest near the middle of the lung and lowest at the lateral wall, so the
    # costophrenic angle is a sharp lateral-basal corner (what an effusion blunts).
    floor = cy + b * 0.9 - dome * (1 - np.clip(s * lung["side"] * 0.5 + 0.5, 0, 1) ** 2)
    return _inside_ellipse(u, v, cx, cy, a, b * 1.1) * (1 - _smoothstep(-0.004, 0.004, v - floor)), floor


def _lung_coords(u, v, lung):
    """s: -1 medial .. +1 lateral wall; t: 0 apex .. 1 base."""
    s = (u - lung["cx"]) / lung["a"] * lung["side"]
    t = (v - (lung["cy"] - lung["b"] * 1.1)) / (lung["b"] * 2.0)
    return s, t


def _anatomy(spec: ImageSpec, rng, anat: dict):
    """Low-frequency canvas (density in [0, 1]) plus the lung geometry the findings are placed in."""
    n = _GRID
    c = (np.arange(n, dtype=np.float32) + 0.5) / n
    u, v = np.meshgrid(c, c)
    dx, dy = (float(x) for x in rng.normal(0, 0.012, 2))
    u, v = u - dx, v - dy
    lungs = _lungs(spec.view, anat)
    f = spec.findings
    density = np.full((n, n), 0.05, np.float32)
    body = _inside_ellipse(u, v, 0.5, 0.56, anat["body_a"], 0.62, edge=0.02)
    density += 0.50 * body
    lung_any = np.zeros_like(density)
    for lung in lungs:
        m, _ = _lung_mask(u, v, lung)
        lung["mask"] = m
        lung_any = np.maximum(lung_any, m)
    # Heart: width = cardiothoracic ratio x thorax width; a coarse finding (Cardiomegaly).
    ctr = anat["ctr"] if "Cardiomegaly" not in f else 0.55 + 0.13 * f["Cardiomegaly"]
    if spec.view == "Frontal":
        thorax = (lungs[1]["cx"] + lungs[1]["a"]) - (lungs[0]["cx"] - lungs[0]["a"])
        ha, hb = ctr * thorax / 2, 0.10 * math.sqrt(ctr / 0.45)
        hx, hy = 0.5 + 0.03 + ha * 0.15, anat["cy"] + anat["b"] * 0.85 - hb * 0.55
        spine = _smoothstep(0.045, 0.03, np.abs(u - 0.5)) * body
    else:
        ha, hb = ctr * 0.55 / 2, 0.12 * math.sqrt(ctr / 0.45)
        hx, hy = 0.36, anat["cy"] + anat["b"] * 0.55
        spine = _smoothstep(0.06, 0.04, np.abs(u - 0.78)) * body
    heart = _inside_ellipse(u, v, hx, hy, ha, hb, edge=0.005)
    opacity = heart  # what fills the lung's air: heart shadow, then fluid below
    if "Pleural Effusion" in f:
        sev, frng = f["Pleural Effusion"], np.random.default_rng([*spec.seed, TASKS.index("Pleural Effusion")])
        which = [l for l in lungs if frng.random() < 0.6] or [lungs[int(frng.integers(len(lungs)))]]
        for lung in which:
            _, floor = _lung_mask(u, v, lung)
            s, _ = _lung_coords(u, v, lung)
            height = (0.10 + 0.18 * sev) * 2 * lung["b"]
            # Meniscus: the fluid line climbs towards the lateral wall.
            top = floor - height * (0.35 + 0.65 * np.clip(s * 0.5 + 0.5, 0, 1) ** 1.5)
            fluid = _smoothstep(-0.006, 0.006, v - top) * lung["mask"] * 0.92
            opacity = np.maximum(opacity, fluid)
    density -= 0.30 * lung_any * (1 - opacity)
    density += 0.04 * heart + 0.06 * spine
    # Posterior ribs: arcs every ~0.055 (about 18 cycles per image), brighter over the lungs.
    phase = (v - 0.10 - 0.09 * ((u - 0.5) / 0.4) ** 2) / anat["rib_gap"]
    ribs = _smoothstep(0.25, 0.05, np.abs(phase - np.round(phase))) * (phase > 0) * (phase < 10)
    density += 0.07 * ribs * body * (0.4 + 0.6 * lung_any)
    # Lung markings: smooth random texture (< 25 cycles), no label.
    noise = rng.standard_normal((48, 48)).astype(np.float32)
    markings = np.asarray(Image.fromarray(noise, "F").resize((n, n), Image.BICUBIC))
    density += 0.02 * markings * lung_any
    density += 0.05 * (v - 0.5) * body
    return density, lungs, (dx, dy)


def _edema(spec, rng, lungs, shift, out):
    """Kerley-B-like grating: horizontal lines (varying along v) at the lateral lung bases."""
    sev = spec.findings["Edema"]
    lo, hi = TASK_DESIGN["Edema"]["band_cycles"]
    cycles = rng.uniform(lo, hi)
    if cycles > FINE_MAX_CYCLES * spec.height:
        return
    n = _GRID
    c = (np.arange(n, dtype=np.float32) + 0.5) / n
    u, v = np.meshgrid(c - shift[0], c - shift[1])
    env = np.zeros((n, n), np.float32)
    for lung in lungs:
        s, t = _lung_coords(u, v, lung)
        env += _smoothstep(0.30, 0.70, s) * _smoothstep(0.45, 0.70, t) * lung["mask"] ** 2
    rows, cols = np.flatnonzero(env.max(axis=1) > 0), np.flatnonzero(env.max(axis=0) > 0)
    if not len(rows):
        return
    # Only the envelope's bounding box is drawn at full size (grid cells -> pixels, one cell margin).
    x0, x1 = max(0, (cols[0] - 1) * spec.width // n), min(spec.width, (cols[-1] + 2) * spec.width // n)
    y0, y1 = max(0, (rows[0] - 1) * spec.height // n), min(spec.height, (rows[-1] + 2) * spec.height // n)
    env = _upsample(env, spec.width, spec.height, box=(x0, y0, x1, y1))
    y = (np.arange(y0, y1, dtype=np.float64) + 0.5) / spec.height
    carrier = np.cos(2 * np.pi * cycles * y + rng.uniform(0, 2 * np.pi)).astype(np.float32)
    out[y0:y1, x0:x1] += np.float32(0.030 + 0.035 * sev) * env * carrier[:, None]


def _atelectasis(spec, rng, lungs, shift, out):
    """Plate-like atelectasis: short oblique Gabor line packets in the mid/lower lung."""
    sev = spec.findings["Atelectasis"]
    lo, hi = TASK_DESIGN["Atelectasis"]["band_cycles"]
    for _ in range(int(rng.integers(1, 4))):
        lung = lungs[int(rng.integers(len(lungs)))]
        cycles = rng.uniform(lo, hi)
        theta = math.radians(rng.uniform(-25, 25))
        length = rng.uniform(0.025, 0.045)  # Gaussian sigma along the line, normalised units
        across = 1.3 / cycles  # sigma across the line: ~1.3 periods -> DC exp(-2 pi^2 1.69) ~ 0
        s0, t0 = rng.uniform(-0.5, 0.5), rng.uniform(0.45, 0.8)
        u0 = lung["cx"] + s0 * lung["a"] * lung["side"] + shift[0]
        v0 = lung["cy"] - lung["b"] * 1.1 + t0 * lung["b"] * 2.0 + shift[1]
        if cycles > FINE_MAX_CYCLES * min(spec.width, spec.height):
            continue
        reach = 3 * length
        x0, x1 = (max(0, int((u0 - reach) * spec.width)), min(spec.width, int((u0 + reach) * spec.width) + 1))
        y0, y1 = (max(0, int((v0 - reach) * spec.height)), min(spec.height, int((v0 + reach) * spec.height) + 1))
        if x1 <= x0 or y1 <= y0:
            continue
        uu = ((np.arange(x0, x1, dtype=np.float32) + 0.5) / spec.width - u0)[None, :]
        vv = ((np.arange(y0, y1, dtype=np.float32) + 0.5) / spec.height - v0)[:, None]
        along = uu * np.cos(theta) + vv * np.sin(theta)
        normal = -uu * np.sin(theta) + vv * np.cos(theta)
        packet = np.exp(-0.5 * (along / length) ** 2 - 0.5 * (normal / across) ** 2) * np.cos(2 * np.pi * cycles * normal)
        out[y0:y1, x0:x1] += (0.05 + 0.05 * sev) * packet.astype(np.float32)


def _consolidation(spec, rng, lungs, shift, out):
    """Alveolar texture: zero-mean band-pass noise (60-110 cycles) under a soft patch in one lung."""
    sev = spec.findings["Consolidation"]
    lo, hi = TASK_DESIGN["Consolidation"]["band_cycles"]
    lung = lungs[int(rng.integers(len(lungs)))]
    s0, t0 = rng.uniform(-0.5, 0.5), rng.uniform(0.35, 0.75)
    u0 = lung["cx"] + s0 * lung["a"] * lung["side"] + shift[0]
    v0 = lung["cy"] - lung["b"] * 1.1 + t0 * lung["b"] * 2.0 + shift[1]
    radius = rng.uniform(0.055, 0.09)
    n = _MID
    k = np.fft.fftfreq(n, 1.0 / n)
    kk = np.sqrt(k[None, :] ** 2 + k[:, None] ** 2)
    limit = min(hi, FINE_MAX_CYCLES * min(spec.width, spec.height))
    band = ((kk >= lo) & (kk <= limit)).astype(np.float32)
    field_ = np.fft.ifft2(np.fft.fft2(rng.standard_normal((n, n))) * band).real.astype(np.float32)
    field_ /= field_.std() + 1e-8
    c = (np.arange(n, dtype=np.float32) + 0.5) / n
    u, v = np.meshgrid(c, c)
    d = np.sqrt(((u - u0) / radius) ** 2 + ((v - v0) / (radius * 1.2)) ** 2)
    env = np.exp(-(d ** 4)).astype(np.float32)
    lung_mask = np.asarray(Image.fromarray(lung["mask"].astype(np.float32), "F").resize((n, n), Image.BILINEAR))
    env *= _smoothstep(0.0, 0.5, lung_mask)
    reach = 1.6 * radius * 1.2
    x0, x1 = max(0, int((u0 - reach) * spec.width)), min(spec.width, int((u0 + reach) * spec.width) + 1)
    y0, y1 = max(0, int((v0 - reach) * spec.height)), min(spec.height, int((v0 + reach) * spec.height) + 1)
    if x1 <= x0 or y1 <= y0:
        return
    patch = _upsample(field_ * env, spec.width, spec.height, box=(x0, y0, x1, y1))
    out[y0:y1, x0:x1] += (0.035 + 0.035 * sev) * patch


def _patient_anatomy(spec: ImageSpec) -> dict:
    rng = np.random.default_rng(spec.patient_seed)
    # Python floats: numpy float64 scalars would promote every float32 canvas to float64 (NEP 50).
    return {"sep": float(rng.uniform(0.17, 0.20)), "cy": float(rng.uniform(0.40, 0.45)),
            "a": float(rng.uniform(0.125, 0.15)), "b": float(rng.uniform(0.25, 0.29)),
            "body_a": float(rng.uniform(0.42, 0.48)),
            "ctr": float(np.clip(rng.normal(0.44, 0.035), 0.36, 0.50)), "rib_gap": float(rng.uniform(0.05, 0.06))}


def render_image(spec: ImageSpec) -> np.ndarray:
    """The uint8 (height, width) radiograph of one spec: anatomy + findings + exposure + noise."""
    rng = np.random.default_rng(spec.seed)
    anat = _patient_anatomy(spec)
    density, lungs, shift = _anatomy(spec, rng, anat)
    image = _upsample(density, spec.width, spec.height).copy()
    # Each finding draws from its own stream so adding one finding never moves another one's geometry.
    for task, draw in (("Edema", _edema), ("Atelectasis", _atelectasis), ("Consolidation", _consolidation)):
        if task in spec.findings:
            draw(spec, np.random.default_rng([*spec.seed, TASKS.index(task)]), lungs, shift, image)
    gain, offset = rng.uniform(0.85, 1.1), rng.uniform(-0.04, 0.04)
    image = image * np.float32(gain * 255.0) + np.float32(offset * 255.0 + 0.5)
    # Detector noise, white, sigma 1.5-3.5 grey levels: the sum of two uniform bytes is a triangular
    # variable (sd 255/sqrt(6)), close enough to Gaussian and 5x cheaper to draw at 6 Mpx.
    sigma = rng.uniform(1.5, 3.5)
    pair = np.frombuffer(rng.bytes(2 * spec.height * spec.width), np.uint8).reshape(2, spec.height, spec.width)
    noise = pair[0].astype(np.float32)
    noise += pair[1]
    noise -= np.float32(255.0)
    image += noise * np.float32(sigma * math.sqrt(6) / 255.0)
    pixels = np.clip(image, 0, 255).astype(np.uint8)
    return add_film_marks(pixels, spec.seed) if spec.marks else pixels


def encode_jpeg(pixels: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buf, "JPEG", quality=quality, comment=JPEG_COMMENT)
    return buf.getvalue()


def encode_png(pixels: np.ndarray) -> bytes:
    """NIH ships PNGs; the phantom's carry the same synthetic-data comment as its JPEGs."""
    info = PngInfo()
    info.add_text("Comment", JPEG_COMMENT.decode())
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buf, "PNG", pnginfo=info, compress_level=1)
    return buf.getvalue()


def _write_image(job) -> int:
    out, spec, quality, path, fmt = job
    pixels = render_image(spec)
    data = encode_png(pixels) if fmt == "PNG" else encode_jpeg(pixels, quality)
    storage.write_bytes(os.path.join(out, path), data)
    return len(data)


# --- the dataset -----------------------------------------------------------------------------------------


def make_phantom(out: str, studies: int = 200, seed: int = 0, valid_fraction: float = 0.2,
                 min_size: int = 1000, max_size: int = 3000, square: bool = False, quality: int = 95,
                 workers: int = 1, overwrite: bool = False, progress: bool = False, layout: str = "chexpert",
                 film_marks: bool = True) -> dict:
    """Write the phantom into ``out`` (the image root) in ``layout`` and return what phantom.json holds."""
    if layout not in LAYOUTS:
        raise UserError(f"--layout: unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")
    if studies < 2:
        raise UserError(f"--studies: {studies} is too few (need at least 2: one train, one valid)")
    if not 0 < valid_fraction < 1:
        raise UserError(f"--valid-fraction: {valid_fraction} is not between 0 and 1")
    if not 64 <= min_size <= max_size:
        raise UserError(f"--min-size/--max-size: need 64 <= min ({min_size}) <= max ({max_size})")
    if not 1 <= quality <= 100:
        raise UserError(f"--quality: {quality} is not in 1..100")
    out = str(out)
    if os.path.isdir(out) and os.listdir(out):
        if not overwrite:
            raise UserError(f"--out: {out} is not empty (pass --overwrite to replace an earlier phantom)")
        if not os.path.exists(os.path.join(out, MARKER)):
            raise UserError(f"--out: {out} holds files that are not a phantom (no {MARKER}); refusing to overwrite")
        os.remove(os.path.join(out, MARKER))
        for name in os.listdir(out):   # an earlier phantom, whatever its layout
            full = os.path.join(out, name)
            shutil.rmtree(full) if os.path.isdir(full) and not os.path.islink(full) else os.remove(full)
    warnings = []
    if min_size < FINE_MIN_SOURCE:
        warnings.append(f"images smaller than {FINE_MIN_SOURCE} px cannot hold the finest findings "
                        f"(up to 215 cycles per image): fine findings above {FINE_MAX_CYCLES} x the size "
                        f"are left out, so the resolution answer of docs/data.md does not hold")
    rows, specs = plan_phantom(studies, seed, valid_fraction, min_size, max_size, square, film_marks=film_marks)
    jobs = [(out, spec, quality, path, fmt) for spec, path, fmt in layout_files(layout, specs)]
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(jobs), unit="img", desc="phantom images")
    total_bytes = 0
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for size in pool.map(_write_image, jobs, chunksize=4):
                total_bytes += size
                bar and bar.update()
    else:
        for job in jobs:
            total_bytes += _write_image(job)
            bar and bar.update()
    bar and bar.close()
    # Tables and the marker last: a crash leaves no table pointing at images that were never written.
    for name, data in layout_tables(layout, rows, specs).items():
        storage.write_bytes(os.path.join(out, name), data)
    info = {
        "synthetic": True,
        "note": "SYNTHETIC PHANTOM DATA generated by `python -m preprocessing phantom`; not CheXpert, "
                "not patient images. Labels follow the task design below (docs/data.md).",
        "generator": "preprocessing.phantom", "tool_version": __version__,
        "settings": {"studies": studies, "seed": seed, "valid_fraction": valid_fraction, "min_size": min_size,
                     "max_size": max_size, "square": square, "quality": quality, "prefix": PREFIX,
                     "layout": layout, "film_marks": film_marks},
        "tables": list(TABLES[layout]),     # pass each as --csv to build/stats, with --dataset LAYOUT
        "tasks": TASK_DESIGN,
        "truth_if_uncertain": P_TRUE_IF_UNCERTAIN, "truth_if_blank": P_TRUE_IF_BLANK,
        "counts": {split: {"images": sum(1 for job in jobs if f"/{split}/" in job[1].path),
                           "studies": len({x[0].rsplit('/', 1)[0] for x in r})}
                   for split, r in rows.items()},
        "jpeg_bytes": total_bytes,
        "warnings": warnings,
    }
    storage.write_bytes(os.path.join(out, MARKER), (json.dumps(info, indent=2) + "\n").encode())
    return info
