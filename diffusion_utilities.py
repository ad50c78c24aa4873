"""diffusion_utilities — the course's shared library, built up lesson by lesson.

Each section below belongs to one lesson, in lesson order, and opens with a banner
(``# ── 01 · Forward process ──``). In a lesson you write a piece yourself, check it,
and from then on import the version kept here.

Notation (one name per idea, used everywhere in the course)
------------------------------------------------------------
======================  ========  ==========================================================
name                    symbol    meaning
======================  ========  ==========================================================
``T``                   T         number of diffusion steps
``t``                   t         integer timesteps, shape ``(B,)``, 0-indexed in [0, T):
                                  ``t = 0`` is the first noising step (one step of noise);
                                  the papers' step t + 1 (see below)
``betas``               β_t       variance of the noise added at step t, shape ``(T,)``
``alphas``              α_t       1 - β_t
``alpha_bars``          ᾱ_t       ∏_{s<=t} α_s, the fraction of the signal's variance left
                                  after step t (its amplitude is sqrt(ᾱ_t)). NB: the DDIM
                                  paper (Song et al. 2021) writes α_t for our ᾱ_t.
``alpha_bar_t``         ᾱ_t       ᾱ at the batch's timesteps, broadcast to ``(B, 1, 1, 1)``
``alpha_bar_prev``      ᾱ_{t-1}   ᾱ one step earlier; 1 for t = 0 (nothing before step 0);
                                  in DDIM, ᾱ at ``t_prev`` (1 for t_prev = -1)
``x0``                  x_0       clean image, ``(B, C, H, W)``, pixel values in [-1, 1]
``xt``                  x_t       noised image after step t (at t = 0: one step of noise;
                                  x_0 always means the clean image)
``eps``                 ε         standard Gaussian noise, same shape as ``x0``
``posterior_variance``  β̃_t       variance of q(x_{t-1} | x_t, x_0):
                                  β_t (1 - ᾱ_{t-1}) / (1 - ᾱ_t)
``snr``, ``log_snr``    SNR_t     ᾱ_t / (1 - ᾱ_t) and its logarithm: the ratio of the
                                  signal's variance to the noise's in x_t for data of unit
                                  variance (data of variance σ² give σ² · SNR_t)
``x0_hat``              x̂_0       the clean image predicted from x_t and ε:
                                  (x_t - sqrt(1 - ᾱ_t) ε) / sqrt(ᾱ_t)
``score``               ∇log q_t  ∇_x log q_t(x_t), the score of the noised data:
                                  -ε / sqrt(1 - ᾱ_t) for the ideal ε
``t_prev``              τ_{i-1}   the timestep a DDIM step goes to, any earlier one;
                                  -1 = past the last step, the clean data (ᾱ = 1)
``eta``                 η         DDIM's noise scale: 0 deterministic, 1 like DDPM
``ddim_sigma``          σ_t       the standard deviation of the noise a DDIM step adds
                                  (DDIM, Song et al. 2021, eq. 16)
======================  ========  ==========================================================

Timesteps here and in the papers. The papers (DDPM and those after it) number the steps
1, ..., T; the course numbers them 0, ..., T-1, as improved-diffusion does, so
**the papers' t = our t + 1**. Symbols carry our index, and each formula keeps the papers'
form with every subscript lowered by one:

=============================================  ======================
this course (code, docstrings, lessons)        the papers
=============================================  ======================
step ``t`` = 0, ..., T-1                       step t + 1 = 1, ..., T
β_t = ``betas[t]``, α_t = ``alphas[t]``        β_{t+1}, α_{t+1}
ᾱ_t = ``alpha_bars[t]``                        ᾱ_{t+1}
ᾱ_{t-1} = ``alpha_bar_prev[t]`` (1 at t = 0)   ᾱ_t (ᾱ_0 = 1)
x_0 = ``x0``, the clean image                  x_0
x_t = ``xt``, the image after step t           x_{t+1}
x_{T-1}, after the last step: pure noise       x_T
=============================================  ======================

Schedules are computed in float64 and stored in float32. A schedule is an explicit
object passed as an argument — never a global.
"""
from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

COURSE_ROOT = Path(__file__).resolve().parent
DATA_DIR = COURSE_ROOT / "data"


# ── 00 · Set-up: device, scale switch, seeds ─────────────────────────────────────────


def get_device() -> torch.device:
    """The best device available here: CUDA, else Apple's MPS, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


SCALES = ("ci", "standard", "full")


def course_scale() -> str:
    """The run size chosen by the ``COURSE_SCALE`` environment variable.

    ``ci``: smallest, used by the test suite; ``standard`` (default): a laptop CPU in
    minutes; ``full``: longer training and sampling, meant for a GPU.
    """
    scale = os.environ.get("COURSE_SCALE", "standard").strip().lower()
    if scale not in SCALES:
        raise ValueError(f"COURSE_SCALE must be one of {SCALES}, got {scale!r}")
    return scale


def by_scale(*, ci, standard, full):
    """Pick the value for the current ``COURSE_SCALE``, e.g. ``by_scale(ci=50, standard=500, full=5000)``."""
    return {"ci": ci, "standard": standard, "full": full}[course_scale()]


def seed_everything(seed: int = 0) -> None:
    """Seed Python, NumPy and PyTorch so a rerun shows the same pictures."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def write_atomically(path, write) -> None:
    """Write the file ``path`` by calling ``write(temporary)`` on a temporary file in the same
    folder, then renaming it over ``path``: an interruption leaves the old file or the new
    one, never a part of one (and no temporary file behind)."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


# ── 00 · The shapes data set ─────────────────────────────────────────────────────────
# A deterministic, offline data set: one coloured shape per image, described by five
# attributes and a caption. It serves every lesson: unconditional training (images only),
# class-conditional (labels), text-conditional and CLIP (captions), and compositional
# generalisation (shape-colour pairs held out of training).

import textwrap

from torch.utils.data import DataLoader, Dataset

SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")
COLOURS = ("red", "orange", "yellow", "green", "blue", "purple")
SIZES = ("small", "large")
POSITIONS = ("centre", "top left", "top right", "bottom left", "bottom right")
BACKGROUNDS = ("dark", "light")
ATTRIBUTES = ("shape", "colour", "size", "position", "background")
ATTRIBUTE_VALUES = (SHAPES, COLOURS, SIZES, POSITIONS, BACKGROUNDS)  # aligned with ATTRIBUTES
SPLITS = ("train", "held_out")

# (shape, colour) pairs never drawn in the "train" split. Each shape and each colour here
# still appears in training with other partners, so a model can only get these right by
# composing what it learned ("a red star": red from red circles, star from blue stars, ...).
HELD_OUT_COMBINATIONS = (
    ("circle", "purple"),
    ("square", "orange"),
    ("triangle", "blue"),
    ("star", "red"),
)

# Nominal RGB values, chosen to stand out on both backgrounds.
COLOUR_RGB = {
    "red": (225, 45, 45),
    "orange": (245, 135, 20),
    "yellow": (235, 195, 0),
    "green": (40, 175, 70),
    "blue": (50, 100, 235),
    "purple": (165, 75, 215),
}
BACKGROUND_RGB = {"dark": (24, 26, 38), "light": (222, 222, 212)}

# Layout as fractions of the image side: centres (x, y) with y pointing down, radii.
POSITION_XY = {
    "centre": (0.5, 0.5),
    "top left": (0.3, 0.3),
    "top right": (0.7, 0.3),
    "bottom left": (0.3, 0.7),
    "bottom right": (0.7, 0.7),
}
SIZE_RADIUS = {"small": 0.14, "large": 0.24}

_POSITION_JITTER = 0.045  # ± fraction of the image side (about 1.5 px at 32x32)
_SCALE_JITTER = 0.08  # ± relative change of the radius
_ROTATION_JITTER = math.radians(10.0)  # ± rotation
_COLOUR_JITTER = 12.0  # ± per RGB channel of the shape
_BACKGROUND_JITTER = 6.0  # ± per RGB channel of the background
_SUPERSAMPLE = 4  # s x s samples per pixel for anti-aliased edges
_N_DRAWS = 14  # uniform numbers drawn per image (see _labels_from_draws / _geometry)


def _check_int(value, name: str, low: int, high: int) -> int:
    """Return ``value`` if it is an int in [low, high], else raise ValueError naming the range."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
        raise ValueError(f"{name} must be an int in [{low}, {high}], got {value!r}")
    return int(value)


def _check_image_size(image_size) -> int:
    return _check_int(image_size, "image_size", 16, 256)


def _check_split(split) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split


@dataclass(frozen=True)
class ShapeAttributes:
    """What one image shows: a ``size`` ``colour`` ``shape`` at ``position`` on a ``background``.

    Each field must be one of the names in ``SHAPES``, ``COLOURS``, ``SIZES``,
    ``POSITIONS``, ``BACKGROUNDS``, e.g. ``ShapeAttributes("star", "blue", "large", "centre", "dark")``.
    """

    shape: str
    colour: str
    size: str
    position: str
    background: str

    def __post_init__(self) -> None:
        for name, allowed in zip(ATTRIBUTES, ATTRIBUTE_VALUES):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")

    def labels(self) -> tuple[int, ...]:
        """Integer labels in ``ATTRIBUTES`` order, e.g. ``(4, 4, 1, 0, 0)``."""
        return tuple(values.index(getattr(self, name)) for name, values in zip(ATTRIBUTES, ATTRIBUTE_VALUES))

    @classmethod
    def from_labels(cls, labels) -> "ShapeAttributes":
        """The inverse of :meth:`labels`: five integers (list, tuple, array or tensor) in ``ATTRIBUTES`` order."""
        labels = [int(i) for i in labels]
        if len(labels) != len(ATTRIBUTES):
            raise ValueError(f"expected {len(ATTRIBUTES)} labels in the order {ATTRIBUTES}, got {len(labels)}")
        for i, name, values in zip(labels, ATTRIBUTES, ATTRIBUTE_VALUES):
            _check_int(i, f"{name} label", 0, len(values) - 1)
        return cls(*(values[i] for i, values in zip(labels, ATTRIBUTE_VALUES)))


# Caption wordings. Every one contains the colour word and the shape word verbatim, so later
# lessons (CLIP, text-to-image) can rely on them. The first is the canonical one.
_CAPTION_TEMPLATES = (
    "a {size} {colour} {shape} in the {position} on a {background} background",
    "{size} {colour} {shape}, {position}, {background} background",
    "{a_colour} {shape} ({size}) at the {position}, {background} backdrop",
    "a {background} picture with a {size} {colour} {shape} in the {position}",
    "{colour} {shape}, {size}, {position} of a {background} canvas",
    "there is a {size} {colour} {shape} in the {position} against a {background} background",
)


def _fill_caption(template: str, attrs: ShapeAttributes) -> str:
    article = "an" if attrs.colour[0] in "aeiou" else "a"
    return template.format(
        shape=attrs.shape, colour=attrs.colour, a_colour=f"{article} {attrs.colour}",
        size=attrs.size, position=attrs.position, background=attrs.background,
    )


def canonical_caption(attrs: ShapeAttributes) -> str:
    """The fixed wording used for prompts: ``"a small red circle in the top left on a dark background"``."""
    if not isinstance(attrs, ShapeAttributes):
        raise ValueError(f"expected a ShapeAttributes, got {type(attrs).__name__}")
    return _fill_caption(_CAPTION_TEMPLATES[0], attrs)


def caption_for(attrs: ShapeAttributes, rng: np.random.Generator) -> str:
    """A caption for ``attrs`` in one of several wordings, picked with ``rng`` (a NumPy Generator).

    e.g. ``"large blue star, centre, light background"``; the colour and shape words always appear.
    """
    if not isinstance(attrs, ShapeAttributes):
        raise ValueError(f"expected a ShapeAttributes, got {type(attrs).__name__}")
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a numpy.random.Generator (np.random.default_rng(seed)), got {type(rng).__name__}")
    return _fill_caption(_CAPTION_TEMPLATES[int(rng.integers(len(_CAPTION_TEMPLATES)))], attrs)


def _pairs_for_split(split: str) -> list[tuple[int, int]]:
    """(shape, colour) label pairs a split draws from: all but the held-out ones, or only those."""
    held_out = {(SHAPES.index(s), COLOURS.index(c)) for s, c in HELD_OUT_COMBINATIONS}
    pairs = [(s, c) for s in range(len(SHAPES)) for c in range(len(COLOURS))]
    return [p for p in pairs if (p in held_out) == (split == "held_out")]


def _pick(u: np.ndarray, k: int) -> np.ndarray:
    """Uniform draws in [0, 1) -> integers uniform in {0, ..., k-1}."""
    return np.minimum((u * k).astype(np.int64), k - 1)


def _jitter(u: np.ndarray, amount: float) -> np.ndarray:
    """Uniform draws in [0, 1) -> offsets uniform in [-amount, amount]."""
    return (2.0 * u - 1.0) * amount


def _labels_from_draws(draws: np.ndarray, pairs: list[tuple[int, int]]) -> np.ndarray:
    """Map uniform draws (N, _N_DRAWS) to integer labels (N, 5) in ATTRIBUTES order."""
    shape_colour = np.asarray(pairs, dtype=np.int64)[_pick(draws[:, 0], len(pairs))]  # (N, 2)
    rest = [_pick(draws[:, i], len(values)) for i, values in zip((1, 2, 3), (SIZES, POSITIONS, BACKGROUNDS))]
    return np.column_stack([shape_colour, *rest])


def _draw_labels(n: int, seed: int, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The uniform draws (N, _N_DRAWS) behind ``make_shapes(n, seed=seed, split=split)`` and
    the labels (N, 5) they give; the images are rendered from the same draws."""
    n = _check_int(n, "n", 1, 10**7)
    seed = _check_int(seed, "seed", 0, 2**63 - 1)
    split = _check_split(split)
    draws = np.random.default_rng([seed, SPLITS.index(split)]).random((n, _N_DRAWS))
    return draws, _labels_from_draws(draws, _pairs_for_split(split))


def _geometry(labels: np.ndarray, draws: np.ndarray) -> dict[str, np.ndarray]:
    """Jittered centre (cx, cy), radius r, rotation and colours for each image, all (N,) or (N, 3)."""
    xy = np.array([POSITION_XY[p] for p in POSITIONS])[labels[:, 3]]  # (N, 2)
    radius = np.array([SIZE_RADIUS[s] for s in SIZES])[labels[:, 2]]
    fg = np.array([COLOUR_RGB[c] for c in COLOURS], dtype=np.float64)[labels[:, 1]]
    bg = np.array([BACKGROUND_RGB[b] for b in BACKGROUNDS], dtype=np.float64)[labels[:, 4]]
    return {
        "cx": xy[:, 0] + _jitter(draws[:, 4], _POSITION_JITTER),
        "cy": xy[:, 1] + _jitter(draws[:, 5], _POSITION_JITTER),
        "r": radius * (1.0 + _jitter(draws[:, 6], _SCALE_JITTER)),
        "angle": _jitter(draws[:, 7], _ROTATION_JITTER),
        "fg": np.clip(fg + _jitter(draws[:, 8:11], _COLOUR_JITTER), 0, 255),
        "bg": np.clip(bg + _jitter(draws[:, 11:14], _BACKGROUND_JITTER), 0, 255),
    }


# Inside tests in shape coordinates (u, v): centred on the shape, v pointing up, in units of
# its radius. Sizes are set so all shapes cover a similar area.
def _inside_circle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return u * u + v * v <= 1.0


def _inside_square(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.maximum(np.abs(u), np.abs(v)) <= 0.85


def _inside_triangle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Equilateral, apex up, circumradius 1.2 (so its inradius is 0.6)."""
    return (v >= -0.6) & (0.5 * math.sqrt(3.0) * np.abs(u) + 0.5 * v <= 0.6)


def _inside_diamond(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """A rhombus taller than wide (half-width 0.95, half-height 1.25), so it is no tilted square."""
    return np.abs(u) / 0.95 + np.abs(v) / 1.25 <= 1.0


def _inside_star(u: np.ndarray, v: np.ndarray, *, outer: float = 1.2, inner: float = 0.5) -> np.ndarray:
    """Five-pointed star, one point up: fold the angle onto the sector of one point, then
    test which side of the edge from the outer tip (outer, 0) to the inner corner the point lies."""
    sector = 2.0 * math.pi / 5
    angle = np.abs((np.arctan2(v, u) - math.pi / 2 + sector / 2) % sector - sector / 2)  # [0, π/5]
    rho = np.hypot(u, v)
    qx, qy = rho * np.cos(angle), rho * np.sin(angle)
    ex, ey = inner * math.cos(sector / 2) - outer, inner * math.sin(sector / 2)  # edge vector
    return ex * qy - ey * (qx - outer) >= 0.0


def _inside_cross(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    au, av = np.abs(u), np.abs(v)
    return (np.maximum(au, av) <= 1.0) & (np.minimum(au, av) <= 0.34)


_INSIDE = {
    "circle": _inside_circle, "square": _inside_square, "triangle": _inside_triangle,
    "diamond": _inside_diamond, "star": _inside_star, "cross": _inside_cross,
}


def _shape_coords(geo: dict[str, np.ndarray], idx: np.ndarray, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Shape coordinates (u, v), each (n_k, S, S), of the S x S sample grid for images ``idx``."""
    def column(values: np.ndarray) -> np.ndarray:  # (N,) -> (n_k, 1, 1) float32
        return values[idx].astype(np.float32)[:, None, None]

    cos, sin, r = column(np.cos(geo["angle"])), column(np.sin(geo["angle"])), column(geo["r"])
    dx = (grid[None, None, :] - column(geo["cx"])) / r  # (n_k, 1, S)
    dy = (column(geo["cy"]) - grid[None, :, None]) / r  # (n_k, S, 1), pointing up
    return cos * dx + sin * dy, cos * dy - sin * dx  # rotated by -angle: (n_k, S, S) each


def _coverage(labels: np.ndarray, geo: dict[str, np.ndarray], image_size: int) -> np.ndarray:
    """Fraction of each pixel the shape covers, (N, H, W) float32, from s x s samples per pixel."""
    n, s = len(labels), _SUPERSAMPLE
    grid = ((np.arange(image_size * s) + 0.5) / (image_size * s)).astype(np.float32)  # sample centres
    inside = np.zeros((n, image_size * s, image_size * s), dtype=bool)
    for k, name in enumerate(SHAPES):
        idx = np.flatnonzero(labels[:, 0] == k)
        if idx.size == 0:
            continue
        inside[idx] = _INSIDE[name](*_shape_coords(geo, idx, grid))
    counts = inside.reshape(n, image_size, s, image_size, s).sum(axis=(2, 4), dtype=np.uint8)
    return counts.astype(np.float32) / (s * s)


def _render(labels: np.ndarray, draws: np.ndarray, image_size: int) -> np.ndarray:
    """Images (N, 3, H, W) uint8: background blended with the shape colour by coverage."""
    geo = _geometry(labels, draws)
    cover = _coverage(labels, geo, image_size)[:, None]  # (N, 1, H, W)
    fg = geo["fg"].astype(np.float32)[:, :, None, None]  # (N, 3, 1, 1)
    bg = geo["bg"].astype(np.float32)[:, :, None, None]
    return np.rint(bg + (fg - bg) * cover).astype(np.uint8)


@dataclass
class ShapesData:
    """A generated set: ``images`` uint8 (N, 3, H, W), ``labels`` int64 (N, 5) in ``ATTRIBUTES``
    order, one caption and one :class:`ShapeAttributes` per image."""

    images: Tensor
    labels: Tensor
    captions: list[str]
    attributes: list[ShapeAttributes]

    def __len__(self) -> int:
        return len(self.captions)


def make_shapes(n: int, *, seed: int = 0, split: str = "train", image_size: int = 32) -> ShapesData:
    """Generate ``n`` shape images with labels and captions, deterministically from ``seed``.

    ``split="train"`` never shows a pair in ``HELD_OUT_COMBINATIONS``; ``split="held_out"``
    shows only those. The first k images of ``make_shapes(n)`` equal ``make_shapes(k)``.
    """
    draws, labels = _draw_labels(n, seed, split)  # (N, _N_DRAWS), (N, 5)
    image_size = _check_image_size(image_size)
    chunk = max(1, 4_000_000 // (image_size * _SUPERSAMPLE) ** 2)  # bounds memory per chunk
    images = np.concatenate(
        [_render(labels[i:i + chunk], draws[i:i + chunk], image_size) for i in range(0, n, chunk)]
    )
    attributes = [ShapeAttributes.from_labels(row) for row in labels.tolist()]
    caption_rng = np.random.default_rng([seed, SPLITS.index(split), 1])
    captions = [caption_for(a, caption_rng) for a in attributes]
    return ShapesData(torch.from_numpy(images), torch.from_numpy(labels), captions, attributes)


class ShapesDataset(Dataset):
    """The shapes data set for training: item i is ``(image, labels, caption)`` with image
    float32 (3, H, W) in [-1, 1], labels int64 (5,) in ``ATTRIBUTES`` order. ``.data`` holds
    the underlying :class:`ShapesData` (uint8 images, attributes)."""

    def __init__(self, n: int, *, seed: int = 0, split: str = "train", image_size: int = 32) -> None:
        self.data = make_shapes(n, seed=seed, split=split, image_size=image_size)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, str]:
        image = from_uint8(self.data.images[i])
        return image, self.data.labels[i], self.data.captions[i]


def shapes_dataloader(
    n: int, *, batch_size: int = 64, seed: int = 0, split: str = "train", shuffle: bool = True, image_size: int = 32
) -> DataLoader:
    """A DataLoader over ``ShapesDataset(n, ...)``; batches are ``(images (B, 3, H, W), labels
    (B, 5), captions list[str])``. Shuffling uses a generator seeded with ``seed``."""
    batch_size = _check_int(batch_size, "batch_size", 1, 10**7)
    dataset = ShapesDataset(n, seed=seed, split=split, image_size=image_size)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=0, generator=generator)


def from_uint8(pixels: Tensor) -> Tensor:
    """Map uint8 pixels in [0, 255] to float32 in [-1, 1], the range every model here uses."""
    if not isinstance(pixels, Tensor) or pixels.dtype != torch.uint8:
        raise ValueError(f"expected a uint8 tensor, got {getattr(pixels, 'dtype', type(pixels))}")
    return pixels.float() / 127.5 - 1.0


def to_unit_range(x: Tensor) -> Tensor:
    """Map images from [-1, 1] to [0, 1] (for display), clamping what falls outside."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise ValueError(f"expected a floating-point tensor with values in [-1, 1], got {getattr(x, 'dtype', type(x))}")
    return ((x + 1.0) / 2.0).clamp(0.0, 1.0)


def _display_array(images) -> np.ndarray:
    """uint8 or [-1, 1] float images (N, C, H, W) or (C, H, W), C in {1, 3}, any device -> (N, H, W, 3) in [0, 1]."""
    x = torch.as_tensor(images).detach().cpu()
    x = x[None] if x.ndim == 3 else x
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected images of shape (N, 3, H, W) or (N, 1, H, W), got {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    elif x.is_floating_point():
        x = to_unit_range(x.float())
    else:
        raise ValueError(f"expected uint8 images or float images in [-1, 1], got dtype {x.dtype}")
    return x.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).numpy()


def show_images(images, *, captions=None, nrow: int = 8, title: str | None = None, figsize=None,
                row_labels=None, fontsize: float = 8):
    """Draw a grid of images, ``nrow`` per row, each with its (wrapped) caption underneath.

    ``images``: uint8 (N, 3, H, W) or float in [-1, 1], on any device. ``row_labels``: one
    label per row, written left of it (which schedule, which step, ...). ``fontsize``: the
    captions' size in points. Returns the matplotlib Figure (in a notebook, end the line
    with ``;`` so it is not drawn twice).
    """
    import matplotlib.pyplot as plt

    pixels = _display_array(images)  # (N, H, W, 3)
    n, nrow = len(pixels), _check_int(nrow, "nrow", 1, 1000)
    if n == 0:
        raise ValueError("expected at least one image, got an empty batch")
    if captions is not None and len(captions) != n:
        raise ValueError(f"expected one caption per image ({n}), got {len(captions)}")
    lines = [textwrap.wrap(str(c), width=20)[:4] for c in captions] if captions is not None else [[]] * n
    ncols, nrows = min(nrow, n), math.ceil(n / min(nrow, n))
    if row_labels is not None and len(row_labels) != nrows:
        raise ValueError(f"expected one row label per row ({nrows}), got {len(row_labels)}")
    panel, title_h = 1.3, 0.35 if title else 0.05
    caption_h = fontsize / 50 * max(len(w) for w in lines) + 0.05
    label_w = 0.1 * max(len(str(r)) for r in row_labels) + 0.2 if row_labels is not None else 0.0
    width, height = figsize or (ncols * panel + label_w, nrows * (panel + caption_h) + title_h)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width, height), squeeze=False)
    fig.subplots_adjust(left=0.01 + label_w / width, right=0.99, top=1 - title_h / height,
                        bottom=caption_h / height, wspace=0.06, hspace=caption_h / panel)
    for i, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if i < n:
            ax.imshow(pixels[i], interpolation="nearest")
            ax.text(0.5, -0.03, "\n".join(lines[i]), transform=ax.transAxes, ha="center", va="top",
                    fontsize=fontsize, linespacing=1.05)
    for label, ax in zip(row_labels or [], axes[:, 0]):
        ax.text(-0.08, 0.5, str(label), transform=ax.transAxes, ha="right", va="center",
                fontsize=fontsize + 2)
    if title:
        fig.suptitle(title, fontsize=11, y=1 - 0.08 / height)
    return fig


PHOTO_PATH = DATA_DIR / "photo.png"  # 128 x 128 RGB; source and licence in data/README.md


def load_photo(size: int = 64, *, path: str | Path | None = None) -> Tensor:
    """The course's real photograph (Grace Hopper, public domain) as float32 (3, size, size) in [-1, 1].

    ``size`` in [8, 128] (the stored file is 128 x 128); ``path`` picks another image file,
    which is centre-cropped to a square first.
    """
    from PIL import Image

    size = _check_int(size, "size", 8, 128)
    path = PHOTO_PATH if path is None else Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"photo not found at {path}; the course ships it as data/photo.png (see data/README.md)")
    with Image.open(path) as im:
        im = im.convert("RGB")
        side = min(im.size)
        left, top = (im.width - side) // 2, (im.height - side) // 2
        im = im.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.LANCZOS)
    pixels = torch.from_numpy(np.array(im)).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W) uint8
    return from_uint8(pixels)


REAL_DATASETS = ("MNIST", "FashionMNIST", "CIFAR10")


def _three_channels(x: Tensor) -> Tensor:
    """(1, H, W) grey -> (3, H, W); RGB passes through."""
    return x.repeat(3, 1, 1) if x.shape[0] == 1 else x


def real_dataset(name: str, root: str | Path, *, train: bool = True, image_size: int = 32) -> Dataset:
    """MNIST, FashionMNIST or CIFAR10 through torchvision, read from files already under
    ``root``: items ``(image, class_index)`` with image float32 (3, image_size, image_size)
    in [-1, 1]. Optional, and never downloads: fetch the files once yourself on a machine
    with a network (torchvision's own download option writes them in this layout); no
    lesson requires it."""
    key = str(name).lower().replace("-", "").replace("_", "")
    matches = [d for d in REAL_DATASETS if d.lower() == key]
    if not matches:
        raise ValueError(f"name must be one of {REAL_DATASETS}, got {name!r}")
    image_size, root = _check_image_size(image_size), Path(root)
    hint = (f"put torchvision's {matches[0]} files there first (its download option fetches "
            "them once, on a machine with a network); the course never downloads")
    if not root.exists():
        raise FileNotFoundError(f"data folder {root} does not exist; {hint}")
    from torchvision import datasets, transforms

    transform = transforms.Compose([
        transforms.Resize((image_size, image_size)), transforms.ToTensor(), _three_channels,  # [0, 1], (3, H, W)
        transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # -> [-1, 1]
    ])
    try:
        return getattr(datasets, matches[0])(str(root), train=train, download=False, transform=transform)
    except RuntimeError as err:
        raise FileNotFoundError(f"{matches[0]} not found under {root}; {hint}") from err


# ── 01 · Forward process ─────────────────────────────────────────────────────────────

SCHEDULE_NAMES = ("linear", "cosine", "sigmoid")


def _check_num_steps(T) -> int:
    """``T`` as a positive Python int, else ValueError naming what was expected."""
    if isinstance(T, bool) or not isinstance(T, (int, np.integer)) or T < 1:
        raise ValueError(f"T (the number of diffusion steps) must be an integer >= 1, got {T!r}")
    return int(T)


def linear_beta_schedule(T: int, *, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """β_t rising linearly from ``beta_start`` to ``beta_end`` over T steps, float64 ``(T,)``.

    DDPM (Ho et al. 2020, section 4) uses β from 1e-4 to 0.02 with T = 1000. As in
    improved-diffusion, both ends are scaled by 1000 / T, so that any T gives a comparable
    process (fewer, larger steps for a small T; the same sum of betas, so nearly the same ᾱ
    against t / T). Hence T must be large enough that ``beta_end * 1000 / T`` stays below 1.
    """
    T = _check_num_steps(T)
    scale = 1000.0 / T
    if not 0 < beta_start * scale <= beta_end * scale < 1:
        raise ValueError(f"linear_beta_schedule needs 0 < beta_start <= beta_end and "
                         f"beta_end * 1000 / T < 1, got beta_start={beta_start}, "
                         f"beta_end={beta_end}, T={T} (try T >= {math.floor(1000 * beta_end) + 1})")
    return torch.linspace(beta_start * scale, beta_end * scale, T, dtype=torch.float64)


def cosine_beta_schedule(T: int, *, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Betas of the cosine schedule, float64 ``(T,)``.

    ᾱ(t) = f(t) / f(0),   f(t) = cos²( (t/T + s) / (1 + s) · π/2 ),   t = 0, 1, ..., T
    β_t  = min(1 - ᾱ(t+1) / ᾱ(t), max_beta)
    (Improved DDPM, Nichol & Dhariwal 2021, eq. 17 and the clipping to 0.999 below it.)
    On this grid ᾱ(t) is the papers' ᾱ_t, so our ``alpha_bars[t]`` = ᾱ(t+1). The offset ``s``
    keeps the first betas from being vanishingly small (with s = 0.008, sqrt(β_0) is just
    below one pixel level, 1/127.5); the clipping avoids β = 1 (ᾱ = 0) at the very end.
    """
    T = _check_num_steps(T)
    if not (s >= 0 and 0 < max_beta <= 1):
        raise ValueError(f"cosine_beta_schedule needs s >= 0 and 0 < max_beta <= 1, "
                         f"got s={s}, max_beta={max_beta}")
    steps = torch.linspace(0, T, T + 1, dtype=torch.float64)  # (T+1,): the grid t = 0..T
    f = torch.cos((steps / T + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]                           # (T+1,), ᾱ(0) = 1
    betas = 1.0 - alpha_bar[1:] / alpha_bar[:-1]   # (T+1,) -> (T,)
    return betas.clamp(max=max_beta)


def sigmoid_beta_schedule(T: int, *, start: float = -3.0, end: float = 3.0, tau: float = 1.0,
                          max_beta: float = 0.999) -> Tensor:
    """Betas of the sigmoid schedule, float64 ``(T,)``, defined through ᾱ:

    ᾱ(τ) = (σ(end/τ₀) - σ((τ·(end - start) + start)/τ₀)) / (σ(end/τ₀) - σ(start/τ₀)),
    τ = t/T on the grid t = 0..T, σ the logistic sigmoid, τ₀ = ``tau`` (the temperature);
    β_t = min(1 - ᾱ(t+1) / ᾱ(t), max_beta).
    (Jabri et al. 2022, "Scalable adaptive computation"; Chen 2023, "On the importance of
    noise scheduling for diffusion models", Algorithm 1.) ᾱ falls from 1 to 0 along a
    stretch of the sigmoid picked by ``start`` and ``end``.
    """
    T = _check_num_steps(T)
    if not (start < end and tau > 0 and 0 < max_beta <= 1):
        raise ValueError(f"sigmoid_beta_schedule needs start < end, tau > 0 and "
                         f"0 < max_beta <= 1, got start={start}, end={end}, tau={tau}, "
                         f"max_beta={max_beta}")
    steps = torch.linspace(0, 1, T + 1, dtype=torch.float64)  # (T+1,): τ = t/T
    v_start = torch.sigmoid(torch.tensor(start / tau, dtype=torch.float64))
    v_end = torch.sigmoid(torch.tensor(end / tau, dtype=torch.float64))
    v = torch.sigmoid((steps * (end - start) + start) / tau)
    alpha_bar = (v_end - v) / (v_end - v_start)    # (T+1,), from 1 down to 0
    betas = 1.0 - alpha_bar[1:] / alpha_bar[:-1]   # (T+1,) -> (T,)
    return betas.clamp(max=max_beta)


def make_beta_schedule(name: str, T: int) -> Tensor:
    """The betas of the schedule called ``name`` (one of :data:`SCHEDULE_NAMES`), with defaults."""
    makers = {"linear": linear_beta_schedule, "cosine": cosine_beta_schedule,
              "sigmoid": sigmoid_beta_schedule}
    if name not in makers:
        raise ValueError(f"unknown beta schedule {name!r}: expected one of {SCHEDULE_NAMES}")
    return makers[name](T)


def alpha_bars_from_betas(betas: Tensor) -> Tensor:
    """ᾱ_t = ∏_{s<=t} (1 - β_s)   (DDPM, Ho et al. 2020, notation above eq. 4), shape ``(T,)``.

    ``alpha_bars[t]`` is the fraction of the signal's variance left after step t (0-indexed:
    ``alpha_bars[0] = 1 - betas[0]``; the papers' ᾱ_{t+1}); the signal's amplitude is its
    square root. Dtype and device follow ``betas``.
    """
    if not isinstance(betas, Tensor) or betas.ndim != 1:
        got = tuple(betas.shape) if isinstance(betas, Tensor) else type(betas).__name__
        raise ValueError(f"betas must be a 1-D tensor of shape (T,), got {got}")
    return torch.cumprod(1.0 - betas, dim=0)


@dataclass
class NoiseSchedule:
    """Everything the forward process needs, one value per timestep: each field has shape ``(T,)``.

    Computed in float64 and stored in float32. Index with integer timesteps t in [0, T),
    ``t = 0`` being one step of noise (the papers' step t + 1: see the notation at the top);
    use :func:`extract` to broadcast over a batch.
    The posterior fields describe q(x_{t-1} | x_t, x_0) (DDPM, Ho et al. 2020, eqs. 6-7):
    mean = posterior_mean_coef_x0 · x_0 + posterior_mean_coef_xt · x_t, variance
    posterior_variance (β̃_t, which is 0 at t = 0; its log is clipped there, as in
    improved-diffusion).
    """

    betas: Tensor                           # β_t
    alphas: Tensor                          # α_t = 1 - β_t
    alpha_bars: Tensor                      # ᾱ_t
    alpha_bar_prev: Tensor                  # ᾱ_{t-1}, with ᾱ_{-1} = 1 (the papers' ᾱ_t)
    posterior_variance: Tensor              # β̃_t = β_t (1 - ᾱ_{t-1}) / (1 - ᾱ_t)
    posterior_log_variance_clipped: Tensor  # log β̃_t, with β̃_0 replaced by β̃_1
    posterior_mean_coef_x0: Tensor          # β_t sqrt(ᾱ_{t-1}) / (1 - ᾱ_t)
    posterior_mean_coef_xt: Tensor          # sqrt(α_t) (1 - ᾱ_{t-1}) / (1 - ᾱ_t)
    # Derived in float64 too, so that no step recomputes them in float32 (1 - ᾱ_t loses
    # about four digits there when ᾱ_t is close to 1, i.e. for the first timesteps):
    sqrt_alpha_bars: Tensor                 # sqrt(ᾱ_t), the signal's amplitude in x_t
    sqrt_one_minus_alpha_bars: Tensor       # sqrt(1 - ᾱ_t), the noise's amplitude in x_t
    sqrt_recip_alphas: Tensor               # 1 / sqrt(α_t), the front factor of DDPM eq. 11
    eps_coef: Tensor                        # β_t / sqrt(1 - ᾱ_t), ε's factor in DDPM eq. 11
    sqrt_recip_alpha_bars: Tensor           # 1 / sqrt(ᾱ_t)          } x̂_0 = x_t / sqrt(ᾱ_t)
    sqrt_recipm1_alpha_bars: Tensor         # sqrt(1 / ᾱ_t - 1)      }  - sqrt(1/ᾱ_t - 1) ε

    @property
    def T(self) -> int:
        """The number of diffusion steps."""
        return self.betas.shape[0]

    @classmethod
    def from_betas(cls, betas) -> NoiseSchedule:
        """Build the schedule from β_t ``(T,)`` (tensor or array, values in (0, 1))."""
        betas = torch.as_tensor(betas)
        device = betas.device
        b = betas.detach().to("cpu", torch.float64)  # float64 on the CPU (MPS has no float64)
        if b.ndim != 1 or b.numel() < 1:
            raise ValueError(f"betas must be a 1-D tensor of shape (T,), T >= 1, "
                             f"got shape {tuple(b.shape)}")
        if not ((b > 0) & (b < 1)).all():
            bad = int(torch.nonzero(~((b > 0) & (b < 1)))[0])
            raise ValueError(
                f"betas must lie in (0, 1), got β = {b[bad].item():.6g} at t = {bad}"
                + (" — β = 1 erases the signal completely (ᾱ = 0 from there on) and the "
                   "reverse step divides by sqrt(α_t) = 0; clip the betas below 1 "
                   "(e.g. max_beta=0.999)" if b[bad] >= 1 else ""))
        alphas = 1.0 - b
        alpha_bars = torch.cumprod(alphas, dim=0)
        alpha_bar_prev = torch.cat([b.new_ones(1), alpha_bars[:-1]])
        # DDPM, Ho et al. 2020, eq. 7
        posterior_variance = b * (1.0 - alpha_bar_prev) / (1.0 - alpha_bars)
        # β̃_0 = 0: use β̃_1 in its log, as improved-diffusion does (β_0 when T = 1)
        first = posterior_variance[1:2] if len(b) > 1 else b[:1]
        posterior_log_variance_clipped = torch.log(torch.cat([first, posterior_variance[1:]]))
        values = dict(
            betas=b, alphas=alphas, alpha_bars=alpha_bars, alpha_bar_prev=alpha_bar_prev,
            posterior_variance=posterior_variance,
            posterior_log_variance_clipped=posterior_log_variance_clipped,
            posterior_mean_coef_x0=b * alpha_bar_prev.sqrt() / (1.0 - alpha_bars),
            posterior_mean_coef_xt=alphas.sqrt() * (1.0 - alpha_bar_prev) / (1.0 - alpha_bars),
            sqrt_alpha_bars=alpha_bars.sqrt(),
            sqrt_one_minus_alpha_bars=(1.0 - alpha_bars).sqrt(),
            sqrt_recip_alphas=alphas.rsqrt(),
            eps_coef=b / (1.0 - alpha_bars).sqrt(),
            sqrt_recip_alpha_bars=alpha_bars.rsqrt(),
            sqrt_recipm1_alpha_bars=(1.0 / alpha_bars - 1.0).sqrt(),
        )
        return cls(**{k: v.to(device, torch.float32) for k, v in values.items()})

    @classmethod
    def create(cls, name: str = "cosine", T: int = 1000) -> NoiseSchedule:
        """The schedule called ``name`` (see :func:`make_beta_schedule`) with T steps."""
        return cls.from_betas(make_beta_schedule(name, T))

    def to(self, device) -> NoiseSchedule:
        """A copy with every tensor on ``device``."""
        return NoiseSchedule(**{name: value.to(device) for name, value in vars(self).items()})

    def log_snr(self) -> Tensor:
        """log SNR_t = log(ᾱ_t / (1 - ᾱ_t)), shape ``(T,)`` (Kingma et al. 2021, "Variational
        diffusion models", eq. 3); -inf where ᾱ_t = 0."""
        return torch.log(self.alpha_bars) - torch.log1p(-self.alpha_bars)


def snr(schedule: NoiseSchedule) -> Tensor:
    """SNR_t = ᾱ_t / (1 - ᾱ_t), the signal-to-noise ratio of x_t, shape ``(T,)``.

    It is the ratio of the signal's variance to the noise's in x_t when the data have unit
    variance; data of variance σ² give σ² · SNR_t (the shapes' pixels: σ² ≈ 0.53).
    """
    return schedule.alpha_bars / (1.0 - schedule.alpha_bars)


def extract(values: Tensor, t: Tensor, x_shape) -> Tensor:
    """``values[t]`` reshaped to ``(B, 1, ..., 1)`` (``len(x_shape)`` dims) to broadcast over x.

    ``values``: ``(T,)`` per-timestep values; ``t``: integer timesteps ``(B,)`` in [0, T);
    ``x_shape``: the shape of the batch, ``(B, C, H, W)``. The result is on ``t``'s device.
    """
    T = values.shape[0]
    is_int = isinstance(t, Tensor) and not (t.dtype.is_floating_point or t.dtype.is_complex
                                            or t.dtype == torch.bool)
    if not is_int or t.ndim != 1:
        raise ValueError("t must be a 1-D integer tensor of timesteps, shape (B,), got "
                         + (f"dtype {t.dtype} and shape {tuple(t.shape)}" if isinstance(t, Tensor)
                            else type(t).__name__))
    if t.numel() and not (0 <= int(t.min()) and int(t.max()) < T):
        raise ValueError(f"timesteps t must lie in [0, T) = [0, {T}), "
                         f"got values in [{int(t.min())}, {int(t.max())}]")
    if len(x_shape) < 1 or x_shape[0] != t.shape[0]:
        raise ValueError(f"t should hold one timestep per batch item: expected shape "
                         f"({x_shape[0] if len(x_shape) else '?'},), got {tuple(t.shape)}")
    out = values[t.to(values.device)].to(t.device)  # (B,)
    return out.reshape(t.shape[0], *([1] * (len(x_shape) - 1)))  # (B,) -> (B, 1, 1, 1)


def q_sample(x0: Tensor, t: Tensor, eps: Tensor, schedule: NoiseSchedule) -> Tensor:
    """Sample x_t ~ q(x_t | x_0) in one shot:

    x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε      (DDPM, Ho et al. 2020, eq. 4)

    ``x0``, ``eps``: ``(B, C, H, W)``; ``t``: integer timesteps ``(B,)`` in [0, T), one per
    item. Returns x_t, same shape, dtype and device as ``x0``.
    """
    if eps.shape != x0.shape:
        raise ValueError(f"eps must have the shape of x0, {tuple(x0.shape)}, "
                         f"got {tuple(eps.shape)}")
    signal = extract(schedule.sqrt_alpha_bars, t, x0.shape).to(x0)           # (B, 1, 1, 1)
    noise = extract(schedule.sqrt_one_minus_alpha_bars, t, x0.shape).to(x0)  # (B, 1, 1, 1)
    return signal * x0 + noise * eps


def q_posterior_mean_variance(x0: Tensor, xt: Tensor, t: Tensor,
                              schedule: NoiseSchedule) -> tuple[Tensor, Tensor]:
    """Mean and variance of the forward posterior q(x_{t-1} | x_t, x_0):

    mean     = β_t sqrt(ᾱ_{t-1}) / (1 - ᾱ_t) · x_0 + sqrt(α_t) (1 - ᾱ_{t-1}) / (1 - ᾱ_t) · x_t
    variance = β̃_t = β_t (1 - ᾱ_{t-1}) / (1 - ᾱ_t)        (DDPM, Ho et al. 2020, eqs. 6-7)

    With t = 0 (one step of noise), ᾱ_{-1} = 1: the mean is x_0 and the variance 0.
    ``x0``, ``xt``: ``(B, C, H, W)``; ``t``: ``(B,)``. Returns mean ``(B, C, H, W)`` and
    variance ``(B, 1, 1, 1)``.
    """
    if xt.shape != x0.shape:
        raise ValueError(f"xt must have the shape of x0, {tuple(x0.shape)}, "
                         f"got {tuple(xt.shape)}")
    coef_x0 = extract(schedule.posterior_mean_coef_x0, t, x0.shape).to(x0)  # (B, 1, 1, 1)
    coef_xt = extract(schedule.posterior_mean_coef_xt, t, x0.shape).to(x0)
    variance = extract(schedule.posterior_variance, t, x0.shape).to(x0)
    return coef_x0 * x0 + coef_xt * xt, variance


# ── 02 · UNet ────────────────────────────────────────────────────────────────────────
# One UNet serves every later lesson: pixels (03), class labels and a context sequence
# through cross-attention (04, reused in 06-08) and VAE latents (07). Blocks first, then
# the model, then the one call that measures how to run it fastest on this machine.

import contextlib  # noqa: E402  (this lesson's imports, kept with its section)
import copy  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from typing import Callable, ContextManager  # noqa: E402

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402


def sinusoidal_embedding(t: Tensor, dim: int, *, max_period: float = 10000) -> Tensor:
    """Sinusoidal embedding of the timesteps, ``(B,) -> (B, dim)``.

    With ``half = dim // 2`` frequencies ``ω_i = max_period^(-i / half)``, i = 0 .. half-1:
        emb(t) = [sin(t ω_0), ..., sin(t ω_{half-1}), cos(t ω_0), ..., cos(t ω_{half-1})]
    (Transformer, Vaswani et al. 2017, sec. 3.5; used for t by DDPM, Ho et al. 2020,
    appendix B). Sines first, then cosines. The result is float32 for integer ``t`` and
    follows ``t``'s dtype for floating ``t``; it lives on ``t``'s device.
    """
    if t.dim() != 1:
        raise ValueError(f"sinusoidal_embedding expected t of shape (B,), got {tuple(t.shape)}")
    if dim < 2 or dim % 2:
        raise ValueError(f"sinusoidal_embedding expected an even dim >= 2, got {dim}")
    dtype = t.dtype if t.is_floating_point() else torch.float32
    work = torch.promote_types(dtype, torch.float32)         # never compute angles in 16 bits
    half = dim // 2
    i = torch.arange(half, device=t.device, dtype=work)
    freqs = torch.exp(-math.log(max_period) * i / half)      # (half,) = max_period^(-i/half)
    angles = t.to(work)[:, None] * freqs[None, :]            # (B, half)
    return torch.cat([angles.sin(), angles.cos()], dim=1).to(dtype)  # (B, dim)


def _check_groups(channels: int, groups: int, where: str) -> None:
    if channels % groups:
        raise ValueError(f"{where}: GroupNorm needs channels divisible by groups={groups}, "
                         f"got {channels} channels")


def _check_heads(channels: int, heads: int, groups: int, where: str) -> None:
    if channels % heads:
        raise ValueError(f"{where} needs channels divisible by heads={heads}, got {channels}")
    _check_groups(channels, groups, where)


def _zero_(layer: nn.Module) -> nn.Module:
    """Set a layer's weight and bias to zero, so the branch it ends starts switched off."""
    for p in layer.parameters():
        nn.init.zeros_(p)
    return layer


class ResBlock(nn.Module):
    """Residual block with time injection (DDPM, Ho et al. 2020; improved DDPM, Nichol &
    Dhariwal 2021):

        h   = conv3x3(SiLU(GroupNorm(x))) + Linear(SiLU(emb))      # time, added per channel
        h   = conv3x3(dropout(SiLU(GroupNorm(h))))                 # this conv starts at zero
        out = skip(x) + h                                          # skip: 1x1 conv if C changes

    The second conv starts at zero, so a fresh block is the identity (its skip).
    ``x``: ``(B, in_ch, H, W)``, ``emb``: ``(B, time_dim)`` -> ``(B, out_ch, H, W)``.
    """

    def __init__(self, in_ch: int, out_ch: int, time_dim: int, *, groups: int = 8,
                 dropout: float = 0.0):
        super().__init__()
        _check_groups(in_ch, groups, "ResBlock")
        _check_groups(out_ch, groups, "ResBlock")
        self.time_dim = time_dim
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_proj = nn.Sequential(nn.SiLU(), nn.Linear(time_dim, out_ch))
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero_(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        if emb is None or emb.dim() != 2 or emb.shape[1] != self.time_dim:
            got = None if emb is None else tuple(emb.shape)
            raise ValueError(f"ResBlock expected the time embedding emb of shape "
                             f"(B, {self.time_dim}), got {got} — pass the UNet's embedding "
                             "of t (self.embed(t, labels)), not t itself")
        h = self.conv1(F.silu(self.norm1(x)))                     # (B, out_ch, H, W)
        h = h + self.time_proj(emb)[:, :, None, None]             # (B, out_ch) -> (B, out_ch, 1, 1)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


def _split_heads(x: Tensor, heads: int) -> Tensor:
    """``(B, N, C) -> (B, heads, N, C // heads)``."""
    B, N, C = x.shape
    return x.view(B, N, heads, C // heads).transpose(1, 2)


def _merge_heads(x: Tensor) -> Tensor:
    """``(B, heads, N, d) -> (B, N, heads * d)``."""
    B, heads, N, d = x.shape
    return x.transpose(1, 2).reshape(B, N, heads * d)


def _attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """softmax(q kᵀ / sqrt(d)) v with PyTorch's fused kernel, ``(B, heads, N, d)``.

    On a CPU under bfloat16 autocast it runs in float32: more accurate, and faster there
    (the CPU kernel's bfloat16 backward pass is slow; see benchmarks/bench_unet.py).
    """
    if q.device.type != "cpu" or q.dtype not in (torch.bfloat16, torch.float16):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    with torch.autocast("cpu", enabled=False):
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
    return out.to(q.dtype)


class SelfAttention(nn.Module):
    """Multi-head self-attention over the pixels of a feature map, with a residual:

        q, k, v = split_heads(Linear(GroupNorm(x)))                # one token per pixel
        out     = x + Linear(softmax(q kᵀ / sqrt(d)) v)            # output Linear starts at zero

    (Attention is all you need, Vaswani et al. 2017, eq. 1; in diffusion UNets since DDPM,
    Ho et al. 2020.) ``x``: ``(B, C, H, W)`` -> same shape; d = C / heads.
    """

    def __init__(self, channels: int, *, heads: int = 4, groups: int = 8):
        super().__init__()
        _check_heads(channels, heads, groups, "SelfAttention")
        self.heads = heads
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = _zero_(nn.Linear(channels, channels))

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)          # (B, C, H, W) -> (B, H*W, C)
        q, k, v = self.qkv(tokens).chunk(3, dim=-1)               # 3 x (B, H*W, C)
        q, k, v = (_split_heads(z, self.heads) for z in (q, k, v))  # (B, heads, H*W, d)
        out = _attend(q, k, v)                                    # softmax(q kᵀ/sqrt(d)) v
        out = self.proj(_merge_heads(out))                        # (B, H*W, C)
        return x + out.transpose(1, 2).reshape(B, C, H, W)


class CrossAttention(nn.Module):
    """Cross-attention from the pixels of a feature map to a context sequence, with a residual:

        q = Linear(GroupNorm(x)),  k, v = Linear(context)
        out = x + Linear(softmax(q kᵀ / sqrt(d) + mask) v)          # output Linear starts at zero

    (Latent diffusion, Rombach et al. 2022, sec. 3.3.) ``x``: ``(B, C, H, W)``,
    ``context``: ``(B, L, context_dim)``, ``context_mask``: optional ``(B, L)`` bool, True
    for real tokens and False for padding (never attended to).
    """

    def __init__(self, channels: int, context_dim: int, *, heads: int = 4, groups: int = 8):
        super().__init__()
        _check_heads(channels, heads, groups, "CrossAttention")
        self.heads = heads
        self.context_dim = context_dim
        self.norm = nn.GroupNorm(groups, channels)
        self.q = nn.Linear(channels, channels)
        self.kv = nn.Linear(context_dim, 2 * channels)
        self.proj = _zero_(nn.Linear(channels, channels))

    def forward(self, x: Tensor, context: Tensor, context_mask: Tensor | None = None) -> Tensor:
        B, C, H, W = x.shape
        if context is None or context.dim() != 3 or context.shape[0] != B \
                or context.shape[2] != self.context_dim:
            got = None if context is None else tuple(context.shape)
            raise ValueError(f"CrossAttention expected context of shape (B={B}, L, "
                             f"{self.context_dim}), got {got}")
        tokens = self.norm(x).flatten(2).transpose(1, 2)          # (B, H*W, C)
        q = _split_heads(self.q(tokens), self.heads)              # (B, heads, H*W, d)
        k, v = self.kv(context).chunk(2, dim=-1)                  # 2 x (B, L, C)
        k, v = _split_heads(k, self.heads), _split_heads(v, self.heads)  # (B, heads, L, d)
        mask = None if context_mask is None else context_mask[:, None, None, :]  # (B, 1, 1, L)
        out = _attend(q, k, v, mask)                              # (B, heads, H*W, d)
        out = self.proj(_merge_heads(out))                        # (B, H*W, C)
        return x + out.transpose(1, 2).reshape(B, C, H, W)


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 3x3 conv: ``(B, C, H, W) -> (B, C, H/2, W/2)``."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour upsampling, then a 3x3 conv.
    ``(B, C, H, W) -> (B, C, 2H, 2W)``."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


@dataclass
class UNetConfig:
    """Everything that decides a UNet's shape. Level i works at resolution
    ``image_size / 2**i`` with ``base_channels * channel_mults[i]`` channels."""

    in_channels: int = 3
    out_channels: int = 3
    base_channels: int = 64
    channel_mults: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (16,)  # resolutions (in pixels) with self-attention
    heads: int = 4
    groups: int = 8                                  # GroupNorm groups
    dropout: float = 0.0
    num_classes: int | None = None    # class labels 0..num_classes-1; num_classes = "no label"
    context_dim: int | None = None    # width of the context sequence for cross-attention
    attribute_dim: int | None = None  # width of a context vector (lesson 04: multi-hot attributes)
    image_size: int = 32

    @property
    def time_dim(self) -> int:
        return 4 * self.base_channels


class UNetLevel(nn.Module):
    """The blocks at one resolution: ``num_blocks`` ResBlocks, each followed by
    self-attention (and cross-attention to the context, if any) when ``attention``.

    ``res_block``, ``attention_block`` and ``cross_attention`` are the classes to build them
    from (the library's by default; a lesson passes the learner's own, with the same
    signatures).
    """

    def __init__(self, in_ch: int, out_ch: int, config: UNetConfig, *, num_blocks: int,
                 attention: bool, skip_channels: int = 0, res_block=ResBlock,
                 attention_block=SelfAttention, cross_attention=CrossAttention):
        super().__init__()
        self.in_channels, self.skip_channels = in_ch, skip_channels
        kw = dict(heads=config.heads, groups=config.groups)
        layers, kinds = [], []        # kinds says how to call each layer: "res", "self", "cross"
        for i in range(num_blocks):
            layers.append(res_block(in_ch if i == 0 else out_ch, out_ch, config.time_dim,
                                    groups=config.groups, dropout=config.dropout))
            kinds.append("res")
            if attention:
                layers.append(attention_block(out_ch, **kw))
                kinds.append("self")
                if config.context_dim is not None:
                    layers.append(cross_attention(out_ch, config.context_dim, **kw))
                    kinds.append("cross")
        self.layers = nn.ModuleList(layers)
        self.kinds = tuple(kinds)

    def forward(self, h: Tensor, emb: Tensor, context: Tensor | None = None,
                context_mask: Tensor | None = None) -> Tensor:
        if h.shape[1] != self.in_channels:
            hint = (f" — concatenate the skip first: torch.cat([h, skip], dim=1) adds its "
                    f"{self.skip_channels} channels" if self.skip_channels else "")
            raise ValueError(f"UNetLevel expected a feature map with {self.in_channels} "
                             f"channels, got {h.shape[1]}{hint}")
        for kind, layer in zip(self.kinds, self.layers):
            if kind == "res":
                h = layer(h, emb)
            elif kind == "cross":
                h = layer(h, context, context_mask)
            else:
                h = layer(h)
        return h


class UNet(nn.Module):
    """The course's UNet (Ronneberger et al. 2015, with the DDPM / improved-DDPM blocks of
    Ho et al. 2020 and Dhariwal & Nichol 2021): predicts a tensor shaped like ``x``.

    down:   in_conv, then per level: blocks -> keep a skip -> Downsample (not after the last)
    middle: ResBlock + attention at the lowest resolution
    up:     per level, deepest first: concatenate the skip -> blocks -> Upsample (not after the top)
    out:    GroupNorm -> SiLU -> conv3x3 (starts at zero)

    ``forward(x, t, *, labels=None, context=None, context_mask=None, attributes=None)``:
    ``x`` ``(B, C, H, W)``, ``t`` ``(B,)``, ``labels`` ``(B,)`` integers in [0, num_classes]
    (num_classes = "no label", for classifier-free guidance), ``context`` ``(B, L, context_dim)``,
    ``context_mask`` ``(B, L)`` bool (True = real token), ``attributes`` ``(B, attribute_dim)``
    a context vector (all zeros = nothing asked, see :class:`AttributeEmbedding`).

    ``res_block``, ``attention``, ``time_embedding``, ``attribute_embedding`` and
    ``cross_attention`` are what the UNet is built from: by default the library's
    :class:`ResBlock`, :class:`SelfAttention`, :func:`sinusoidal_embedding`,
    :class:`AttributeEmbedding` (lesson 04) and :class:`CrossAttention`. Blocks with the same signatures and layer names (lesson 02
    passes the learner's own) give the same parameter names, so checkpoints load into either.
    """

    def __init__(self, config: UNetConfig, *, res_block=ResBlock, attention=SelfAttention,
                 time_embedding=sinusoidal_embedding, attribute_embedding=None,
                 cross_attention=CrossAttention):
        super().__init__()
        attribute_embedding = attribute_embedding or AttributeEmbedding  # lesson 04's, below
        for name, value in [("res_block", res_block), ("attention", attention),
                            ("time_embedding", time_embedding),
                            ("attribute_embedding", attribute_embedding),
                            ("cross_attention", cross_attention)]:
            if not callable(value):
                raise ValueError(f"UNet expected {name} to be a class or function, got "
                                 f"{type(value).__name__}")
        self.config = c = config
        self.time_embedding = time_embedding              # t (B,) -> (B, base_channels)
        blocks = dict(res_block=res_block, attention_block=attention,
                      cross_attention=cross_attention)
        chans = [c.base_channels * m for m in c.channel_mults]
        sizes = [c.image_size // 2**i for i in range(len(chans))]
        self.time_mlp = nn.Sequential(nn.Linear(c.base_channels, c.time_dim), nn.SiLU(),
                                      nn.Linear(c.time_dim, c.time_dim))
        self.class_emb = (nn.Embedding(c.num_classes + 1, c.time_dim)
                          if c.num_classes is not None else None)
        self.attribute_emb = (attribute_embedding(c.attribute_dim, c.time_dim)
                              if c.attribute_dim is not None else None)
        self.in_conv = nn.Conv2d(c.in_channels, chans[0], 3, padding=1)
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        ch = chans[0]
        for i, (out_ch, size) in enumerate(zip(chans, sizes)):
            attn = size in c.attention_resolutions
            self.down.append(UNetLevel(ch, out_ch, c, num_blocks=c.num_res_blocks,
                                       attention=attn, **blocks))
            last = i == len(chans) - 1
            self.downsample.append(nn.Identity() if last else Downsample(out_ch))
            ch = out_ch
        self.middle = UNetLevel(ch, ch, c, num_blocks=1, attention=True, **blocks)
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for i in reversed(range(len(chans))):
            attn = sizes[i] in c.attention_resolutions
            self.up.append(UNetLevel(ch + chans[i], chans[i], c, num_blocks=c.num_res_blocks,
                                     attention=attn, skip_channels=chans[i], **blocks))
            self.upsample.append(nn.Identity() if i == 0 else Upsample(chans[i]))
            ch = chans[i]
        self.out = nn.Sequential(nn.GroupNorm(c.groups, ch), nn.SiLU(),
                                 _zero_(nn.Conv2d(ch, c.out_channels, 3, padding=1)))

    def embed(self, t: Tensor, labels: Tensor | None = None,
              attributes: Tensor | None = None) -> Tensor:
        """Time embedding, plus the class embedding and the context-vector embedding when
        the UNet has them: ``(B,) -> (B, time_dim)``. Joining a condition to the time
        embedding this way lets it reach every ResBlock (lesson 04)."""
        emb = self.time_mlp(self.time_embedding(t, self.config.base_channels))
        if self.class_emb is not None:
            if labels is None:
                raise ValueError(f"UNet.embed: this UNet has a class embedding (num_classes="
                                 f"{self.config.num_classes}), so pass labels too")
            emb = emb + self.class_emb(labels)            # (B, time_dim)
        if self.attribute_emb is not None:
            emb = emb + self.attribute_emb(attributes).to(emb.dtype)   # (B, time_dim)
        return emb

    def forward(self, x: Tensor, t: Tensor, *, labels: Tensor | None = None,
                context: Tensor | None = None, context_mask: Tensor | None = None,
                attributes: Tensor | None = None) -> Tensor:
        self.check_inputs(x, t, labels, context, context_mask, attributes)
        emb = self.embed(t, labels, attributes)                   # (B, time_dim)
        h = self.in_conv(x)                                       # (B, C_0, H, W)
        skips = []
        for level, down in zip(self.down, self.downsample):
            h = level(h, emb, context, context_mask)              # (B, C_i, H/2^i, W/2^i)
            skips.append(h)
            h = down(h)
        h = self.middle(h, emb, context, context_mask)
        for level, up in zip(self.up, self.upsample):
            h = torch.cat([h, skips.pop()], dim=1)                # (B, C_h + C_i, ...)
            h = level(h, emb, context, context_mask)
            h = up(h)
        return self.out(h).to(x.dtype)                            # (B, out_channels, H, W)

    def check_inputs(self, x, t, labels, context, context_mask, attributes=None) -> None:
        """Raise ValueError naming what was expected when an input does not fit the config."""
        c, n_down = self.config, len(self.config.channel_mults) - 1
        if x.dim() != 4 or x.shape[1] != c.in_channels:
            raise ValueError(f"UNet expected x of shape (B, {c.in_channels}, H, W), "
                             f"got {tuple(x.shape)}")
        B, (H, W) = x.shape[0], x.shape[2:]
        if H % 2**n_down or W % 2**n_down:
            raise ValueError(f"UNet expected H and W divisible by {2**n_down} "
                             f"({n_down} downsamplings), got {H}x{W}")
        if tuple(t.shape) != (B,):
            raise ValueError(f"UNet expected t of shape (B,) = ({B},), got {tuple(t.shape)}")
        self._check_labels(labels, B)
        self._check_context(context, context_mask, B)
        self._check_attributes(attributes, B)

    def _check_attributes(self, attributes, B: int) -> None:
        d = self.config.attribute_dim
        if d is None:
            if attributes is not None:
                raise ValueError("UNet got attributes but was built without attribute_dim "
                                 "(UNetConfig(attribute_dim=...))")
            return
        if attributes is None or tuple(attributes.shape) != (B, d) \
                or not attributes.is_floating_point():
            got = None if attributes is None else f"{attributes.dtype} {tuple(attributes.shape)}"
            raise ValueError(f"UNet was built with attribute_dim={d}: pass attributes, a float "
                             f"context vector of shape ({B}, {d}) (all zeros = nothing asked), "
                             f"got {got}")

    def _check_labels(self, labels, B: int) -> None:
        n = self.config.num_classes
        if n is None:
            if labels is not None:
                raise ValueError("UNet got labels but was built without num_classes "
                                 "(UNetConfig(num_classes=...))")
            return
        if labels is None:
            raise ValueError(f"UNet was built with num_classes={n}: pass labels of shape "
                             f"(B,) with values in [0, {n}] ({n} = no label)")
        if tuple(labels.shape) != (B,) or labels.is_floating_point():
            raise ValueError(f"UNet expected integer labels of shape ({B},), got "
                             f"{labels.dtype} of shape {tuple(labels.shape)}")
        if labels.min() < 0 or labels.max() > n:
            raise ValueError(f"UNet expected labels in [0, {n}] ({n} = no label), got "
                             f"values in [{labels.min().item()}, {labels.max().item()}]")

    def _check_context(self, context, context_mask, B: int) -> None:
        d = self.config.context_dim
        if d is None:
            if context is not None or context_mask is not None:
                raise ValueError("UNet got a context but was built without context_dim "
                                 "(UNetConfig(context_dim=...))")
            return
        if context is None or context.dim() != 3 or context.shape[0] != B or context.shape[2] != d:
            got = None if context is None else tuple(context.shape)
            raise ValueError(f"UNet expected context of shape ({B}, L, {d}), got {got}")
        if context_mask is not None:
            if context_mask.dtype != torch.bool or tuple(context_mask.shape) != context.shape[:2]:
                raise ValueError(f"UNet expected a bool context_mask of shape "
                                 f"{tuple(context.shape[:2])}, got {context_mask.dtype} "
                                 f"of shape {tuple(context_mask.shape)}")
            if not context_mask.any(dim=1).all():
                raise ValueError("UNet expected every context_mask row to keep at least one "
                                 "token (True)")


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# The fast path: measured on this machine, not guessed from its CPU family.

FAST_MODES = ("float32", "float32_channels_last", "bfloat16", "bfloat16_channels_last")
FAST_SETUP_CACHE = (Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
                    / "diffusion-course" / "fast_setup.json")
_FAST_MEASURED: dict[str, "FastChoice"] = {}   # this process's measurements, by _fast_key
_FAST_ON_DEVICE: dict[str, str] = {}           # device type -> the mode fast_setup last chose
_FAST_WORDS = {"float32": "float32", "float32_channels_last": "float32, channels_last",
               "bfloat16": "bfloat16 autocast",
               "bfloat16_channels_last": "bfloat16 autocast, channels_last"}


@dataclass
class FastChoice:
    """How :func:`fast_setup` runs a model, and why.

    ``mode``: one of :data:`FAST_MODES`. ``seconds``: the best time of one training pass
    (forward + backward of ``batch`` images) for each mode measured. ``source``: "measured",
    "cached" (an earlier measurement), "forced" (``mode=``), "off" (``measure=False``) or
    "default" (nothing measured: another device, a model it cannot feed, or a machine too busy
    to time even one pass per mode). ``measure_s``: how long measuring took.
    """

    mode: str
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    source: str = "default"
    batch: int = 0
    measure_s: float = 0.0

    @property
    def bf16(self) -> bool:
        return self.mode.startswith("bfloat16")

    @property
    def channels_last(self) -> bool:
        return self.mode.endswith("channels_last")

    def describe(self) -> str:
        """One line: the mode, and its training speed against float32 when measured."""
        words = _FAST_WORDS[self.mode]
        if self.mode not in self.seconds or "float32" not in self.seconds:
            return f"{words} ({self.source})"
        ratio = self.seconds["float32"] / self.seconds[self.mode]
        when = "measured just now" if self.source == "measured" else "measured earlier"
        return (f"{words}: {ratio:.2f}x float32's training speed ({when}, in "
                f"{self.measure_s:.1f} s at batch {self.batch})")


def _bf16_possible(device: torch.device) -> bool:
    return device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_bf16_supported())


def _fast_candidates(device: torch.device) -> tuple[str, ...]:
    """The modes measured on ``device``: a CPU or a CUDA GPU (bfloat16 where it supports it);
    elsewhere (Apple's MPS, ...) none is measured."""
    if device.type not in ("cpu", "cuda"):
        return FAST_MODES[:1]
    return FAST_MODES if _bf16_possible(device) else FAST_MODES[:2]


def _fast_default(device) -> str:
    """The mode kept unless another measures clearly faster: bfloat16 on a CUDA GPU that
    supports it, float32 anywhere else."""
    device = torch.device(device)
    return "bfloat16" if device.type == "cuda" and _bf16_possible(device) else "float32"


def _bf16_is_fast(device, model: nn.Module | None = None) -> bool:
    """Whether to run ``model`` on ``device`` in bfloat16 autocast: what :func:`fast_setup`
    chose for ``model``, else what it last chose on this device (measured, cached or forced),
    else the conservative default: only on a CUDA GPU that supports bfloat16."""
    device = torch.device(device)
    choice = getattr(model, "fast_choice", None)
    if isinstance(choice, FastChoice):
        return choice.bf16
    if device.type in _FAST_ON_DEVICE:
        return _FAST_ON_DEVICE[device.type].startswith("bfloat16")
    return _fast_default(device) == "bfloat16"


def _cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _example_inputs(model: nn.Module, batch: int, device) -> tuple[tuple, dict] | None:
    """``(args, kwargs)`` for timing a :class:`UNet`: random images and timesteps (and labels
    and a context when it takes them); None for any other model."""
    if not isinstance(model, UNet):
        return None
    c, g = model.config, torch.Generator().manual_seed(0)
    x = torch.randn(batch, c.in_channels, c.image_size, c.image_size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    kwargs = {}
    if c.num_classes is not None:
        kwargs["labels"] = torch.randint(0, c.num_classes + 1, (batch,), generator=g)
    if c.context_dim is not None:
        kwargs["context"] = torch.randn(batch, 8, c.context_dim, generator=g)
    return (x.to(device), t.to(device)), {k: v.to(device) for k, v in kwargs.items()}


def _fast_key(model: nn.Module, device: torch.device, args: tuple, kwargs: dict) -> str:
    """What a measurement depends on: device, CPU threads, torch, the layers, input shapes."""
    shapes = [tuple(v.shape) for v in (*args, *kwargs.values()) if isinstance(v, Tensor)]
    layers = hashlib.sha256(f"{model!r} {shapes}".encode()).hexdigest()[:16]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return (f"{device.type}: {where} | {torch.get_num_threads()} threads | "
            f"torch {torch.__version__} | model {layers}")


def _pass_seconds(net: nn.Module, bf16: bool, args: tuple, kwargs: dict) -> float:
    """Seconds for one forward + backward pass of ``net`` (in bfloat16 autocast if ``bf16``)."""
    device = next(net.parameters()).device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda _device: None)
    sync(device)
    start = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        out = net(*args, **kwargs)
    loss = (out if isinstance(out, Tensor) else out[0]).float().square().mean()
    if loss.requires_grad:
        loss.backward()
    sync(device)
    seconds = time.perf_counter() - start
    net.zero_grad(set_to_none=True)
    return seconds


def _time_modes(model: nn.Module, modes, args: tuple, kwargs: dict, *,
                budget_s: float, rounds: int = 3) -> dict[str, float]:
    """The best time of one training pass per mode, on copies of ``model``. A warm-up round
    first (kernels picked, memory allocated), then timed rounds that take the modes in turns,
    so a busy machine slows them alike, until ``budget_s`` is spent. On a machine so busy
    that 3 x ``budget_s`` pass first, it stops there: a mode not yet timed is left out, as
    is a mode that fails (an operation without a bfloat16 kernel, say)."""
    nets = {False: copy.deepcopy(model).train()}
    nets[True] = copy.deepcopy(nets[False]).to(memory_format=torch.channels_last)
    best = dict.fromkeys(modes, math.inf)
    start = time.perf_counter()
    for round_ in range(rounds + 1):                  # round 0 is the warm-up
        for mode in list(best):
            if time.perf_counter() - start > 3 * budget_s:
                return {mode: seconds for mode, seconds in best.items() if seconds < math.inf}
            choice = FastChoice(mode)
            try:
                seconds = _pass_seconds(nets[choice.channels_last], choice.bf16, args, kwargs)
            except (RuntimeError, ValueError, TypeError, NotImplementedError):
                del best[mode]
                continue
            if round_:
                best[mode] = min(best[mode], seconds)
        if round_ and time.perf_counter() - start > budget_s:
            break
    return {mode: seconds for mode, seconds in best.items() if seconds < math.inf}


def _read_fast_cache(key: str) -> FastChoice | None:
    try:
        choice = FastChoice(**json.loads(FAST_SETUP_CACHE.read_text())[key])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return choice if choice.mode in FAST_MODES else None


def _write_fast_cache(key: str, choice: FastChoice) -> None:
    """Add ``choice`` to the cache file (written under a temporary name, then renamed);
    a cache that cannot be written is skipped."""
    path = FAST_SETUP_CACHE
    try:
        entries = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        entries = {}
    entries = entries if isinstance(entries, dict) else {}
    entries[key] = dataclasses.asdict(choice)
    text = json.dumps(entries, indent=1, sort_keys=True) + "\n"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, lambda temporary: temporary.write_text(text))
    except OSError:
        pass


def _measured_choice(model: nn.Module, device: torch.device, *, cache: bool, batch,
                     budget_s: float, inputs) -> FastChoice:
    """Measure the candidate modes (or find an earlier measurement) and pick one: the
    default unless another mode is at least 5% faster."""
    modes, default = _fast_candidates(device), _fast_default(device)
    batch = batch or (32 if device.type == "cuda" else 4)
    example = (_example_inputs(model, batch, device) if inputs is None else
               (tuple(v.to(device) if isinstance(v, Tensor) else v for v in inputs), {}))
    if len(modes) == 1 or example is None:
        return FastChoice(default)
    key = _fast_key(model, device, *example)
    earlier = (_FAST_MEASURED.get(key) or _read_fast_cache(key)) if cache else None
    if earlier is not None:
        return dataclasses.replace(earlier, source="cached")
    start = time.perf_counter()
    rng_devices = ([torch.cuda.current_device() if device.index is None else device.index]
                   if device.type == "cuda" else [])
    with torch.random.fork_rng(devices=rng_devices), torch.enable_grad():
        seconds = _time_modes(model, modes, *example, budget_s=budget_s)
    if not seconds:
        return FastChoice(default)
    fastest = min(seconds, key=seconds.get)
    keep = default in seconds and seconds[fastest] > 0.95 * seconds[default]
    choice = FastChoice(default if keep else fastest, seconds, "measured",
                        len(example[0][0]), time.perf_counter() - start)
    _FAST_MEASURED[key] = choice
    # Only a clean measurement is kept for later processes: one that timed every mode within
    # its budget. On a machine busy with other work the times say little; measure again later.
    if cache and set(seconds) == set(modes) and choice.measure_s <= 2 * budget_s:
        _write_fast_cache(key, choice)
    return choice


def fast_setup(model: nn.Module, *, measure: bool = True, mode: str | None = None,
               cache: bool = True, batch: int | None = None, budget_s: float = 2.0,
               inputs: tuple | None = None) -> tuple[nn.Module, Callable[[], ContextManager]]:
    """Run ``model`` the fastest way measured on this machine: returns ``(model, autocast)``.

    Wrap forward passes (and the loss) in ``with autocast():``; call ``backward`` outside.
    The candidates, :data:`FAST_MODES`, compute the same function up to float rounding:
    float32 in the default (NCHW) memory layout; float32 with the weights in channels_last
    layout, which the convolution libraries read without reordering; and bfloat16 autocast
    (convolutions and matrix products in bfloat16; weights, optimiser and the UNet's output
    stay float32), in either layout. Which is fastest depends on the machine, not only on
    its CPU family: on one x86 server with AVX512-BF16 bfloat16 autocast trained lesson 03's
    UNet 1.57x faster than float32, on another 0.65x as fast. So this measures: on copies of
    ``model``, a warm-up and a few timed forward + backward passes per mode (``batch``
    images: 4 on a CPU, 32 on a GPU; about ``budget_s`` seconds in all), and keeps the
    default (float32, or bfloat16 on a CUDA GPU that supports it) unless another mode is
    at least 5% faster. Other devices (Apple's MPS) keep float32 without measuring.

    The choice is remembered for this process and, with ``cache``, in the JSON file
    :data:`FAST_SETUP_CACHE`, keyed by the device, the CPU and its threads, torch's version
    and the model's layers, so a later call takes no time; ``cache=False`` measures again.
    ``measure=False``: plain float32, the model's weights and layout untouched.
    ``mode=``: one of :data:`FAST_MODES`, without measuring. ``inputs``: the positional
    inputs of one forward pass, to measure a model other than a :class:`UNet` (which is fed
    random images and timesteps); such a model gets the default without them.
    The choice is kept as ``model.fast_choice`` (a :class:`FastChoice`: the mode, the seconds
    per mode, where it came from); :func:`train` and :func:`ddpm_sample` follow it by default.
    Measuring draws nothing from the global random generators.
    """
    device = next(model.parameters()).device
    if mode is not None:
        if mode not in FAST_MODES or (mode.startswith("bfloat16") and not _bf16_possible(device)):
            raise ValueError(f"fast_setup: mode must be one of {FAST_MODES} (bfloat16 only "
                             f"on a CPU or a CUDA GPU that supports it), got {mode!r} on {device}")
        choice = FastChoice(mode, source="forced")
    elif not measure:
        choice = FastChoice("float32", source="off")
    else:
        choice = _measured_choice(model, device, cache=cache, batch=batch, budget_s=budget_s,
                                  inputs=inputs)
    if choice.source in ("measured", "cached", "forced"):
        _FAST_ON_DEVICE[device.type] = choice.mode
    model.fast_choice = choice
    if choice.channels_last:
        model = model.to(memory_format=torch.channels_last)
    autocast = (functools.partial(torch.autocast, device.type, dtype=torch.bfloat16)
                if choice.bf16 else contextlib.nullcontext)
    return model, autocast


# ── 03 · Training and sampling ───────────────────────────────────────────────────────
# Checkpoints and their manifest (used by every later lesson), the noise-prediction loss,
# EMA, one training step, the training loop (a generator), the DDPM reverse step and the
# sampling loop (a generator), and the attribute classifier that measures sample quality.

import copy  # noqa: E402  (this lesson's imports, kept with its section)
import functools  # noqa: E402
import hashlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from tqdm.auto import tqdm as _tqdm_auto  # noqa: E402
from tqdm.std import tqdm as _tqdm_text  # noqa: E402

# Progress bars: a live widget in Jupyter, a live text bar in a terminal, one final line in
# a notebook executed by a program (there a widget would be stored as its first frame, 0 %).


def _kernel_without_frontend() -> bool:
    """True in a Jupyter kernel whose current cell was sent by a program, not a person.

    Frontends (JupyterLab, Notebook, VS Code, Colab) send cells with ``allow_stdin=True``
    so that ``input()`` works; nbclient, nbval and papermill send ``allow_stdin=False``.
    """
    shell = sys.modules["IPython"].get_ipython() if "IPython" in sys.modules else None
    kernel = getattr(shell, "kernel", None)
    if kernel is None or not hasattr(kernel, "get_parent"):
        return False  # a terminal or a plain IPython shell
    content = (kernel.get_parent() or {}).get("content", {})
    return "allow_stdin" in content and not content["allow_stdin"]


class _FinalLineBar(_tqdm_text):
    """A text bar that draws nothing while it runs and prints its final state on closing."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("ascii", False)  # the █ bar, as a terminal would draw it
        super().__init__(*args, file=io.StringIO(), mininterval=float("inf"), **kwargs)

    def close(self):
        if not self.disable:  # tqdm sets disable once closed: printed once
            print(self, file=sys.stdout)
        super().close()


def tqdm(iterable=None, **kwargs):
    """A tqdm progress bar over ``iterable`` (same keywords as ``tqdm.auto.tqdm``).

    A live widget in a Jupyter frontend, a live text bar in a terminal; in a notebook run
    by a program (nbclient, nbval, papermill) a single line with the final state, printed
    when the loop ends, so that the stored notebook shows the finished bar.
    """
    bar = _FinalLineBar if _kernel_without_frontend() else _tqdm_auto
    return bar(iterable, **kwargs)


# Checkpoints: data/manifest.json maps a name to {file, sha256, size_bytes, command, steps,
# wall_time_s, device, parameters, config, quality}. A checkpoint is a plain state dict.

MANIFEST_FILE = "manifest.json"


def file_sha256(path) -> str:
    """The SHA-256 hex digest of the file at ``path``."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class CheckpointManifest:
    """The shipped checkpoints' records, read from / written to ``data_dir/manifest.json``."""

    path: Path
    entries: dict

    @classmethod
    def load(cls, data_dir=None) -> CheckpointManifest:
        """Read the manifest in ``data_dir`` (default :data:`DATA_DIR`); empty if there is none."""
        path = Path(DATA_DIR if data_dir is None else data_dir) / MANIFEST_FILE
        entries = json.loads(path.read_text()) if path.exists() else {}
        return cls(path=path, entries=entries)

    def entry(self, name: str) -> dict:
        """The record of checkpoint ``name``; ValueError listing the known names otherwise."""
        if name not in self.entries:
            raise ValueError(f"no checkpoint called {name!r} in {self.path}; "
                             f"known: {sorted(self.entries)}")
        return self.entries[name]

    def update(self, name: str, **fields) -> None:
        """Set fields of the record ``name`` (created if new) and write the manifest back.

        Written to a temporary file in the same folder, then renamed over the manifest, so
        an interruption leaves the old manifest or the new one, never a part of one.
        """
        self.entries.setdefault(name, {}).update(fields)
        text = json.dumps(self.entries, indent=2, sort_keys=True) + "\n"
        write_atomically(self.path, lambda temporary: temporary.write_text(text))


def load_checkpoint(name: str, *, data_dir=None) -> dict[str, Tensor]:
    """The state dict of the shipped checkpoint ``name``, checked against the manifest.

    Raises FileNotFoundError if the file is missing and ValueError if its sha256 differs
    from the manifest's; both messages name the file and the command that rebuilds it.
    Loaded on the CPU with ``weights_only=True`` (no pickled objects); float16 tensors
    (stored so to halve the file) come back as float32.
    """
    manifest = CheckpointManifest.load(data_dir)
    entry = manifest.entry(name)
    path = manifest.path.parent / entry["file"]
    rebuild = f"rebuild it with `{entry.get('command', '?')}` (from the repository root)"
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {name!r}: file {path} is missing; {rebuild}")
    sha = file_sha256(path)
    if sha != entry["sha256"]:
        raise ValueError(f"checkpoint {name!r}: file {path} is corrupt or out of date (sha256 "
                         f"{sha[:12]}…, manifest says {entry['sha256'][:12]}…); {rebuild}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v.float() if v.dtype == torch.float16 else v for k, v in state.items()}


def save_checkpoint(name: str, state_dict: dict, *, command: str, data_dir=None,
                    half: bool = False, **record) -> dict:
    """Write ``state_dict`` to ``data_dir/<name>.pt`` and record it in the manifest.

    ``command`` is the exact command that reproduces the file; ``record`` holds the other
    manifest fields (steps, wall_time_s, device, parameters, config, quality, ...).
    ``half=True`` stores floating tensors as float16. Returns the manifest record.
    The file is written under a temporary name in the same folder and renamed into place
    once complete, then the manifest is updated (renamed into place too): an interruption
    while writing leaves the old checkpoint and its record as they were.
    """
    manifest = CheckpointManifest.load(data_dir)
    path = manifest.path.parent / f"{name}.pt"
    state = {k: (v.half() if half and v.is_floating_point() else v).detach().cpu().contiguous()
             for k, v in state_dict.items()}
    write_atomically(path, lambda temporary: torch.save(state, temporary))
    manifest.update(name, file=path.name, sha256=file_sha256(path),
                    size_bytes=path.stat().st_size, command=command,
                    dtype="float16" if half else "float32", **record)
    return manifest.entries[name]


def load_shipped_model(name: str, build, *, data_dir=None, device=None) -> nn.Module:
    """The shipped checkpoint ``name`` loaded into ``build(config)``, the model its manifest
    ``config`` describes, on ``device`` (default the CPU) and in eval mode."""
    model = build(CheckpointManifest.load(data_dir).entry(name)["config"])
    model.load_state_dict(load_checkpoint(name, data_dir=data_dir))
    return model.to(device or "cpu").eval()


# The training objective


def diffusion_loss(model: nn.Module, x0: Tensor, schedule: NoiseSchedule, *,
                   t: Tensor | None = None, eps: Tensor | None = None,
                   min_snr_gamma: float | None = None, **cond) -> Tensor:
    """The simple noise-prediction loss  (DDPM, Ho et al. 2020, eq. 14, Algorithm 1):

    L = E_{t, x_0, ε} ‖ε - ε_θ(sqrt(ᾱ_t) x_0 + sqrt(1-ᾱ_t) ε, t)‖²

    ``x0``: ``(B, C, H, W)``; ``t`` (optional, ``(B,)``) and ``eps`` (optional, like ``x0``)
    are drawn here when not given; ``cond`` goes to the model (``labels=``, ``context=``).
    Returns the mean over every pixel of the batch, a scalar tensor with its graph.
    ``min_snr_gamma=γ`` weights each image's error by min(SNR_t, γ) / SNR_t (min-SNR-γ,
    Hang et al. 2023, eq. 8 for ε-prediction), so that the many easy low-noise timesteps
    do not dominate the gradient; off by default.
    """
    if x0.ndim != 4:
        raise ValueError(f"x0 must be a batch of images (B, C, H, W), got shape {tuple(x0.shape)}")
    if t is None:
        # t ~ U{0, ..., T-1}: torch.randint(0, T, ...) draws from [0, T), T itself excluded
        t = torch.randint(0, schedule.T, (x0.shape[0],), device=x0.device)
    if eps is None:
        eps = torch.randn_like(x0)                       # ε ~ N(0, I), (B, C, H, W)
    xt = q_sample(x0, t, eps, schedule)                  # DDPM eq. 4
    eps_pred = model(xt, t, **cond)                      # ε_θ(x_t, t), (B, C, H, W)
    if min_snr_gamma is None:
        return F.mse_loss(eps_pred.float(), eps.float())     # mean over B, C, H, W
    snr_t = extract(schedule.alpha_bars / (1 - schedule.alpha_bars), t, x0.shape).float()
    weight = snr_t.clamp(max=min_snr_gamma) / snr_t           # (B, 1, 1, 1)
    return (weight * (eps_pred.float() - eps.float()) ** 2).mean()


# Exponential moving average of the weights


@torch.no_grad()
def ema_update_(ema_params, params, decay: float) -> None:
    """In place, for each pair:  θ_ema ← decay · θ_ema + (1 - decay) · θ.

    ``ema_params`` (the shadow copy, updated) and ``params`` (the trained model's, read
    only) are matching sequences of tensors. The average forgets with time constant
    about 1 / (1 - decay) steps.
    """
    for ema_p, p in zip(ema_params, params, strict=True):
        ema_p.mul_(decay).add_(p.detach().to(ema_p.dtype), alpha=1.0 - decay)


class EMA:
    """A shadow copy of a model whose weights are an exponential moving average.

    DDPM samples from such an average (Ho et al. 2020, appendix B: decay 0.9999): it
    smooths out the wander of the weights from batch to batch. The decay warms up as
    min(decay, (1 + n) / (10 + n)) after n updates (:meth:`decay_at`), so short runs are
    not dominated by the random initial weights. ``update_fn`` does the averaging, with
    :func:`ema_update_`'s signature (default :func:`ema_update_`; a lesson passes the
    learner's own).
    """

    def __init__(self, model: nn.Module, *, decay: float = 0.999, update_fn=None):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay}")
        self.decay = decay
        self.num_updates = 0
        self.update_fn = ema_update_ if update_fn is None else update_fn
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def decay_at(self, num_updates: int) -> float:
        """The decay the update after ``num_updates`` updates uses: min(decay, (1+n)/(10+n))."""
        return min(self.decay, (1 + num_updates) / (10 + num_updates))

    def update(self, model: nn.Module) -> None:
        """Move the shadow weights towards ``model``'s (buffers are copied)."""
        decay = self.decay_at(self.num_updates)
        self.update_fn(list(self.model.parameters()), list(model.parameters()), decay)
        for ema_b, b in zip(self.model.buffers(), model.buffers(), strict=True):
            ema_b.copy_(b)
        self.num_updates += 1

    def state_dict(self) -> dict[str, Tensor]:
        """The averaged weights, a state dict for the model's class."""
        return self.model.state_dict()


# One optimisation step and the training loop


def autocast_context(device, *, enabled: bool):
    """bfloat16 autocast on ``device`` when ``enabled`` (else a no-op context)."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x0: Tensor,
               schedule: NoiseSchedule, *, max_grad_norm: float | None = 1.0, scheduler=None,
               ema: EMA | None = None, autocast: bool = False,
               min_snr_gamma: float | None = None, **cond) -> float:
    """One step of DDPM training (Ho et al. 2020, Algorithm 1), returning the loss as a float.

    1. clear the old gradients; 2. the loss of :func:`diffusion_loss`; 3. backpropagate;
    4. clip the gradient norm to ``max_grad_norm``; 5. the optimizer step;
    6. the learning-rate ``scheduler`` step and the ``ema`` update, when given.
    ``autocast=True`` runs the forward pass in bfloat16 (fast on recent GPUs).
    """
    model.train()
    optimizer.zero_grad(set_to_none=True)                            # 1.
    with autocast_context(x0.device, enabled=autocast):
        loss = diffusion_loss(model, x0, schedule, min_snr_gamma=min_snr_gamma, **cond)  # 2.
    loss.backward()                                                  # 3.
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)  # 4.
    optimizer.step()                                                 # 5.
    if scheduler is not None:                                        # 6.
        scheduler.step()
    if ema is not None:
        ema.update(model)
    return loss.item()


def warmup_lr_factor(step: int, *, warmup_steps: int, total_steps: int | None = None,
                     shape: str = "constant") -> float:
    """Learning-rate multiplier: linear warm-up over ``warmup_steps``, then constant
    (``shape="constant"``) or a cosine decay to 0 at ``total_steps`` (``shape="cosine"``)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if shape == "constant":
        return 1.0
    if shape != "cosine" or total_steps is None:
        raise ValueError(f"shape must be 'constant', or 'cosine' with total_steps, got {shape!r}")
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_lr_scheduler(optimizer: torch.optim.Optimizer, *, warmup_steps: int,
                      total_steps: int | None = None, shape: str = "constant"):
    """A ``LambdaLR`` following :func:`warmup_lr_factor`; call ``.step()`` after each step."""
    factor = functools.partial(warmup_lr_factor, warmup_steps=max(1, warmup_steps),
                               total_steps=total_steps, shape=shape)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class TrainState:
    """What :func:`train` yields after each step."""

    step: int     # steps done so far (1 after the first)
    loss: float   # this step's loss
    lr: float     # the learning rate this step used


def _forever(batches):
    """Cycle through an iterable of batches (a DataLoader) without end."""
    while True:
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty:
            raise ValueError("the data yielded no batches")


def train(model: nn.Module, batches, schedule: NoiseSchedule, *, steps: int,
          lr: float = 2e-4, warmup_steps: int = 100, lr_shape: str = "constant",
          max_grad_norm: float | None = 1.0, ema: EMA | None = None, optimizer=None,
          cond_fn=None, autocast: bool | None = None, device=None, progress: bool = True,
          step_fn=None, scheduler=None, start_step: int = 0,
          min_snr_gamma: float | None = None):
    """Train ``model`` to predict the noise, yielding a :class:`TrainState` after every step.

    A generator, so a notebook can plot the loss as it falls::

        for state in du.train(model, loader, schedule, steps=500):
            losses.append(state.loss)

    ``batches``: an iterable of image tensors or of tuples whose first item is the images
    (``(B, C, H, W)`` in [-1, 1]; re-iterated as long as needed). ``cond_fn(batch)``, if
    given, returns the model's conditioning keywords, e.g. ``{"labels": batch[1]}``.
    AdamW with ``lr`` unless an ``optimizer`` is given; linear warm-up of the learning rate.
    ``autocast``: bfloat16 for the forward pass (default: where :func:`fast_setup` would).
    ``step_fn``: the function that makes one step, with :func:`train_step`'s signature
    (default :func:`train_step`; a lesson passes the learner's own).
    To continue an interrupted run, pass its ``optimizer`` and learning-rate ``scheduler``
    with their saved states loaded, and ``start_step``, the steps it had done.
    ``min_snr_gamma``: the loss weighting of :func:`diffusion_loss` (passed to ``step_fn``
    only when given).
    """
    step_fn = train_step if step_fn is None else step_fn
    device = torch.device(device) if device is not None else next(model.parameters()).device
    autocast = _bf16_is_fast(device, model) if autocast is None else autocast
    schedule = schedule.to(device)
    optimizer = optimizer or torch.optim.AdamW(model.parameters(), lr=lr)
    if scheduler is None:
        scheduler = make_lr_scheduler(optimizer, warmup_steps=warmup_steps, total_steps=steps,
                                      shape=lr_shape)
    if not 0 <= start_step <= steps:
        raise ValueError(f"start_step must lie in [0, steps={steps}], got {start_step}")
    data = _forever(batches)
    bar = tqdm(range(start_step + 1, steps + 1), desc="training", disable=not progress,
               initial=start_step, total=steps)
    for step in bar:
        batch = next(data)
        x0 = (batch[0] if isinstance(batch, (tuple, list)) else batch).to(device)
        cond = {k: v.to(device) if isinstance(v, Tensor) else v
                for k, v in (cond_fn(batch) if cond_fn else {}).items()}
        lr_now = optimizer.param_groups[0]["lr"]
        loss = step_fn(model, optimizer, x0, schedule, max_grad_norm=max_grad_norm,
                       scheduler=scheduler, ema=ema, autocast=autocast, **cond,
                       **({} if min_snr_gamma is None else {"min_snr_gamma": min_snr_gamma}))
        if step % 10 == 0 or step == steps:
            bar.set_postfix(loss=f"{loss:.4f}")
        yield TrainState(step=step, loss=loss, lr=lr_now)


# Sampling: the DDPM reverse (ancestral) step and the loop that calls it

VARIANCES = ("posterior", "beta")


def ddpm_step(model_eps: Tensor, xt: Tensor, t: Tensor, schedule: NoiseSchedule, *,
              variance: str = "posterior", noise: Tensor | None = None) -> Tensor:
    """One reverse step x_t -> x_{t-1}  (DDPM, Ho et al. 2020, Algorithm 2 and eq. 11):

    x_{t-1} = 1/sqrt(α_t) · (x_t - β_t / sqrt(1 - ᾱ_t) · ε_θ(x_t, t)) + σ_t z,   z ~ N(0, I)

    The mean is the posterior mean of q(x_{t-1} | x_t, x_0) (eq. 7) at the predicted
    x̂_0 = (x_t - sqrt(1-ᾱ_t) ε_θ) / sqrt(ᾱ_t). σ_t² = β̃_t (``variance="posterior"``) or
    β_t (``"beta"``); both are discussed in DDPM section 3.2. ``t`` counts in code indices
    (paper t = code t + 1): t = 0 is the paper's last step, x_1 -> x_0, which adds no noise
    and returns the mean. A pure function of tensors: ``model_eps`` is the model's ε
    prediction ``(B, C, H, W)`` for ``xt`` ``(B, C, H, W)`` at timesteps ``t`` ``(B,)``;
    ``noise`` is z (drawn if None).
    """
    if variance not in VARIANCES:
        raise ValueError(f"variance must be one of {VARIANCES}, got {variance!r}")
    if model_eps.shape != xt.shape:
        raise ValueError(f"model_eps must have the shape of xt, {tuple(xt.shape)}, "
                         f"got {tuple(model_eps.shape)}")
    # 1. the per-timestep values, broadcast to (B, 1, 1, 1), from the schedule's float64 maths
    sqrt_recip_alpha_t = extract(schedule.sqrt_recip_alphas, t, xt.shape).to(xt)  # 1/sqrt(α_t)
    eps_coef_t = extract(schedule.eps_coef, t, xt.shape).to(xt)      # β_t / sqrt(1 - ᾱ_t)
    # 2. the mean of p_θ(x_{t-1} | x_t), DDPM eq. 11
    mean = sqrt_recip_alpha_t * (xt - eps_coef_t * model_eps)
    # 3. the standard deviation σ_t, zero at t = 0
    var_values = schedule.posterior_variance if variance == "posterior" else schedule.betas
    sigma_t = extract(var_values, t, xt.shape).to(xt).sqrt()
    sigma_t = sigma_t * (t > 0).to(xt).reshape(sigma_t.shape)
    if noise is None:
        noise = torch.randn_like(xt)
    return mean + sigma_t * noise


def _eps_with_clipped_x0(model_eps: Tensor, xt: Tensor, t: Tensor,
                         schedule: NoiseSchedule) -> Tensor:
    """ε consistent with x̂_0 = (x_t - sqrt(1-ᾱ_t) ε) / sqrt(ᾱ_t) clipped to [-1, 1].

    Near t = T-1, 1/sqrt(α_t) is large and amplifies any error in ε; clipping the implied
    x̂_0 to the pixel range keeps the reverse step stable (improved-diffusion's
    ``clip_denoised``). Where x̂_0 is already in range this returns ``model_eps`` unchanged.
    """
    recip = extract(schedule.sqrt_recip_alpha_bars, t, xt.shape).to(xt)      # 1/sqrt(ᾱ_t)
    recipm1 = extract(schedule.sqrt_recipm1_alpha_bars, t, xt.shape).to(xt)  # sqrt(1/ᾱ_t - 1)
    x0_hat = recip * xt - recipm1 * model_eps                     # DDPM eq. 4 solved for x_0
    return (recip * xt - x0_hat.clamp(-1, 1)) / recipm1           # ... and for ε


def respace_schedule(schedule: NoiseSchedule, num_steps: int) -> tuple[NoiseSchedule, Tensor]:
    """A shorter schedule that visits ``num_steps`` of the T timesteps, evenly spaced.

    Keeps ᾱ at the chosen timesteps τ_1 < ... < τ_S and sets β_i = 1 - ᾱ_{τ_i} / ᾱ_{τ_{i-1}},
    so DDPM's reverse step still applies, with bigger steps (Improved DDPM, Nichol &
    Dhariwal 2021, section 4). Returns the new schedule and the original timesteps τ ``(S,)``
    (the model must be called with τ_i, not i).
    """
    if not 1 <= num_steps <= schedule.T:
        raise ValueError(f"num_steps must lie in [1, T] = [1, {schedule.T}], got {num_steps}")
    taus = torch.linspace(0, schedule.T - 1, num_steps, dtype=torch.float64).round().long()
    alpha_bars = torch.cumprod(1.0 - schedule.betas.detach().cpu().double(), 0)[taus]  # (S,)
    prev = torch.cat([alpha_bars.new_ones(1), alpha_bars[:-1]])
    betas = (1.0 - alpha_bars / prev).clamp(min=1e-12, max=1.0)  # (S,)
    return NoiseSchedule.from_betas(betas), taus


@torch.no_grad()
def ddpm_sample(model: nn.Module, shape, schedule: NoiseSchedule, *,
                num_steps: int | None = None, generator: torch.Generator | None = None,
                device=None, variance: str = "posterior", add_noise: bool = True,
                autocast: bool | None = None, clip_x0: bool = True, progress: bool = True,
                step_fn=None, **cond):
    """Ancestral sampling (DDPM, Ho et al. 2020, Algorithm 2), yielding the sample after every step.

    Starts from pure noise ~ N(0, I) of ``shape`` ``(B, C, H, W)``: the sample at t = T-1
    in code indices, i.e. the paper's x_T (paper t = code t + 1). Applies :func:`ddpm_step`
    at t = T-1, ..., 0 (or ``num_steps`` times on a :func:`respace_schedule`), yielding
    the sample after each step; the step at t = 0 adds no noise and its result, the last
    tensor yielded, is the image x_0. ``add_noise=False`` drops σ_t z from every step — to
    see what goes wrong without it. ``generator`` makes the run reproducible; ``cond`` goes to
    the model. The model runs in eval mode without gradients (restored afterwards), in
    bfloat16 autocast if ``autocast`` (default: where :func:`fast_setup` would use it).
    ``step_fn``: the reverse step, with :func:`ddpm_step`'s signature (default
    :func:`ddpm_step`; a lesson passes the learner's own).
    """
    step_fn = ddpm_step if step_fn is None else step_fn
    device = torch.device(device) if device is not None else next(model.parameters()).device
    autocast = _bf16_is_fast(device, model) if autocast is None else autocast
    if num_steps is None or num_steps == schedule.T:
        steps_schedule, taus = schedule, torch.arange(schedule.T)
    else:
        steps_schedule, taus = respace_schedule(schedule, num_steps)
    steps_schedule = steps_schedule.to(device)
    was_training = model.training
    model.eval()
    try:
        x = torch.randn(tuple(shape), generator=generator, device=device)   # t = T-1: paper's x_T
        for i in tqdm(range(len(taus) - 1, -1, -1), desc="sampling", disable=not progress):
            i_batch = torch.full((x.shape[0],), i, device=device, dtype=torch.long)
            tau_batch = torch.full_like(i_batch, int(taus[i]))
            with autocast_context(device, enabled=autocast):
                model_eps = model(x, tau_batch, **cond).float()              # ε_θ(x_t, t)
            if clip_x0:
                model_eps = _eps_with_clipped_x0(model_eps, x, i_batch, steps_schedule)
            z = torch.randn(x.shape, generator=generator, device=device)
            x = step_fn(model_eps, x, i_batch, steps_schedule, variance=variance,
                        noise=z if add_noise else torch.zeros_like(x))
            yield x
    finally:
        model.train(was_training)


def sample_images(model: nn.Module, n: int, schedule: NoiseSchedule, *,
                  image_shape=(3, 32, 32), num_steps: int | None = None,
                  batch_size: int | None = None, generator: torch.Generator | None = None,
                  device=None, variance: str = "posterior", autocast: bool | None = None,
                  progress: bool = True, step_fn=None, **cond) -> Tensor:
    """``n`` images x_0 from :func:`ddpm_sample`, clamped to [-1, 1], ``(n, C, H, W)``.

    Runs in batches of ``batch_size`` (all at once by default); tensors in ``cond`` are
    split along their first dimension to match.
    """
    batch_size = batch_size or n
    out = []
    for start in range(0, n, batch_size):
        stop = min(n, start + batch_size)
        part = {k: v[start:stop] if isinstance(v, Tensor) else v for k, v in cond.items()}
        for x in ddpm_sample(model, (stop - start, *image_shape), schedule,
                             num_steps=num_steps, generator=generator, device=device,
                             variance=variance, autocast=autocast, progress=progress,
                             step_fn=step_fn, **part):
            pass
        out.append(x.clamp(-1.0, 1.0))
    return torch.cat(out)


def load_diffusion_model(name: str = "ddpm_shapes", *, data_dir=None,
                         device=None) -> tuple[UNet, NoiseSchedule]:
    """A shipped diffusion UNet (its EMA weights, in eval mode) and the schedule it was trained
    with, both on ``device``: ``model, schedule = du.load_diffusion_model()``."""
    entry = CheckpointManifest.load(data_dir).entry(name)
    if "schedule" not in entry:
        raise ValueError(f"checkpoint {name!r} is not a diffusion model (it has no schedule)")
    model = load_shipped_model(name, lambda config: UNet(UNetConfig(**config)),
                               data_dir=data_dir, device=device)
    schedule = NoiseSchedule.create(entry["schedule"]["name"], entry["schedule"]["T"])
    return model, schedule.to(device or "cpu")


# Measuring quality: a classifier that reads the attributes back from an image


def attribute_num_classes() -> dict[str, int]:
    """How many values each attribute of the shapes data set takes."""
    return {name: len(values) for name, values in zip(ATTRIBUTES, ATTRIBUTE_VALUES)}


class AttributeClassifier(nn.Module):
    """A small CNN with one linear head per attribute of the shapes data set.

    ``forward(x)``: ``x`` ``(B, 3, 32, 32)`` in [-1, 1] -> ``{attribute: logits (B, K)}``,
    K the number of values of that attribute. Trained by ``python -m tools.train
    classifier``; shipped as the checkpoint ``"classifier"``.
    """

    def __init__(self, num_classes: dict[str, int] | None = None, *, width: int = 32):
        super().__init__()
        self.num_classes = dict(num_classes or attribute_num_classes())
        w = width

        def block(c_in, c_out, stride):
            return [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1),
                    nn.GroupNorm(8, c_out), nn.SiLU()]

        self.features = nn.Sequential(                         # (B, 3, 32, 32)
            *block(3, w, 1), *block(w, w, 1),                  # -> (B, w, 32, 32)
            *block(w, 2 * w, 2), *block(2 * w, 2 * w, 1),      # -> (B, 2w, 16, 16)
            *block(2 * w, 4 * w, 2), *block(4 * w, 4 * w, 1),  # -> (B, 4w, 8, 8)
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),             # -> (B, 4w)
        )
        self.heads = nn.ModuleDict({name: nn.Linear(4 * w, k)
                                    for name, k in self.num_classes.items()})

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        h = self.features(x)                                   # (B, 4w)
        return {name: head(h) for name, head in self.heads.items()}


def load_classifier(*, data_dir=None, device=None) -> AttributeClassifier:
    """The shipped attribute classifier (checkpoint ``"classifier"``), in eval mode."""
    return load_shipped_model(
        "classifier", lambda config: AttributeClassifier(config["num_classes"], width=config["width"]),
        data_dir=data_dir, device=device)


@torch.no_grad()
def recognised_fraction(images: Tensor, classifier: AttributeClassifier, *,
                        threshold: float = 0.9, batch_size: int = 256) -> float:
    """The fraction of ``images`` ``(N, 3, 32, 32)`` in [-1, 1] whose shape the classifier
    names with probability >= ``threshold`` — a simple measure of sample quality."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (N, 3, H, W), got shape {tuple(images.shape)}")
    classifier.eval()
    device = next(classifier.parameters()).device
    confident = 0
    for start in range(0, len(images), batch_size):
        logits = classifier(images[start:start + batch_size].to(device).float())["shape"]
        confident += int((logits.softmax(-1).amax(-1) >= threshold).sum())
    return confident / len(images)


# Measuring quality: distances between sets of images, on the classifier's features
#
# The recognised fraction judges each image alone, so a model that draws the same perfect
# star every time scores 1.0. A distance between the SET of samples and a set of real images
# also sees what is missing: the variety. Both distances below compare the two sets through
# the classifier's features, as FID and KID do through those of an Inception network.

REFERENCE_SEED = 30_000   # real images to measure against: a seed no training or test set uses


def reference_images(n: int, *, seed: int = REFERENCE_SEED, split: str = "train") -> Tensor:
    """``n`` real shapes images ``(n, 3, 32, 32)`` float32 in [-1, 1], the set that samples
    are measured against. The default ``seed`` is one that no training run or test of the
    course draws from, so these are images the models never saw."""
    return from_uint8(make_shapes(n, seed=seed, split=split).images)


@torch.no_grad()
def classifier_features(images: Tensor, classifier: AttributeClassifier, *,
                        batch_size: int = 256) -> Tensor:
    """The classifier's pooled penultimate features of ``images`` ``(N, 3, 32, 32)`` in
    [-1, 1]: ``classifier.features(x)``, ``(N, 4 · width)`` — 64 numbers per image for the
    shipped classifier — returned in float64 on the CPU for the statistics that follow.

    Why this layer: it is the last that still describes the whole image. Everything the
    classifier learned to see — shape, colour, size, position, background — is in it, averaged
    over the image, before the heads collapse it to five labels. So distances between sets of
    these vectors see how varied a set is and how real its images look, not only whether each
    one is "a star". FID (Heusel et al. 2017) does the same with the 2048 pool3 features of an
    Inception network trained on ImageNet; here the course's own classifier, trained on the
    shapes, plays that part, with nothing to download.
    """
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3 or not images.numel():
        got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a tensor (N, 3, H, W) of at least one image, got {got}")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point in [-1, 1], got {images.dtype} "
                         "(du.from_uint8 converts uint8 pixels)")
    classifier.eval()
    device = next(classifier.parameters()).device
    feats = [classifier.features(images[i:i + batch_size].to(device).float()).double().cpu()
             for i in range(0, len(images), batch_size)]
    return torch.cat(feats)                                    # (N, F) float64


def gaussian_frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """The squared Fréchet (2-Wasserstein) distance between N(μ₁, Σ₁) and N(μ₂, Σ₂):

        d² = ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2 (Σ₁ Σ₂)^{1/2})

    (Fréchet 1957; Dowson & Landau 1982; FID, Heusel et al. 2017, eq. 6). Means ``(d,)`` and
    covariances ``(d, d)``, tensors or arrays, computed in float64. Tr (Σ₁ Σ₂)^{1/2} is the sum of
    the square roots of the eigenvalues of sqrt(Σ₁) Σ₂ sqrt(Σ₁): the same eigenvalues as Σ₁ Σ₂,
    but of a symmetric matrix, so ``eigvalsh`` finds them stably and real.
    """
    values = [torch.as_tensor(v).to("cpu", torch.float64) for v in (mu1, cov1, mu2, cov2)]
    mu1, cov1, mu2, cov2 = values
    d = mu1.shape[0] if mu1.ndim == 1 else -1
    if mu2.shape != (d,) or cov1.shape != (d, d) or cov2.shape != (d, d):
        raise ValueError("expected means (d,) and covariances (d, d) of one width d, got shapes "
                         + ", ".join(str(tuple(v.shape)) for v in values))
    if not all(torch.isfinite(v).all() for v in (mu1, cov1, mu2, cov2)):
        raise ValueError("means and covariances must be finite, got NaN or inf")
    if not (torch.allclose(cov1, cov1.T) and torch.allclose(cov2, cov2.T)):
        raise ValueError("covariances must be symmetric (d, d) matrices")
    # 1. sqrt(Σ₁) from Σ₁ = V diag(λ) Vᵀ (an eigenvalue below 0 is rounding: clamp it)
    lam, V = torch.linalg.eigh(cov1)
    sqrt_cov1 = (V * lam.clamp(min=0).sqrt()) @ V.T
    # 2. Tr (Σ₁ Σ₂)^{1/2} = Σ_i sqrt(λ_i(sqrt(Σ₁) Σ₂ sqrt(Σ₁)))
    middle = sqrt_cov1 @ cov2 @ sqrt_cov1
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    # 3. the distance: never below 0, except by rounding
    d2 = (mu1 - mu2).square().sum() + cov1.trace() + cov2.trace() - 2 * trace_sqrt
    return max(float(d2), 0.0)


def _check_feature_sets(feats_a, feats_b) -> tuple[Tensor, Tensor]:
    """Both sets as float64 CPU tensors (N, F) and (M, F), or a ValueError naming the problem."""
    a, b = (torch.as_tensor(f).to("cpu", torch.float64) for f in (feats_a, feats_b))
    for name, f in (("feats_a", a), ("feats_b", b)):
        if f.ndim != 2:
            raise ValueError(f"{name} must be 2-D (N, F), one feature vector per image "
                             f"(du.classifier_features), got shape {tuple(f.shape)}")
        if len(f) < 2:
            raise ValueError(f"{name} must hold at least 2 feature vectors, got {len(f)}")
        if not torch.isfinite(f).all():
            raise ValueError(f"{name} holds NaN or inf features: were the images finite?")
    if a.shape[1] != b.shape[1]:
        raise ValueError("both feature sets must have the same width F (one classifier), "
                         f"got {a.shape[1]} and {b.shape[1]}")
    return a, b


def frechet_distance(feats_a, feats_b) -> float:
    """The Fréchet distance between two sets of features ``(N, F)`` and ``(M, F)``: each set
    summarised by the Gaussian of its mean and covariance, then ``gaussian_frechet_distance``
    — FID (Heusel et al. 2017, eq. 6), on the classifier's features.

    Estimated from samples, it is biased upwards: two sets drawn from one distribution are
    at a distance above 0 that shrinks roughly like 1/N (Chong & Forsyth 2020, "Effectively
    unbiased FID"). Compare distances measured with the same numbers of images only.
    """
    a, b = _check_feature_sets(feats_a, feats_b)
    return gaussian_frechet_distance(a.mean(0), torch.cov(a.T), b.mean(0), torch.cov(b.T))


def _polynomial_kernel(x: Tensor, y: Tensor) -> Tensor:
    """k(x, y) = (xᵀy / d + 1)³ for every pair of rows: (N, d), (M, d) -> (N, M)."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def kernel_distance(feats_a, feats_b, *, subsets: int = 100, subset_size: int = 1000) -> float:
    """The kernel distance (KID, Bińkowski et al. 2018, "Demystifying MMD GANs"): the unbiased
    estimate of the squared maximum mean discrepancy (Gretton et al. 2012, "A kernel
    two-sample test", Lemma 6) between two sets of features x ``(N, F)`` and y ``(M, F)``,

        MMD²_u = Σ_{i≠j} [k(x_i, x_j) + k(y_i, y_j)] / (m (m − 1)) − 2 Σ_{i,j} k(x_i, y_j) / m²

    with the polynomial kernel k(x, y) = (xᵀy / F + 1)³, averaged over ``subsets`` subsets of
    m = min(``subset_size``, N, M) vectors of each set (the same subsets on every call; one
    pass when m takes both sets whole). Unbiased: for two sets drawn from one distribution it
    is 0 on average at any m, so it can come out slightly below 0.
    """
    a, b = _check_feature_sets(feats_a, feats_b)
    subsets = _check_int(subsets, "subsets", 1, 10**6)
    m = min(_check_int(subset_size, "subset_size", 2, 10**7), len(a), len(b))
    if m == len(a) == len(b):
        subsets = 1                                            # every subset would be the same
    generator = torch.Generator().manual_seed(0)
    total = 0.0
    for _ in range(subsets):
        x = a[torch.randperm(len(a), generator=generator)[:m]]                  # (m, F)
        y = b[torch.randperm(len(b), generator=generator)[:m]]                  # (m, F)
        k_xx, k_yy = _polynomial_kernel(x, x), _polynomial_kernel(y, y)         # (m, m)
        within = k_xx.sum() - k_xx.trace() + k_yy.sum() - k_yy.trace()          # pairs i ≠ j
        total += float(within / (m * (m - 1)) - 2 * _polynomial_kernel(x, y).mean())
    return total / subsets


def distribution_distances(images: Tensor, reference: Tensor, classifier: AttributeClassifier, *,
                           batch_size: int = 256) -> dict[str, float]:
    """How far the set ``images`` is from the set ``reference`` (real images, e.g.
    ``reference_images(n)``), both ``(N, 3, 32, 32)`` in [-1, 1]: ``{"frechet": ...,
    "kernel": ...}``, ``frechet_distance`` and ``kernel_distance`` of their
    ``classifier_features``. Lower is closer; both are estimated from samples, so compare only
    numbers measured with the same numbers of images."""
    feats = classifier_features(images, classifier, batch_size=batch_size)
    feats_ref = classifier_features(reference, classifier, batch_size=batch_size)
    return {"frechet": frechet_distance(feats, feats_ref),
            "kernel": kernel_distance(feats, feats_ref)}


# ── 04 · Conditioning ────────────────────────────────────────────────────────────────

import re  # noqa: E402  (this lesson's imports, kept with its section)

#
# A condition c (a class, a set of attributes, a caption) enters the model in one of two ways:
# joined with the time embedding, so it reaches every ResBlock (classes, context vectors), or
# as a sequence the feature map attends to by cross-attention (the tokens of a caption).
# Training sometimes drops it (to a learned "null" condition), so that one network learns
# both p(x | c) and p(x): the preparation for classifier-free guidance (lesson 08).

ATTRIBUTE_DIM = sum(len(values) for values in ATTRIBUTE_VALUES)   # 21: 6 + 6 + 2 + 5 + 2


def attribute_vector(labels: Tensor) -> Tensor:
    """The multi-hot context vector of attribute labels: one one-hot block per attribute,
    concatenated in ``ATTRIBUTES`` order (shape, colour, size, position, background).

    ``labels`` ``(B, 5)`` integers (a label of -1 leaves its block zero: that attribute is
    not asked for) -> ``(B, ATTRIBUTE_DIM)`` float32, on the labels' device.
    """
    if labels.ndim != 2 or labels.shape[1] != len(ATTRIBUTES) or labels.is_floating_point():
        raise ValueError(f"labels must be integers of shape (B, {len(ATTRIBUTES)}) in the order "
                         f"{ATTRIBUTES}, got {labels.dtype} of shape {tuple(labels.shape)}")
    blocks = []
    for i, values in enumerate(ATTRIBUTE_VALUES):
        column = labels[:, i]
        if column.numel() and (column.min() < -1 or column.max() >= len(values)):
            raise ValueError(f"{ATTRIBUTES[i]} labels must lie in [-1, {len(values) - 1}] "
                             f"(-1 = not asked), got values in "
                             f"[{column.min().item()}, {column.max().item()}]")
        hot = F.one_hot(column.clamp(min=0), len(values)).float()        # (B, K_i)
        blocks.append(hot * (column >= 0).float().unsqueeze(1))
    return torch.cat(blocks, dim=1)                                      # (B, 21)


def context_vector(**chosen: str) -> Tensor:
    """The context vector ``(ATTRIBUTE_DIM,)`` asking for the named values, e.g.
    ``context_vector(shape="star", colour="red")``; attributes not named stay zero."""
    labels = torch.full((1, len(ATTRIBUTES)), -1, dtype=torch.long)
    for name, value in chosen.items():
        if name not in ATTRIBUTES:
            raise ValueError(f"unknown attribute {name!r}: expected one of {ATTRIBUTES}")
        values = ATTRIBUTE_VALUES[ATTRIBUTES.index(name)]
        if value not in values:
            raise ValueError(f"{name} must be one of {values}, got {value!r}")
        labels[0, ATTRIBUTES.index(name)] = values.index(value)
    return attribute_vector(labels)[0]


class AttributeEmbedding(nn.Module):
    """A context vector c ``(B, attribute_dim)`` -> its embedding ``(B, time_dim)``, which the
    UNet adds to the time embedding:

        e(c) = W₂ SiLU(W₁ c + b₁) + b₂      for c ≠ 0,       e(0) = e_∅ (learned)

    An all-zero row means "nothing asked": it gets the learned null embedding ``null``, the
    condition classifier-free guidance compares against. The last layer and ``null`` start
    at zero, so a fresh embedding leaves a trained unconditional UNet unchanged.
    """

    def __init__(self, attribute_dim: int, time_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(attribute_dim, time_dim), nn.SiLU(),
                                 _zero_(nn.Linear(time_dim, time_dim)))
        self.null = nn.Parameter(torch.zeros(time_dim))

    def forward(self, c: Tensor) -> Tensor:
        emb = self.mlp(c)                                     # (B, time_dim)
        is_null = (c == 0).all(dim=1, keepdim=True)           # (B, 1)
        return torch.where(is_null, self.null.to(emb.dtype), emb)


def drop_condition(c: Tensor, p: float, *, generator: torch.Generator | None = None) -> Tensor:
    """Condition dropout for classifier-free guidance (Ho & Salimans 2022, Algorithm 1):
    each row of the context vectors ``c`` ``(B, D)`` becomes all zeros ("nothing asked")
    with probability ``p``, independently; the other rows are returned unchanged. ``c`` itself
    is not modified."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be a probability in [0, 1], got {p}")
    if c.ndim != 2:
        raise ValueError(f"c must be a batch of context vectors (B, D), got shape {tuple(c.shape)}")
    u = torch.rand(c.shape[0], generator=generator, device=c.device)   # (B,)
    keep = (u >= p).to(c.dtype).unsqueeze(1)                           # (B, 1)
    return c * keep


# Text: captions -> token ids -> a context sequence for cross-attention


def caption_vocabulary() -> tuple[str, ...]:
    """Every word the shapes captions use (and the attribute names), sorted."""
    words = set()
    for template in _CAPTION_TEMPLATES:
        words.update(_words(template.format(shape="", colour="", a_colour="a an", size="",
                                            position="", background="")))
    for values in ATTRIBUTE_VALUES:
        for value in values:
            words.update(_words(value))
    return tuple(sorted(words))


def _words(text: str) -> list[str]:
    """Lower-case words, punctuation dropped: "Red star, centre." -> ["red", "star", "centre"]."""
    return re.findall(r"[a-z]+", text.lower())


class WordTokenizer:
    """A word-level tokenizer: caption -> ids of its words, after a start token.

    ``encode(captions)`` -> ``(ids (B, L) long, mask (B, L) bool)``, padded to the longest
    caption (``mask`` is True for real tokens). Id 0 is the padding, id 1 the start token
    ``<s>`` that every caption begins with — so the empty caption "" is just ``<s>``: the
    null condition. A word not in the vocabulary raises ValueError naming it. Lesson 06
    replaces this with CLIP's text encoder; the interface stays.
    """

    PAD, START = "<pad>", "<s>"

    def __init__(self, vocabulary=None):
        words = tuple(vocabulary) if vocabulary is not None else caption_vocabulary()
        self.vocabulary = (self.PAD, self.START, *words)
        self.ids = {w: i for i, w in enumerate(self.vocabulary)}

    def __len__(self) -> int:
        return len(self.vocabulary)

    def encode(self, captions) -> tuple[Tensor, Tensor]:
        if isinstance(captions, str):
            captions = [captions]
        rows = []
        for caption in captions:
            unknown = [w for w in _words(caption) if w not in self.ids]
            if unknown:
                raise ValueError(f"unknown word {unknown[0]!r} in {caption!r}: the tokenizer "
                                 f"knows the {len(self.vocabulary) - 2} words of the shapes "
                                 f"captions (WordTokenizer().vocabulary)")
            rows.append([self.ids[self.START]] + [self.ids[w] for w in _words(caption)])
        length = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), length, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
        return ids, ids != 0

    def decode(self, ids: Tensor) -> list[str]:
        """The words back from ids ``(B, L)``, start and padding left out."""
        return [" ".join(self.vocabulary[i] for i in row.tolist() if i > 1) for row in ids]


class TextEmbedding(nn.Module):
    """Token ids ``(B, L)`` -> a context sequence ``(B, L, dim)`` for cross-attention:
    a learned embedding per word plus a learned embedding per position (as in GPT-2)."""

    def __init__(self, vocab_size: int, dim: int, *, max_length: int = 32):
        super().__init__()
        self.token = nn.Embedding(vocab_size, dim)
        self.position = nn.Embedding(max_length, dim)

    def forward(self, ids: Tensor) -> Tensor:
        if ids.shape[1] > self.position.num_embeddings:
            raise ValueError(f"captions may have at most {self.position.num_embeddings} tokens, "
                             f"got {ids.shape[1]}")
        positions = torch.arange(ids.shape[1], device=ids.device)
        return self.token(ids) + self.position(positions)                # (B, L, dim)


class CaptionUNet(nn.Module):
    """A UNet conditioned on captions: token ids -> a text model -> the context sequence its
    cross-attention layers attend to. ``forward(x, t, *, ids, mask)``.

    The text model is a :class:`TextEmbedding` of ``vocab_size`` words (ids and mask from
    :meth:`WordTokenizer.encode`), or a ``text_encoder`` that maps ids ``(B, L)`` to
    ``(tokens (B, L, width), pooled)``, such as lesson 06's CLIP text transformer (ids and mask
    from :meth:`CaptionTokenizer.encode`; it is then frozen). ``config.context_dim`` is the
    width of the token embeddings; ``unet_kwargs`` go to :class:`UNet` (e.g. ``cross_attention=``).
    """

    def __init__(self, config: UNetConfig, vocab_size: int | None = None, *,
                 text_encoder: nn.Module | None = None, **unet_kwargs):
        super().__init__()
        if config.context_dim is None:
            raise ValueError("CaptionUNet needs UNetConfig(context_dim=...), the width of "
                             "the word embeddings")
        if (vocab_size is None) == (text_encoder is None):
            raise ValueError("give CaptionUNet either vocab_size (its own word embeddings) or "
                             "text_encoder (e.g. du.load_clip().text), not both or neither")
        if text_encoder is None:
            self.text = TextEmbedding(vocab_size, config.context_dim)
        else:
            self.text = text_encoder.requires_grad_(False).eval()
        self.frozen_text = text_encoder is not None
        self.unet = UNet(config, **unet_kwargs)

    def train(self, mode: bool = True) -> CaptionUNet:
        super().train(mode)
        if self.frozen_text:
            self.text.eval()
        return self

    def forward(self, x: Tensor, t: Tensor, *, ids: Tensor, mask: Tensor) -> Tensor:
        context = self.text(ids)
        context = context[0] if isinstance(context, tuple) else context      # (B, L, width)
        return self.unet(x, t, context=context, context_mask=mask)


# Measuring conditional samples: does each image show what was asked?


@torch.no_grad()
def attribute_agreement(images: Tensor, labels: Tensor, classifier: AttributeClassifier, *,
                        batch_size: int = 256) -> dict[str, float]:
    """The share of ``images`` ``(N, 3, 32, 32)`` in [-1, 1] whose attribute the classifier
    reads as the asked ``labels`` ``(N, 5)``, per attribute, and for shape and colour both
    (key ``"shape and colour"``). A label of -1 (not asked) is left out of that attribute."""
    if images.ndim != 4 or labels.shape != (len(images), len(ATTRIBUTES)):
        raise ValueError(f"expected images (N, 3, H, W) and labels (N, {len(ATTRIBUTES)}), got "
                         f"{tuple(images.shape)} and {tuple(labels.shape)}")
    classifier.eval()
    device = next(classifier.parameters()).device
    right = []
    for start in range(0, len(images), batch_size):
        logits = classifier(images[start:start + batch_size].to(device).float())
        right.append(torch.stack([logits[name].argmax(-1).cpu() for name in ATTRIBUTES], 1))
    right = torch.cat(right) == labels.cpu()                         # (N, 5) bool
    asked = labels.cpu() >= 0
    out = {name: float(right[asked[:, i], i].float().mean()) if asked[:, i].any() else float("nan")
           for i, name in enumerate(ATTRIBUTES)}
    both = right[:, 0] & right[:, 1]
    out["shape and colour"] = float(both[asked[:, 0] & asked[:, 1]].float().mean())
    return out


def combination_labels(n: int, *, split: str = "train", seed: int = 0) -> Tensor:
    """``n`` label rows ``(n, 5)`` of the shapes data set's ``split`` (the seen shape-colour
    pairs, or the held-out ones), with the same mix of sizes, positions and backgrounds:
    the labels of ``make_shapes(n, seed=seed, split=split)``, without drawing its images."""
    return torch.from_numpy(_draw_labels(n, seed, split)[1])


# ── 05 · DDIM and the score view ─────────────────────────────────────────────────────
# One network output, three views: the noise ε, the clean image x̂_0 and the score ∇log q_t.
# A 2-D Gaussian mixture where all three are exact; DDIM (Song, Meng & Ermon 2021,
# "Denoising diffusion implicit models"), which samples in a few deterministic steps, and
# its inversion from an image back to its noise; spherical interpolation between noises.
# NB: the DDIM paper writes α_t for our ᾱ_t (see the notation at the top).


# The same prediction in three views


def _check_same_shape(a: Tensor, b: Tensor, a_name: str, b_name: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{a_name} must have the shape of {b_name}, {tuple(b.shape)}, "
                         f"got {tuple(a.shape)}")


def predict_x0(xt: Tensor, t: Tensor, eps: Tensor, schedule: NoiseSchedule) -> Tensor:
    """The clean image implied by a noise prediction:

    x̂_0 = (x_t - sqrt(1-ᾱ_t) ε) / sqrt(ᾱ_t)    (DDPM, Ho et al. 2020, eq. 4 solved for x_0;
                                                DDIM, Song et al. 2021, eq. 9)

    ``xt``, ``eps``: any shape ``(B, ...)`` (images ``(B, C, H, W)``, points ``(B, 2)``);
    ``t``: integer timesteps ``(B,)``. Returns x̂_0 shaped like ``xt``.
    """
    _check_same_shape(eps, xt, "eps", "xt")
    signal = extract(schedule.sqrt_alpha_bars, t, xt.shape).to(xt)           # (B, 1, ...)
    noise = extract(schedule.sqrt_one_minus_alpha_bars, t, xt.shape).to(xt)  # (B, 1, ...)
    return (xt - noise * eps) / signal


def eps_from_x0(xt: Tensor, t: Tensor, x0: Tensor, schedule: NoiseSchedule) -> Tensor:
    """The noise implied by a clean-image prediction:

    ε = (x_t - sqrt(ᾱ_t) x̂_0) / sqrt(1-ᾱ_t)     (DDPM, Ho et al. 2020, eq. 4 solved for ε)

    ``xt``, ``x0``: any shape ``(B, ...)``; ``t``: ``(B,)``. Returns ε shaped like ``xt``.
    """
    _check_same_shape(x0, xt, "x0", "xt")
    signal = extract(schedule.sqrt_alpha_bars, t, xt.shape).to(xt)           # (B, 1, ...)
    noise = extract(schedule.sqrt_one_minus_alpha_bars, t, xt.shape).to(xt)  # (B, 1, ...)
    return (xt - signal * x0) / noise


def score_from_eps(eps: Tensor, t: Tensor, schedule: NoiseSchedule) -> Tensor:
    """The score of the noised data from a noise prediction:

    ∇_x log q_t(x_t) = -ε / sqrt(1-ᾱ_t)   (Dhariwal & Nichol 2021, "Diffusion models beat
    GANs", section 4.2, eq. 11; Song et al. 2021, "Score-based generative modeling through SDEs")

    It holds exactly for the ideal ε, E[ε | x_t] (Tweedie's formula): the score points back
    against the expected noise. ``eps``: any shape ``(B, ...)``; ``t``: ``(B,)``.
    """
    noise = extract(schedule.sqrt_one_minus_alpha_bars, t, eps.shape).to(eps)  # (B, 1, ...)
    return -eps / noise


def eps_from_score(score: Tensor, t: Tensor, schedule: NoiseSchedule) -> Tensor:
    """The noise prediction from a score, the inverse of :func:`score_from_eps`:

    ε = -sqrt(1-ᾱ_t) ∇_x log q_t(x_t)    (Dhariwal & Nichol 2021, eq. 11 solved for ε)

    ``score``: any shape ``(B, ...)``; ``t``: ``(B,)``.
    """
    noise = extract(schedule.sqrt_one_minus_alpha_bars, t, score.shape).to(score)
    return -noise * score


# A 2-D toy where everything is exact: a mixture of Gaussians, noised


def _exact_dtype(device: torch.device) -> torch.dtype:
    """float64 for the toy's exact maths, except where the device has none (Apple's MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


@dataclass
class GaussianMixture2D:
    """A mixture of K round Gaussians in the plane: component k is N(μ_k, σ_k² I) with
    weight w_k. ``means`` ``(K, 2)``, ``stds`` ``(K,)`` positive, ``weights`` ``(K,)``
    positive (normalised to sum to 1). Stored as float64 tensors.

    Noised to ᾱ by x_t = sqrt(ᾱ) x_0 + sqrt(1-ᾱ) ε (DDPM, Ho et al. 2020, eq. 4), each
    component stays Gaussian: N(sqrt(ᾱ) μ_k, (ᾱ σ_k² + 1 - ᾱ) I). So the noised density, its
    score and the ideal noise prediction are all known exactly.
    """

    means: Tensor
    stds: Tensor
    weights: Tensor

    def __post_init__(self) -> None:
        self.means = torch.as_tensor(self.means, dtype=torch.float64)
        self.stds = torch.as_tensor(self.stds, dtype=torch.float64)
        self.weights = torch.as_tensor(self.weights, dtype=torch.float64)
        K = self.means.shape[0] if self.means.ndim == 2 else -1
        if (self.means.ndim != 2 or self.means.shape[1] != 2 or K < 1
                or self.stds.shape != (K,) or self.weights.shape != (K,)):
            raise ValueError(f"GaussianMixture2D expects means (K, 2), stds (K,) and weights "
                             f"(K,), got {tuple(self.means.shape)}, {tuple(self.stds.shape)} "
                             f"and {tuple(self.weights.shape)}")
        if not ((self.stds > 0).all() and (self.weights > 0).all()):
            raise ValueError("GaussianMixture2D expects positive stds and weights, got "
                             f"stds {self.stds.tolist()}, weights {self.weights.tolist()}")
        self.weights = self.weights / self.weights.sum()

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """``n`` points ``(n, 2)`` float32: a component k drawn by weight, then μ_k + σ_k z."""
        _check_int(n, "n", 1, 2**31)
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)  # (n,)
        z = torch.randn(n, 2, generator=generator, dtype=torch.float64)
        return (self.means[k] + self.stds[k, None] * z).float()

    def _components(self, x: Tensor, alpha_bar) -> tuple[Tensor, Tensor, Tensor]:
        """Each noised component's log weighted density at x ``(n, K)``, x - mean ``(n, K, 2)``
        and variance ``(n or 1, K)``, in float64 (float32 on MPS)."""
        if not isinstance(x, Tensor) or x.ndim != 2 or x.shape[1] != 2:
            raise ValueError(f"x must be points of shape (n, 2), got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        dtype = _exact_dtype(x.device)
        ab = torch.as_tensor(alpha_bar, dtype=dtype, device=x.device)
        if ab.ndim > 1 or (ab.ndim == 1 and ab.shape[0] != x.shape[0]) \
                or not ((ab >= 0) & (ab <= 1)).all():
            raise ValueError(f"alpha_bar must be a float or a tensor of shape ({x.shape[0]},) "
                             f"with values in [0, 1], got shape {tuple(ab.shape)}")
        ab = ab.reshape(-1, 1)                                            # (n or 1, 1)
        means = ab.sqrt()[..., None] * self.means.to(x.device, dtype)    # (n or 1, K, 2)
        var = ab * self.stds.to(x.device, dtype) ** 2 + 1 - ab            # (n or 1, K)
        diff = x.to(dtype)[:, None, :] - means                           # (n, K, 2)
        log_w = self.weights.to(x.device, dtype).log()                   # (K,)
        log_comp = log_w - torch.log(2 * math.pi * var) - (diff ** 2).sum(-1) / (2 * var)
        return log_comp, diff, var                                       # (n, K), ...

    def noised_log_density(self, x: Tensor, alpha_bar) -> Tensor:
        """log q(x) of the data noised to ``alpha_bar`` (a float or ``(n,)``), at ``x`` ``(n, 2)``:

        q(x) = Σ_k w_k N(x; sqrt(ᾱ) μ_k, (ᾱ σ_k² + 1 - ᾱ) I). Returns ``(n,)``, x's dtype.
        """
        log_comp, _, _ = self._components(x, alpha_bar)
        return torch.logsumexp(log_comp, dim=1).to(x.dtype)              # (n, K) -> (n,)

    def noised_score(self, x: Tensor, alpha_bar) -> Tensor:
        """The exact score ∇_x log q(x) ``(n, 2)`` of the data noised to ``alpha_bar``:

        ∇_x log q(x) = Σ_k r_k(x) · (sqrt(ᾱ) μ_k - x) / (ᾱ σ_k² + 1 - ᾱ),
        r_k(x) = w_k N_k(x) / q(x), the probability that x came from component k.
        """
        log_comp, diff, var = self._components(x, alpha_bar)
        resp = torch.softmax(log_comp, dim=1)                            # (n, K): r_k(x)
        return (resp[..., None] * -diff / var[..., None]).sum(1).to(x.dtype)  # (n, 2)

    def eps(self, x: Tensor, t: Tensor, schedule: NoiseSchedule) -> Tensor:
        """The ideal noise prediction at ``x`` ``(n, 2)``, timesteps ``t`` ``(n,)``: what a
        perfectly trained network would output, ε* = E[ε | x_t] = -sqrt(1-ᾱ_t) ∇log q_t(x_t)
        (see :func:`eps_from_score`). Use it as a model: ``lambda x, t: mix.eps(x, t, schedule)``.
        """
        alpha_bar_t = extract(schedule.alpha_bars, t, x.shape).reshape(-1)  # (n,)
        return eps_from_score(self.noised_score(x, alpha_bar_t), t, schedule)


def toy_mixture() -> GaussianMixture2D:
    """The course's 2-D toy data: four well separated modes in [-2, 2]², with small,
    different widths and unequal weights."""
    return GaussianMixture2D(means=[[-1.2, 1.0], [1.3, 1.1], [0.9, -1.2], [-1.1, -0.9]],
                             stds=[0.25, 0.15, 0.2, 0.1],
                             weights=[0.4, 0.25, 0.2, 0.15])


# DDIM: which timesteps to visit, and one step between two of them

SPACINGS = ("leading", "trailing", "linspace")


def ddim_timesteps(T: int, num_steps: int, *, spacing: str = "trailing") -> Tensor:
    """The ``num_steps`` timesteps a DDIM run visits, descending, long ``(S,)``, as diffusers'
    ``DDIMScheduler.set_timesteps`` with ``timestep_spacing=spacing`` and ``steps_offset=0``:

    "linspace": round(linspace(0, T-1, S)), reversed: evenly spaced, both ends included
    "leading":  (0, 1, ..., S-1) · (T // S), reversed: the DDIM paper's code; misses T-1
    "trailing": round(T - i · T/S) - 1 for i = 0, ..., S-1: starts at T-1, from pure noise

    Lin et al. 2024 ("Common diffusion noise schedules and sample steps are flawed") compare
    the three and recommend "trailing". Ties at .5 round to even, as numpy does.
    """
    T = _check_num_steps(T)
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}: expected one of {SPACINGS}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) \
            or not 1 <= num_steps <= T:
        raise ValueError(f"num_steps must be an integer in [1, T] = [1, {T}], got {num_steps!r}")
    S = int(num_steps)
    if spacing == "linspace":
        steps = np.linspace(0, T - 1, S).round()[::-1]
    elif spacing == "leading":
        steps = (np.arange(S) * (T // S))[::-1]
    else:  # numpy's arange, as diffusers (its rounding decides the ties at .5); first S only
        steps = np.round(np.arange(T, 0, -T / S)[:S]) - 1
    return torch.from_numpy(steps.astype(np.int64).copy())


def _check_eta(eta) -> None:
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not eta >= 0:
        raise ValueError(f"eta must be a number >= 0 (0: DDIM, 1: DDPM), got {eta!r}")


def ddim_sigma(alpha_bar_t, alpha_bar_prev, eta: float) -> Tensor:
    """The standard deviation of the noise a DDIM step adds:

    σ_t(η) = η sqrt((1 - ᾱ_prev) / (1 - ᾱ_t)) sqrt(1 - ᾱ_t / ᾱ_prev)   (DDIM, Song et al.
    2021, eq. 16; ᾱ_prev is ᾱ at the timestep the step goes to)

    η = 0: deterministic DDIM; η = 1 with ᾱ_prev = ᾱ_{t-1}: DDPM's posterior variance β̃_t.
    ``alpha_bar_t``, ``alpha_bar_prev``: floats or tensors that broadcast together.
    """
    _check_eta(eta)
    a_t = torch.as_tensor(alpha_bar_t, dtype=None if isinstance(alpha_bar_t, Tensor)
                          else torch.float64)
    a_prev = torch.as_tensor(alpha_bar_prev, dtype=a_t.dtype, device=a_t.device)
    ratio = ((1 - a_prev) / (1 - a_t)).clamp(min=0)
    return eta * ratio.sqrt() * (1 - a_t / a_prev).clamp(min=0).sqrt()


def _at_step(values: Tensor, t: Tensor, x: Tensor, *, before_first: float) -> Tensor:
    """``values[t]`` broadcast like ``x`` ``(B, 1, ...)``, where t = -1 (before the first
    noising step, the clean data) reads ``before_first``."""
    inside = extract(values, t.clamp(min=0), x.shape).to(x)             # (B, 1, ...)
    return torch.where((t >= 0).reshape(inside.shape), inside,
                       torch.full_like(inside, before_first))


def _check_t_prev(t: Tensor, t_prev: Tensor) -> None:
    if not isinstance(t_prev, Tensor) or t_prev.dtype.is_floating_point \
            or t_prev.shape != t.shape:
        raise ValueError(f"t_prev must be an integer tensor shaped like t, {tuple(t.shape)}, got "
                         + (f"{t_prev.dtype} {tuple(t_prev.shape)}" if isinstance(t_prev, Tensor)
                            else type(t_prev).__name__))
    if t_prev.numel() and (int(t_prev.min()) < -1 or bool((t_prev >= t.to(t_prev.device)).any())):
        raise ValueError("t_prev must come before t: -1 <= t_prev < t (-1 = past the last step, "
                         f"ᾱ = 1), got t = {t.tolist()[:8]}, t_prev = {t_prev.tolist()[:8]}")


def ddim_step(model_eps: Tensor, xt: Tensor, t: Tensor, t_prev: Tensor, schedule: NoiseSchedule,
              *, eta: float = 0.0, noise: Tensor | None = None) -> Tensor:
    """One DDIM step x_t -> x_{t_prev}  (DDIM, Song, Meng & Ermon 2021, eq. 12):

    x_prev = sqrt(ᾱ_prev) x̂_0 + sqrt(1 - ᾱ_prev - σ_t²) ε_θ(x_t, t) + σ_t z,   z ~ N(0, I)

    with x̂_0 = :func:`predict_x0` and σ_t = :func:`ddim_sigma` (eq. 16). ``t`` ``(B,)``: the
    current timesteps; ``t_prev`` ``(B,)``: the ones to go to, any earlier timestep
    (-1 = past the last step, where ᾱ_prev = 1 and the step returns x̂_0). η = 0 is
    deterministic (``noise`` unused); η = 1 with t_prev = t - 1 is DDPM's step with the
    posterior variance. ``model_eps``: ε_θ(x_t, t), shaped like ``xt`` ``(B, ...)``;
    ``noise``: z (drawn if None and η > 0).
    """
    _check_same_shape(model_eps, xt, "model_eps", "xt")
    _check_t_prev(t, t_prev)
    _check_eta(eta)
    # 1. ᾱ at both timesteps, (B, 1, ...); past the last step ᾱ_prev = 1
    alpha_bar_t = extract(schedule.alpha_bars, t, xt.shape).to(xt)
    alpha_bar_prev = _at_step(schedule.alpha_bars, t_prev, xt, before_first=1.0)
    # 2. the "predicted x_0" of eq. 12
    x0_hat = predict_x0(xt, t, model_eps, schedule)
    # 3. σ_t(η) of eq. 16
    sigma = ddim_sigma(alpha_bar_t, alpha_bar_prev, eta)
    # 4. the "direction pointing to x_t" of eq. 12, sqrt(1 - ᾱ_prev - σ²) ε, computed as
    #    sqrt(1 - ᾱ_prev) sqrt(1 - σ² / (1 - ᾱ_prev)): the first factor from the schedule's
    #    float64 maths, σ² over the same 1 - ᾱ_prev that σ came from (rounding errors cancel)
    noise_level_prev = _at_step(schedule.sqrt_one_minus_alpha_bars, t_prev, xt, before_first=0.0)
    share = sigma ** 2 / (1 - alpha_bar_prev).clamp(min=torch.finfo(xt.dtype).tiny)  # 0 at -1
    direction = noise_level_prev * (1 - share).clamp(min=0).sqrt() * model_eps
    # 5. x_prev = sqrt(ᾱ_prev) x̂_0 + direction + σ z
    signal_prev = _at_step(schedule.sqrt_alpha_bars, t_prev, xt, before_first=1.0)
    x_prev = signal_prev * x0_hat + direction
    if eta > 0:
        noise = torch.randn_like(xt) if noise is None else noise
        _check_same_shape(noise, xt, "noise", "xt")
        x_prev = x_prev + sigma * noise
    return x_prev


# The DDIM sampling loop (a generator), a batch of images, and the way back


def _sampling_device(model, device, x: Tensor | None = None) -> torch.device:
    """``device`` if given, else the model's, else ``x``'s, else the CPU (a plain function
    such as the toy's ``eps`` has no parameters)."""
    if device is not None:
        return torch.device(device)
    param = next(model.parameters(), None) if isinstance(model, nn.Module) else None
    if param is not None:
        return param.device
    return x.device if x is not None else torch.device("cpu")


@contextlib.contextmanager
def _eval_mode(model):
    """``model`` in eval mode inside the block, its own mode restored after; plain functions
    pass through."""
    if not isinstance(model, nn.Module):
        yield
        return
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _model_eps(model, x: Tensor, t: Tensor, device, autocast: bool, cond: dict) -> Tensor:
    """ε_θ(x_t, t) in x's dtype (bfloat16 autocast if ``autocast``)."""
    with autocast_context(device, enabled=autocast):
        return model(x, t, **cond).to(x.dtype)


@torch.no_grad()
def ddim_sample(model, shape, schedule: NoiseSchedule, *, num_steps: int = 50, eta: float = 0.0,
                spacing: str = "trailing", generator: torch.Generator | None = None, device=None,
                x_T: Tensor | None = None, clip_x0: bool = True, autocast: bool | None = None,
                progress: bool = True, step_fn=None, **cond):
    """DDIM sampling (Song, Meng & Ermon 2021, eq. 12 on a subsequence of timesteps,
    section 4.2), yielding the sample after every step.

    Starts from ``x_T`` (given, else N(0, I) of ``shape``, e.g. ``(B, C, H, W)`` or ``(B, 2)``),
    visits :func:`ddim_timesteps` t_1 > ... > t_S and steps from each to the next (from the
    last to -1, the clean data), so it yields ``num_steps`` tensors, the last one x_0.
    ``clip_x0`` clips x̂_0 to [-1, 1] (images; pass False for other data, e.g. the 2-D toy).
    ``model(x, t, **cond)`` predicts ε: a network (run in eval mode without gradients, in
    bfloat16 autocast if ``autocast``, default: where :func:`fast_setup` would use it) or a
    plain function such as ``lambda x, t: mixture.eps(x, t, schedule)``. ``step_fn``: the step,
    with :func:`ddim_step`'s signature (default :func:`ddim_step`).
    """
    step_fn = ddim_step if step_fn is None else step_fn
    device = _sampling_device(model, device, x_T)
    if autocast is None:  # bfloat16 is a speed-up for networks, not for exact toy maths
        autocast = isinstance(model, nn.Module) and _bf16_is_fast(device, model)
    timesteps = ddim_timesteps(schedule.T, num_steps, spacing=spacing).tolist()  # (S,) descending
    schedule = schedule.to(device)
    if x_T is not None and shape is not None and tuple(x_T.shape) != tuple(shape):
        raise ValueError(f"x_T must have the shape {tuple(shape)}, got {tuple(x_T.shape)}")
    x = x_T.to(device) if x_T is not None else torch.randn(tuple(shape), generator=generator,
                                                          device=device)
    with _eval_mode(model):
        for i in tqdm(range(len(timesteps)), desc="DDIM sampling", disable=not progress):
            t = torch.full((x.shape[0],), timesteps[i], device=device, dtype=torch.long)
            t_prev = torch.full_like(t, timesteps[i + 1] if i + 1 < len(timesteps) else -1)
            model_eps = _model_eps(model, x, t, device, autocast, cond)   # ε_θ(x_t, t)
            if clip_x0:
                model_eps = _eps_with_clipped_x0(model_eps, x, t, schedule)
            z = (torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype)
                 if eta > 0 else torch.zeros_like(x))
            x = step_fn(model_eps, x, t, t_prev, schedule, eta=eta, noise=z)
            yield x


def _image_shape(model) -> tuple[int, int, int]:
    """``(C, H, W)`` of the images ``model`` makes: from its :class:`UNetConfig`, else 3x32x32."""
    config = getattr(model, "config", None)
    if isinstance(config, UNetConfig):
        return (config.in_channels, config.image_size, config.image_size)
    return (3, 32, 32)


def ddim_images(model, n: int, schedule: NoiseSchedule, *, num_steps: int = 50, eta: float = 0.0,
                spacing: str = "trailing", batch_size: int | None = None,
                generator: torch.Generator | None = None, device=None,
                autocast: bool | None = None, progress: bool = True, step_fn=None,
                image_shape=None, clip_x0: bool = True, **cond) -> Tensor:
    """``n`` images x_0 from :func:`ddim_sample`, clamped to [-1, 1], ``(n, C, H, W)``.

    ``image_shape`` ``(C, H, W)``: by default from the model's :class:`UNetConfig`.
    ``clip_x0=False`` for data that are not images in [-1, 1] (e.g. latents): neither x̂_0 nor
    the result is clipped. Runs in
    batches of ``batch_size`` (all at once by default); tensors in ``cond`` are split along
    their first dimension to match.
    """
    _check_int(n, "n", 1, 2**31)
    shape = tuple(image_shape) if image_shape is not None else _image_shape(model)
    batch_size = batch_size or n
    out = []
    for start in range(0, n, batch_size):
        stop = min(n, start + batch_size)
        part = {k: v[start:stop] if isinstance(v, Tensor) else v for k, v in cond.items()}
        for x in ddim_sample(model, (stop - start, *shape), schedule, num_steps=num_steps,
                             eta=eta, spacing=spacing, generator=generator, device=device,
                             autocast=autocast, progress=progress, step_fn=step_fn,
                             clip_x0=clip_x0, **part):
            pass
        out.append(x.clamp(-1.0, 1.0) if clip_x0 else x)
    return torch.cat(out)


def _ddim_invert_step(model_eps: Tensor, x: Tensor, t_from: Tensor, t_to: Tensor,
                      schedule: NoiseSchedule) -> Tensor:
    """One deterministic DDIM step run forwards, x_{t_from} -> x_{t_to} with t_to > t_from
    (DDIM, Song et al. 2021, eq. 12 with σ = 0, the roles of the two timesteps swapped):

    x_{t_to} = sqrt(ᾱ_{t_to}) x̂_0 + sqrt(1 - ᾱ_{t_to}) ε,
    x̂_0 = (x_{t_from} - sqrt(1 - ᾱ_{t_from}) ε) / sqrt(ᾱ_{t_from})

    t_from = -1 is the clean data (ᾱ = 1)."""
    signal_from = _at_step(schedule.sqrt_alpha_bars, t_from, x, before_first=1.0)
    noise_from = _at_step(schedule.sqrt_one_minus_alpha_bars, t_from, x, before_first=0.0)
    x0_hat = (x - noise_from * model_eps) / signal_from                  # (B, ...)
    signal_to = extract(schedule.sqrt_alpha_bars, t_to, x.shape).to(x)
    noise_to = extract(schedule.sqrt_one_minus_alpha_bars, t_to, x.shape).to(x)
    return signal_to * x0_hat + noise_to * model_eps


@torch.no_grad()
def ddim_invert(model, x0: Tensor, schedule: NoiseSchedule, *, num_steps: int = 50,
                spacing: str = "trailing", autocast: bool | None = None, progress: bool = True,
                **cond) -> Tensor:
    """DDIM inversion: the noise x_T from which deterministic DDIM (η = 0) draws ``x0``.

    Runs deterministic DDIM backwards, from the image to its noise (Song et al. 2021, eq. 13
    with Δt < 0, sections 4.3 and 5.4; Dhariwal & Nichol 2021, "Diffusion models beat
    GANs"): from x0 at t_from = -1 (ᾱ = 1) it visits the timesteps of :func:`ddim_timesteps`
    in ascending order, each step x_{t_from} -> x_{t_to} a DDIM step with the two timesteps
    swapped, using ε_θ(x_{t_from}, t_to) (as diffusers' ``DDIMInverseScheduler``). Sampling
    back from t_to uses ε_θ(x_{t_to}, t_to): where ε_θ changes little along a step the two
    agree, and ``ddim_sample(model, x0.shape, schedule, x_T=ddim_invert(model, x0, schedule))``
    (η = 0, the same ``num_steps`` and ``spacing``; keep ``clip_x0=True``: the first step back,
    at t = T-1 of the cosine schedule, divides by sqrt(ᾱ) ≈ 5e-5) returns about ``x0``.
    No clipping. ``x0``: ``(B, ...)``; returns x_T, same shape, on the model's device.
    """
    device = _sampling_device(model, None, x0)
    if autocast is None:
        autocast = isinstance(model, nn.Module) and _bf16_is_fast(device, model)
    levels = ddim_timesteps(schedule.T, num_steps, spacing=spacing).flip(0).tolist()  # ascending
    schedule = schedule.to(device)
    x = x0.to(device)
    with _eval_mode(model):
        for t_from, t_to in tqdm(list(zip([-1] + levels[:-1], levels)), desc="DDIM inversion",
                                 disable=not progress):
            t_from = torch.full((x.shape[0],), t_from, device=device, dtype=torch.long)
            t_to = torch.full_like(t_from, t_to)
            model_eps = _model_eps(model, x, t_to, device, autocast, cond)  # ε_θ(x, t_to)
            x = _ddim_invert_step(model_eps, x, t_from, t_to, schedule)
    return x


# Interpolating between two noises


def _slerp_alpha(alpha, batch: int, like: Tensor) -> Tensor:
    """``alpha`` as a column ``(N, 1)`` (N = 1 for a float) in ``like``'s dtype and device."""
    if isinstance(alpha, Tensor):
        a = alpha.detach().to(like)
    elif isinstance(alpha, (int, float)) and not isinstance(alpha, bool):
        a = torch.tensor(float(alpha), dtype=like.dtype, device=like.device)
    else:
        raise ValueError(f"alpha must be a float in [0, 1] or a tensor, "
                         f"got {type(alpha).__name__}")
    if a.ndim > 1 or (a.ndim == 1 and batch not in (1, a.shape[0])) \
            or not ((a >= 0) & (a <= 1)).all():
        values = (f" with values in [{a.min().item():.3g}, {a.max().item():.3g}]"
                  if a.numel() else "")
        raise ValueError(f"alpha must be a float in [0, 1] or a tensor of such values of shape "
                         f"() or (B,) = ({batch},), got shape {tuple(a.shape)}{values}")
    return a.reshape(-1, 1)                                              # (N, 1)


def slerp(z0: Tensor, z1: Tensor, alpha) -> Tensor:
    """Spherical linear interpolation from ``z0`` (alpha = 0) to ``z1`` (alpha = 1):

    slerp = sin((1-α) θ) / sin θ · z_0 + sin(α θ) / sin θ · z_1,   cos θ = z_0·z_1 / (|z_0| |z_1|)
    (Shoemake 1985, "Animating rotation with quaternion curves")

    Each sample is flattened to one vector. ``z0``, ``z1``: the same shape, a batch
    ``(B, ...)`` (e.g. ``(B, C, H, W)``, ``(B, 2)``) or one ``(C, H, W)`` / ``(D,)`` sample.
    ``alpha``: a float in [0, 1], or a tensor ``(N,)``: one value per sample (N = B), or N
    interpolants of one pair (B = 1 or a single sample) giving ``(N, ...)``. Unlike a straight
    line, it keeps the norm of Gaussian noise (two independent noises are nearly orthogonal
    and of the same norm). Where the vectors are (nearly) parallel it is linear interpolation.
    """
    _check_same_shape(z1, z0, "z1", "z0")
    scalar = not isinstance(alpha, Tensor) or alpha.ndim == 0
    single = z0.ndim in (1, 3)                                # one (D,) or (C, H, W) sample
    a0, a1 = (z0[None], z1[None]) if single else (z0, z1)     # (B, ...)
    work = torch.promote_types(z0.dtype, torch.float32)
    v0, v1 = a0.reshape(len(a0), -1).to(work), a1.reshape(len(a1), -1).to(work)  # (B, D)
    alpha = _slerp_alpha(alpha, len(a0), v0)                  # (N, 1)
    # 1. the angle θ between each pair of vectors, (B, 1)
    norms = v0.norm(dim=1, keepdim=True) * v1.norm(dim=1, keepdim=True)
    cos = ((v0 * v1).sum(1, keepdim=True) / norms.clamp(min=1e-30)).clamp(-1, 1)
    theta = torch.acos(cos)
    # 2. the weights of z_0 and z_1; linear interpolation where sin θ ≈ 0 (parallel vectors)
    parallel = (cos.abs() > 0.9995) | (norms == 0)
    sin = torch.where(parallel, torch.ones_like(theta), torch.sin(theta))
    w0 = torch.where(parallel, 1 - alpha, torch.sin((1 - alpha) * theta) / sin)   # (N or B, 1)
    w1 = torch.where(parallel, alpha, torch.sin(alpha * theta) / sin)
    # 3. (N or B, D) -> (N or B, ...), or back to one sample for a float alpha
    out = (w0 * v0 + w1 * v1).to(z0.dtype).reshape(-1, *a0.shape[1:])
    return out[0] if single and scalar else out


# ── 06 · CLIP: images and captions in one space ──────────────────────────────────────
#
# Two encoders, one for images (a Vision Transformer) and one for text (a causal
# transformer), each followed by a linear projection into a shared space of unit vectors.
# Trained so that an image and its caption point the same way and mismatched pairs do not
# (CLIP, Radford et al. 2021). The structure follows CLIP's: pre-norm transformer blocks
# with a quick-GELU MLP, a causal text mask, a final layer norm, the text pooled at its
# end-of-text token and the image at its class token. Only the sizes are small.

CLIP_CONTEXT_LENGTH = 24   # tokens per caption, start and end included (CLIP: 77)


class CaptionTokenizer:
    """CLIP's text interface on a closed, word-level vocabulary.

    ``encode(captions)`` -> ``(ids (B, context_length) long, mask (B, context_length) bool)``:
    ``<start>``, one id per word, ``<end>``, then padding (id 0) to ``context_length``;
    ``mask`` is True up to and including ``<end>``. The empty caption ``""`` is
    ``<start> <end>``: the null prompt. A word outside the vocabulary, or a caption longer
    than ``context_length``, raises ValueError naming it.

    Why words and not CLIP's byte-pair encoding: the captions come from a closed vocabulary
    of about 40 words, so BPE trained on them would learn these same words; word tokens keep
    one token per idea ("red", "star"), which is what the attention maps of lesson 08 show.
    """

    PAD, START, END = "<pad>", "<start>", "<end>"

    def __init__(self, vocabulary=None, *, context_length: int = CLIP_CONTEXT_LENGTH):
        words = tuple(vocabulary) if vocabulary is not None else caption_vocabulary()
        self.vocabulary = (self.PAD, self.START, self.END, *words)
        self.ids = {w: i for i, w in enumerate(self.vocabulary)}
        self.context_length = _check_int(context_length, "context_length", 2, 10_000)

    def __len__(self) -> int:
        return len(self.vocabulary)

    def _row(self, caption: str) -> list[int]:
        if not isinstance(caption, str):
            raise ValueError(f"a caption must be a str, got {type(caption).__name__}")
        words = _words(caption)
        unknown = [w for w in words if w not in self.ids]
        if unknown:
            raise ValueError(f"unknown word {unknown[0]!r} in {caption!r}: the tokenizer knows "
                             f"the {len(self.vocabulary) - 3} words of the shapes captions "
                             f"(CaptionTokenizer().vocabulary)")
        if len(words) + 2 > self.context_length:
            raise ValueError(f"{caption!r} has {len(words)} words; at most "
                             f"{self.context_length - 2} fit (context_length "
                             f"{self.context_length}, start and end included)")
        return [self.ids[self.START], *(self.ids[w] for w in words), self.ids[self.END]]

    def encode(self, captions) -> tuple[Tensor, Tensor]:
        captions = [captions] if isinstance(captions, str) else list(captions)
        if not captions:
            raise ValueError("expected at least one caption, got an empty list")
        ids = torch.zeros(len(captions), self.context_length, dtype=torch.long)
        for i, caption in enumerate(captions):
            row = self._row(caption)
            ids[i, :len(row)] = torch.tensor(row)
        return ids, ids != 0

    def decode(self, ids: Tensor) -> list[str]:
        """The words back from ids ``(B, L)``; start, end and padding left out."""
        return [" ".join(self.vocabulary[i] for i in row.tolist() if i > 2) for row in ids]


def end_positions(ids: Tensor, end_id: int = 2) -> Tensor:
    """The index of the ``<end>`` token in each row of ``ids`` ``(B, L)`` -> ``(B,)``."""
    is_end = ids == end_id
    if not bool(is_end.any(-1).all()):
        raise ValueError("every row of ids needs an <end> token (id "
                         f"{end_id}); encode the captions with CaptionTokenizer.encode")
    return is_end.int().argmax(-1)


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """Cut images into non-overlapping patches, each flattened to one vector:

    ``(B, C, H, W) -> (B, N, C·p·p)``, N = (H/p)·(W/p), patches in reading order (row by row,
    left to right); inside a patch the values are in ``(C, p, p)`` order, as a convolution's
    weight ``(width, C, p, p)`` flattens (ViT, Dosovitskiy et al. 2021, sec. 3.1).
    """
    if images.ndim != 4 or images.shape[-1] % patch_size or images.shape[-2] % patch_size:
        raise ValueError(f"expected images (B, C, H, W) with H and W multiples of patch_size "
                         f"{patch_size}, got shape {tuple(images.shape)}")
    B, C, H, W = images.shape
    p = patch_size
    x = images.reshape(B, C, H // p, p, W // p, p)          # (B, C, H/p, p, W/p, p)
    x = x.permute(0, 2, 4, 1, 3, 5)                          # (B, H/p, W/p, C, p, p)
    return x.reshape(B, (H // p) * (W // p), C * p * p)      # (B, N, C·p·p)


def causal_mask(length: int, *, device=None) -> Tensor:
    """``(L, L)`` bool, True where token i may attend to token j: j <= i (itself and earlier
    tokens). ``F.scaled_dot_product_attention``'s convention: True takes part."""
    length = _check_int(length, "length", 1, 10**6)
    return torch.ones(length, length, dtype=torch.bool, device=device).tril()


def quick_gelu(x: Tensor) -> Tensor:
    """x · sigmoid(1.702 x): CLIP's approximation of GELU."""
    return x * torch.sigmoid(1.702 * x)


class MultiHeadAttention(nn.Module):
    """Self-attention over a token sequence ``(B, L, width)``, with an optional boolean
    ``mask`` ``(L, L)`` or ``(B, 1, L, L)`` (True = may attend): softmax(q kᵀ / sqrt(d)) v."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} must be divisible by heads {heads}")
        self.heads = heads
        self.q, self.k, self.v = (nn.Linear(width, width) for _ in range(3))
        self.out = nn.Linear(width, width)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        q, k, v = (_split_heads(f(x), self.heads) for f in (self.q, self.k, self.v))  # (B, h, L, d)
        return self.out(_merge_heads(_attend(q, k, v, mask)))    # (B, L, width)


class TransformerBlock(nn.Module):
    """A pre-norm transformer block (CLIP's "residual attention block"):

        x = x + Attention(LayerNorm(x))
        x = x + Linear(quick_gelu(Linear(LayerNorm(x))))          # MLP 4x wide
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = MultiHeadAttention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.norm1(x), mask)
        return x + self.fc2(quick_gelu(self.fc1(self.norm2(x))))


@dataclass
class ClipConfig:
    """Sizes of :class:`CLIP`'s two encoders and of the shared embedding space."""

    image_size: int = 32
    in_channels: int = 3
    patch_size: int = 4
    vision_width: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    vocab_size: int = 0            # 0: the size of CaptionTokenizer()'s vocabulary
    context_length: int = CLIP_CONTEXT_LENGTH
    text_width: int = 128
    text_layers: int = 4
    text_heads: int = 4
    embed_dim: int = 128           # the shared space

    def __post_init__(self):
        if self.vocab_size == 0:
            self.vocab_size = len(CaptionTokenizer())
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} must be a multiple of patch_size "
                             f"{self.patch_size}")


class VisionTransformer(nn.Module):
    """Images ``(B, C, H, W)`` -> ``(tokens (B, 1 + N, width), pooled (B, width))``:
    patchify, a linear patch embedding, a class token in front, learned position
    embeddings, a layer norm, pre-norm transformer blocks; ``pooled`` is the class token
    after a final layer norm (ViT, Dosovitskiy et al. 2021, eq. 1-4; CLIP's image encoder)."""

    def __init__(self, config: ClipConfig, *, patchify_fn=None):
        super().__init__()
        c, w = config, config.vision_width
        self.patch_size = c.patch_size
        self.patchify_fn = patchify_fn or patchify     # yours, in lesson 06's payoff
        num_patches = (c.image_size // c.patch_size) ** 2
        self.patch_embedding = nn.Linear(c.in_channels * c.patch_size ** 2, w, bias=False)
        self.class_token = nn.Parameter(torch.randn(w) * w ** -0.5)
        self.position_embedding = nn.Parameter(torch.randn(1 + num_patches, w) * w ** -0.5)
        self.norm_pre = nn.LayerNorm(w)
        self.blocks = nn.ModuleList(TransformerBlock(w, c.vision_heads)
                                    for _ in range(c.vision_layers))
        self.norm_post = nn.LayerNorm(w)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        x = self.patch_embedding(self.patchify_fn(images, self.patch_size))          # (B, N, width)
        cls = self.class_token.expand(len(x), 1, -1).to(x.dtype)             # (B, 1, width)
        x = torch.cat([cls, x], dim=1) + self.position_embedding             # (B, 1 + N, width)
        x = self.norm_pre(x)
        for block in self.blocks:
            x = block(x)
        return x, self.norm_post(x[:, 0])


class TextTransformer(nn.Module):
    """Token ids ``(B, L)`` from :class:`CaptionTokenizer` -> ``(tokens (B, L, width),
    pooled (B, width))``: token and position embeddings, pre-norm transformer blocks under a
    causal mask, a final layer norm. ``tokens`` is the context sequence a UNet's
    cross-attention reads (lesson 08); ``pooled`` is the token at ``<end>``, which under the
    causal mask has seen the whole caption and nothing after it (CLIP's text encoder)."""

    def __init__(self, config: ClipConfig, *, mask_fn=None):
        super().__init__()
        c, w = config, config.text_width
        self.mask_fn = mask_fn or causal_mask           # yours, in lesson 06's payoff
        self.token_embedding = nn.Embedding(c.vocab_size, w)
        self.position_embedding = nn.Parameter(torch.randn(c.context_length, w) * 0.01)
        self.blocks = nn.ModuleList(TransformerBlock(w, c.text_heads)
                                    for _ in range(c.text_layers))
        self.norm_final = nn.LayerNorm(w)

    def forward(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        if ids.ndim != 2 or ids.shape[1] > len(self.position_embedding):
            raise ValueError(f"expected token ids (B, L) with L <= "
                             f"{len(self.position_embedding)}, got shape {tuple(ids.shape)}")
        L = ids.shape[1]
        x = self.token_embedding(ids) + self.position_embedding[:L]          # (B, L, width)
        mask = self.mask_fn(L, device=ids.device)                            # (L, L)
        for block in self.blocks:
            x = block(x, mask)
        x = self.norm_final(x)
        return x, x[torch.arange(len(x), device=x.device), end_positions(ids)]   # (B, width)


class CLIP(nn.Module):
    """CLIP (Radford et al. 2021): an image encoder and a text encoder with linear
    projections into one ``embed_dim`` space and a learned temperature.

    ``encode_image(images)`` -> ``(B, embed_dim)``, ``encode_text(ids)`` -> ``(B, embed_dim)``
    (not normalised, as in CLIP); ``forward(images, ids)`` -> the logits ``(B, B)`` of every
    image against every caption: exp(logit_scale) · cosine similarity.
    ``logit_scale`` = log(1/τ) starts at log(1/0.07) and is clamped to at most log(100).
    ``patchify_fn``, ``mask_fn``: replacements for :func:`patchify` and :func:`causal_mask`
    with the same signatures (lesson 06 builds a CLIP from your own).
    """

    def __init__(self, config: ClipConfig | None = None, *, patchify_fn=None, mask_fn=None):
        super().__init__()
        self.config = config or ClipConfig()
        c = self.config
        self.visual = VisionTransformer(c, patchify_fn=patchify_fn)
        self.text = TextTransformer(c, mask_fn=mask_fn)
        self.image_projection = nn.Linear(c.vision_width, c.embed_dim, bias=False)
        self.text_projection = nn.Linear(c.text_width, c.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_image(self, images: Tensor) -> Tensor:
        return self.image_projection(self.visual(images)[1])

    def encode_text(self, ids: Tensor) -> Tensor:
        return self.text_projection(self.text(ids)[1])

    def scale(self) -> Tensor:
        """exp(logit_scale), at most 100 (CLIP, sec. 2.5)."""
        return self.logit_scale.clamp(max=math.log(100)).exp()

    def forward(self, images: Tensor, ids: Tensor) -> Tensor:
        img = F.normalize(self.encode_image(images), dim=-1)                 # (B, D)
        txt = F.normalize(self.encode_text(ids), dim=-1)                     # (B, D)
        return self.scale() * img @ txt.T                                    # (B, B)


def contrastive_loss(image_features: Tensor, text_features: Tensor, logit_scale: Tensor) -> Tensor:
    """CLIP's symmetric contrastive loss (Radford et al. 2021, fig. 3) for a batch of B
    matching pairs ``(B, D)`` (row i of each belongs together), not yet normalised:

        logits = exp(logit_scale) · normalise(image) normalise(text)ᵀ          # (B, B)
        loss   = ( CE(logits, [0..B-1]) + CE(logitsᵀ, [0..B-1]) ) / 2

    the mean of the image -> text and the text -> image cross-entropies.
    """
    if image_features.ndim != 2 or image_features.shape != text_features.shape:
        raise ValueError(f"expected image and text features of the same shape (B, D), got "
                         f"{tuple(image_features.shape)} and {tuple(text_features.shape)}")
    img = F.normalize(image_features, dim=-1)
    txt = F.normalize(text_features, dim=-1)
    logits = logit_scale.exp() * img @ txt.T                                 # (B, B)
    labels = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def zero_shot_scores(image_features: Tensor, class_text_features: Tensor) -> Tensor:
    """Zero-shot classification scores (CLIP, Radford et al. 2021, sec. 3.1.4: zero-shot
    transfer and prompt ensembling):

    ``image_features`` ``(N, D)``; ``class_text_features`` ``(K, P, D)``: the embeddings of P
    prompts for each of K classes. Each class's weight is the mean of its P normalised prompt
    embeddings, normalised again; the score is the cosine similarity of each normalised image
    with each class weight -> ``(N, K)`` in [-1, 1]. The predicted class is the argmax.
    """
    if image_features.ndim != 2 or class_text_features.ndim != 3 \
            or class_text_features.shape[-1] != image_features.shape[-1]:
        raise ValueError(f"expected image features (N, D) and class prompt features (K, P, D), "
                         f"got {tuple(image_features.shape)} and "
                         f"{tuple(class_text_features.shape)}")
    weights = F.normalize(F.normalize(class_text_features, dim=-1).mean(1), dim=-1)   # (K, D)
    return F.normalize(image_features, dim=-1) @ weights.T                             # (N, K)


# The text encoder as a part: what a text-conditioned model reads


@dataclass
class TextEncoding:
    """A batch of encoded captions: ``tokens`` ``(B, L, width)``, the sequence cross-attention
    reads; ``mask`` ``(B, L)`` bool, True up to and including ``<end>``; ``pooled``
    ``(B, embed_dim)``, the caption's normalised CLIP embedding."""

    tokens: Tensor
    mask: Tensor
    pooled: Tensor


class TextEncoder(nn.Module):
    """Captions -> :class:`TextEncoding`, with a CLIP's tokenizer, text transformer and text
    projection: the stable interface a text-to-image model uses (lesson 08).

    ``encoder(["a red star", ""])``; ``encoder.width`` is the width of ``tokens``.
    """

    def __init__(self, clip: CLIP, tokenizer: CaptionTokenizer | None = None):
        super().__init__()
        self.transformer, self.projection = clip.text, clip.text_projection
        self.tokenizer = tokenizer or CaptionTokenizer(context_length=clip.config.context_length)
        self.width = clip.config.text_width

    def forward(self, captions) -> TextEncoding:
        ids, mask = self.tokenizer.encode(captions)
        device = self.projection.weight.device
        tokens, pooled = self.transformer(ids.to(device))
        return TextEncoding(tokens, mask.to(device), F.normalize(self.projection(pooled), dim=-1))


# Using a trained CLIP: prompts for each class, zero-shot accuracy, retrieval


def class_prompts(attribute: str, value: str, n: int, *, seed: int = 0) -> list[str]:
    """``n`` canonical captions whose ``attribute`` is ``value`` and whose other attributes are
    drawn at random: the prompt ensemble of one class, e.g. ``class_prompts("shape", "star",
    8)`` -> ``["a small green star in the top left on a dark background", ...]``."""
    if attribute not in ATTRIBUTES:
        raise ValueError(f"attribute must be one of {ATTRIBUTES}, got {attribute!r}")
    values = ATTRIBUTE_VALUES[ATTRIBUTES.index(attribute)]
    if value not in values:
        raise ValueError(f"{attribute} must be one of {values}, got {value!r}")
    rng = np.random.default_rng([seed, ATTRIBUTES.index(attribute), values.index(value)])
    prompts = []
    for _ in range(_check_int(n, "n", 1, 10**6)):
        labels = [int(rng.integers(len(v))) for v in ATTRIBUTE_VALUES]
        labels[ATTRIBUTES.index(attribute)] = values.index(value)
        prompts.append(canonical_caption(ShapeAttributes.from_labels(labels)))
    return prompts


def _clip_device(clip: CLIP) -> torch.device:
    return next(clip.parameters()).device


@torch.no_grad()
def embed_images(clip: CLIP, images: Tensor, *, batch_size: int = 256) -> Tensor:
    """CLIP image embeddings ``(N, D)``, normalised, of ``images`` ``(N, 3, H, W)`` in [-1, 1]."""
    clip.eval()
    device = _clip_device(clip)
    return torch.cat([F.normalize(clip.encode_image(images[i:i + batch_size].to(device).float()),
                                  dim=-1).cpu() for i in range(0, len(images), batch_size)])


@torch.no_grad()
def embed_captions(clip: CLIP, captions, *, tokenizer: CaptionTokenizer | None = None,
                   batch_size: int = 512) -> Tensor:
    """CLIP text embeddings ``(N, D)``, normalised, of a list of captions."""
    clip.eval()
    tokenizer = tokenizer or CaptionTokenizer(context_length=clip.config.context_length)
    device = _clip_device(clip)
    captions = list(captions)
    return torch.cat([F.normalize(clip.encode_text(tokenizer.encode(captions[i:i + batch_size])[0]
                                                   .to(device)), dim=-1).cpu()
                      for i in range(0, len(captions), batch_size)])


def zero_shot_class_features(clip: CLIP, attribute: str, *, prompts_per_class: int = 32,
                             seed: int = 0) -> Tensor:
    """The prompt embeddings ``(K, P, D)`` of every value of ``attribute`` (see
    :func:`class_prompts`), ready for :func:`zero_shot_scores`."""
    values = ATTRIBUTE_VALUES[ATTRIBUTES.index(attribute)] if attribute in ATTRIBUTES else None
    if values is None:
        raise ValueError(f"attribute must be one of {ATTRIBUTES}, got {attribute!r}")
    prompts = [p for v in values for p in class_prompts(attribute, v, prompts_per_class, seed=seed)]
    return embed_captions(clip, prompts).reshape(len(values), prompts_per_class, -1)


def zero_shot_accuracy(clip: CLIP, images: Tensor, labels: Tensor, *,
                       attributes=("shape", "colour"), prompts_per_class: int = 32,
                       scores_fn=None) -> dict[str, float]:
    """The share of ``images`` whose ``attributes`` CLIP names correctly with no training for
    the task: each image goes to the class whose prompt ensemble it is most similar to.
    ``labels`` ``(N, 5)`` in ``ATTRIBUTES`` order; ``scores_fn``: :func:`zero_shot_scores`
    or your own."""
    scores_fn = scores_fn or zero_shot_scores
    image_features = embed_images(clip, images)
    out = {}
    for attribute in attributes:
        classes = zero_shot_class_features(clip, attribute, prompts_per_class=prompts_per_class)
        predicted = scores_fn(image_features, classes).argmax(-1)
        out[attribute] = float((predicted == labels[:, ATTRIBUTES.index(attribute)].cpu())
                               .float().mean())
    return out


def retrieval_recall(similarity: Tensor, *, ks=(1, 5), same: Tensor | None = None) -> dict[str, float]:
    """Text -> image retrieval from ``similarity`` ``(N texts, N images)``, text i describing
    image i: recall@k is the share of texts whose image is among their k most similar.
    With ``same`` ``(N, N)`` bool (image j shows what text i says, e.g. equal labels),
    any such image counts as found."""
    if similarity.ndim != 2 or similarity.shape[0] != similarity.shape[1]:
        raise ValueError(f"expected a square similarity (N, N), got {tuple(similarity.shape)}")
    n = len(similarity)
    same = torch.eye(n, dtype=torch.bool) if same is None else same.bool() | torch.eye(n, dtype=torch.bool)
    top = similarity.topk(max(ks), dim=1).indices.cpu()                      # (N, k)
    hits = same.gather(1, top)                                               # (N, k)
    return {f"recall@{k}": float(hits[:, :k].any(1).float().mean()) for k in ks}


def load_clip(*, data_dir=None, device=None) -> CLIP:
    """The shipped CLIP (checkpoint ``"clip"``, trained by ``python -m tools.train clip``),
    in eval mode."""
    return load_shipped_model("clip", lambda config: CLIP(ClipConfig(**config)),
                              data_dir=data_dir, device=device)


# ── 07 · Latent diffusion: a VAE and diffusion in its latent space ───────────────────
#
# Lessons 03-05 denoised pixels. Latent diffusion (Rombach et al. 2022) first trains an
# autoencoder that squeezes an image into a small latent z and back, then runs the same
# diffusion model on z: fewer numbers per image, so every step is cheaper. The autoencoder
# is a VAE (Kingma & Welling 2014): the encoder gives a diagonal Gaussian q(z | x) =
# N(μ, diag σ²), a latent is drawn from it by the reparameterisation z = μ + σ ε, and the
# loss is the reconstruction error plus a small weight times KL(q(z | x) || N(0, I)), which
# keeps the latent space smooth. The modules have the structure (and the parameter names)
# of Stable Diffusion's autoencoder, at a small size.


@dataclass
class VAEConfig:
    """Everything that decides a :class:`VAE`'s shape. Level i of the encoder works at
    ``image_size / 2**i`` pixels with ``block_channels[i]`` channels; every level but the last
    halves the resolution, so the latent is ``latent_channels x latent_size x latent_size``."""

    in_channels: int = 3
    latent_channels: int = 4
    block_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    groups: int = 8
    image_size: int = 32

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_channels) - 1)

    @property
    def latent_size(self) -> int:
        return self.image_size // self.downsample_factor

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.latent_channels, self.latent_size, self.latent_size)


class VAEResBlock(nn.Module):
    """The autoencoder's residual block: lesson 02's :class:`ResBlock` without the time.

        h   = conv3x3(SiLU(GroupNorm(x)))
        h   = conv3x3(SiLU(GroupNorm(h)))
        out = shortcut(x) + h                                      # 1x1 conv if C changes
    """

    def __init__(self, in_ch: int, out_ch: int, *, groups: int = 8):
        super().__init__()
        _check_groups(in_ch, groups, "VAEResBlock")
        _check_groups(out_ch, groups, "VAEResBlock")
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=1e-6)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=1e-6)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class VAEAttention(nn.Module):
    """Single-head self-attention over the pixels, with a residual (the autoencoder's
    mid-block): ``x + to_out(softmax(q kᵀ / sqrt(C)) v)`` with q, k, v linear maps of
    GroupNorm(x)."""

    def __init__(self, channels: int, *, groups: int = 8):
        super().__init__()
        _check_groups(channels, groups, "VAEAttention")
        self.group_norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        tokens = self.group_norm(x).flatten(2).transpose(1, 2)   # (B, H*W, C)
        q, k, v = (f(tokens)[:, None] for f in (self.to_q, self.to_k, self.to_v))  # (B, 1, N, C)
        out = self.to_out[0](_attend(q, k, v)[:, 0])               # (B, H*W, C)
        return x + out.transpose(1, 2).reshape(B, C, H, W)


class VAEMidBlock(nn.Module):
    """ResBlock -> attention -> ResBlock at the lowest resolution."""

    def __init__(self, channels: int, *, groups: int = 8):
        super().__init__()
        self.resnets = nn.ModuleList([VAEResBlock(channels, channels, groups=groups)
                                      for _ in range(2)])
        self.attentions = nn.ModuleList([VAEAttention(channels, groups=groups)])

    def forward(self, x: Tensor) -> Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class _Resample(nn.Module):
    """A 3x3 conv after nearest-neighbour upsampling (``up``), or a stride-2 3x3 conv padded
    on the right and bottom only (the autoencoder's downsampling)."""

    def __init__(self, channels: int, *, up: bool):
        super().__init__()
        self.up = up
        self.conv = nn.Conv2d(channels, channels, 3, stride=1 if up else 2,
                              padding=1 if up else 0)

    def forward(self, x: Tensor) -> Tensor:
        if self.up:
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class _VAELevel(nn.Module):
    """ResBlocks at one resolution, then (optionally) a down- or upsampling."""

    def __init__(self, in_ch: int, out_ch: int, *, num_blocks: int, groups: int,
                 resample: str | None):
        super().__init__()
        self.resnets = nn.ModuleList([VAEResBlock(in_ch if i == 0 else out_ch, out_ch,
                                                  groups=groups) for i in range(num_blocks)])
        where = {"down": "downsamplers", "up": "upsamplers"}
        self.resample_name = where.get(resample)
        if resample:
            setattr(self, where[resample], nn.ModuleList([_Resample(out_ch,
                                                                    up=resample == "up")]))

    def forward(self, x: Tensor) -> Tensor:
        for block in self.resnets:
            x = block(x)
        if self.resample_name:
            x = getattr(self, self.resample_name)[0](x)
        return x


class VAEEncoder(nn.Module):
    """``(B, 3, H, W)`` image -> ``(B, 2 * latent_channels, h, w)``: the mean and the
    log-variance of q(z | x), stacked along the channels (before the 1x1 quant conv)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        ch, g = config.block_channels, config.groups
        self.conv_in = nn.Conv2d(config.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            _VAELevel(ch[max(i - 1, 0)], ch[i], num_blocks=config.layers_per_block, groups=g,
                      resample=None if i == len(ch) - 1 else "down") for i in range(len(ch))])
        self.mid_block = VAEMidBlock(ch[-1], groups=g)
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], 2 * config.latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down_blocks:
            h = level(h)
        h = self.mid_block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class VAEDecoder(nn.Module):
    """``(B, latent_channels, h, w)`` latent -> ``(B, 3, H, W)`` image: the encoder's levels
    in reverse, each with one ResBlock more, upsampling after all but the last."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        ch, g = tuple(reversed(config.block_channels)), config.groups
        self.conv_in = nn.Conv2d(config.latent_channels, ch[0], 3, padding=1)
        self.mid_block = VAEMidBlock(ch[0], groups=g)
        self.up_blocks = nn.ModuleList([
            _VAELevel(ch[max(i - 1, 0)], ch[i], num_blocks=config.layers_per_block + 1,
                      groups=g, resample=None if i == len(ch) - 1 else "up")
            for i in range(len(ch))])
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], config.in_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid_block(self.conv_in(z))
        for level in self.up_blocks:
            h = level(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


LOGVAR_RANGE = (-30.0, 20.0)   # the log-variance is clamped here, as Stable Diffusion does


def reparameterize(mean: Tensor, logvar: Tensor, eps: Tensor) -> Tensor:
    """A draw from N(mean, exp(logvar)) written as a function of ``eps`` ~ N(0, I):
    ``z = mean + exp(logvar / 2) * eps`` (Kingma & Welling 2014, section 2.4), so gradients
    flow to ``mean`` and ``logvar``. All three have the same shape."""
    _check_same_shape(logvar, mean, "logvar", "mean")
    _check_same_shape(eps, mean, "eps", "mean")
    return mean + torch.exp(0.5 * logvar) * eps


def gaussian_kl(mean: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mean, diag exp(logvar)) || N(0, I)) of each item of the batch, ``(B,)``:
    ``0.5 * sum(mean² + exp(logvar) - 1 - logvar)`` over every dimension but the first
    (Kingma & Welling 2014, appendix B)."""
    _check_same_shape(logvar, mean, "logvar", "mean")
    per_dim = mean.pow(2) + logvar.exp() - 1.0 - logvar
    return 0.5 * per_dim.flatten(1).sum(dim=1)


@dataclass
class DiagonalGaussian:
    """q(z | x) = N(mean, diag exp(logvar)), the encoder's answer for a batch; ``logvar`` is
    clamped to :data:`LOGVAR_RANGE`."""

    mean: Tensor
    logvar: Tensor

    @classmethod
    def from_moments(cls, moments: Tensor) -> DiagonalGaussian:
        """From ``(B, 2C, h, w)``: the first C channels the mean, the last C the log-variance."""
        mean, logvar = moments.chunk(2, dim=1)
        return cls(mean, logvar.clamp(*LOGVAR_RANGE))

    @property
    def std(self) -> Tensor:
        return torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device,
                          dtype=self.mean.dtype)
        return reparameterize(self.mean, self.logvar, eps)

    def mode(self) -> Tensor:
        return self.mean

    def kl(self) -> Tensor:
        return gaussian_kl(self.mean, self.logvar)


class VAE(nn.Module):
    """A convolutional variational autoencoder with the structure of Stable Diffusion's
    (``AutoencoderKL``): encoder -> 1x1 ``quant_conv`` -> :class:`DiagonalGaussian` -> a latent
    z -> 1x1 ``post_quant_conv`` -> decoder.

    ``encode(x)`` -> DiagonalGaussian; ``decode(z)`` -> image; ``forward(x, generator=None,
    sample=True)`` -> ``(reconstruction, posterior)``. Images ``(B, 3, 32, 32)`` in [-1, 1].
    """

    def __init__(self, config: VAEConfig | None = None):
        super().__init__()
        self.config = config = config or VAEConfig()
        if config.image_size % config.downsample_factor:
            raise ValueError(f"VAEConfig: image_size {config.image_size} must be divisible by "
                             f"the downsampling factor {config.downsample_factor}")
        self.encoder = VAEEncoder(config)
        self.decoder = VAEDecoder(config)
        self.quant_conv = nn.Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)

    def _check(self, x: Tensor, channels: int, multiple: int, what: str) -> None:
        if x.dim() != 4 or x.shape[1] != channels or x.shape[2] % multiple \
                or x.shape[3] % multiple:
            c = self.config
            size = c.image_size if what == "images" else c.latent_size
            raise ValueError(f"VAE expected {what} of shape (B, {channels}, H, W) with H and W "
                             f"divisible by {multiple}, e.g. (B, {channels}, {size}, {size}); "
                             f"got {tuple(x.shape)}")

    def encode(self, x: Tensor) -> DiagonalGaussian:
        self._check(x, self.config.in_channels, self.config.downsample_factor, "images")
        return DiagonalGaussian.from_moments(self.quant_conv(self.encoder(x)))

    def decode(self, z: Tensor) -> Tensor:
        self._check(z, self.config.latent_channels, 1, "latents")
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: Tensor, *, sample: bool = True,
                generator: torch.Generator | None = None) -> tuple[Tensor, DiagonalGaussian]:
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        return self.decode(z), posterior


def vae_loss(reconstruction: Tensor, x: Tensor, mean: Tensor, logvar: Tensor, *,
             kl_weight: float) -> Tensor:
    """The VAE's training loss, averaged over the batch: the squared reconstruction error
    summed over each image's pixels, plus ``kl_weight`` times :func:`gaussian_kl` (a β-VAE,
    Higgins et al. 2017, with a small β: the latent must stay informative)."""
    _check_same_shape(reconstruction, x, "reconstruction", "x")
    squared_error = (reconstruction - x).pow(2).flatten(1).sum(dim=1)     # (B,)
    return (squared_error + kl_weight * gaussian_kl(mean, logvar)).mean()


def psnr(images: Tensor, reference: Tensor) -> Tensor:
    """Peak signal-to-noise ratio in dB of each image against its reference, ``(B,)``,
    for pixels in [-1, 1] (peak-to-peak 2): ``10 log10(2² / MSE)``."""
    _check_same_shape(images, reference, "images", "reference")
    mse = (images.double() - reference.double()).pow(2).flatten(1).mean(dim=1)
    return (10 * torch.log10(4.0 / mse.clamp_min(1e-12))).float()


def latent_scale(latents: Tensor) -> float:
    """The factor that gives the latents unit variance, ``1 / std(latents)`` over all their
    numbers (Rombach et al. 2022, section G): diffusion's schedules assume data of unit scale."""
    if latents.numel() < 2:
        raise ValueError("latent_scale needs a batch of latents, got a tensor of "
                         f"{latents.numel()} number(s)")
    return float(1.0 / latents.double().std())


def load_vae(*, data_dir=None, device=None) -> VAE:
    """The shipped VAE (checkpoint ``"vae"``, trained by ``python -m tools.train vae``), in
    eval mode; its manifest record also holds the latent scale factor (:func:`vae_scale`)."""
    def build(config):
        config = dict(config)
        config["block_channels"] = tuple(config["block_channels"])
        return VAE(VAEConfig(**config))
    return load_shipped_model("vae", build, data_dir=data_dir, device=device)


def vae_scale(*, data_dir=None) -> float:
    """The latent scale factor of the shipped VAE, computed from data when it was trained."""
    return float(CheckpointManifest.load(data_dir).entry("vae")["latent_scale"])


@torch.no_grad()
def encode_latents(vae: VAE, images: Tensor, scale: float, *, sample: bool = False,
                   batch_size: int = 256, generator: torch.Generator | None = None) -> Tensor:
    """Images in [-1, 1] -> scaled latents ``scale * z`` for diffusion (the posterior's mean,
    or a draw from it with ``sample``), in batches, on the VAE's device."""
    device = next(vae.parameters()).device
    out = []
    for i in range(0, len(images), batch_size):
        posterior = vae.encode(images[i:i + batch_size].to(device))
        out.append(scale * (posterior.sample(generator) if sample else posterior.mode()))
    return torch.cat(out)


@torch.no_grad()
def decode_latents(vae: VAE, latents: Tensor, scale: float, *, batch_size: int = 256) -> Tensor:
    """Scaled latents -> images clamped to [-1, 1]: ``decode(latents / scale)``."""
    device = next(vae.parameters()).device
    out = [vae.decode(latents[i:i + batch_size].to(device) / scale).clamp(-1.0, 1.0)
           for i in range(0, len(latents), batch_size)]
    return torch.cat(out)


# Which timesteps DDIM visits on latents. Pixels have x̂_0 clipped to [-1, 1]; latents have no
# such bound, and the cosine schedule's last step has ᾱ = 2.4e-9, so one DDIM step from
# t = T - 1 multiplies the network's error in ε by sqrt(ᾱ_prev / ᾱ_{T-1}), about 1000. The
# "leading" timesteps start at T - T/S instead (ᾱ = 3.7e-3 for 25 steps), as Stable
# Diffusion's scheduler does; the noise there is still all but pure.
LATENT_SPACING = "leading"


class LatentDiffusion:
    """A diffusion model on a VAE's latents, called like a pixel model where it matters:
    ``unet`` predicts ε for scaled latents ``scale * z``; :meth:`images` samples latents with
    DDIM and decodes them."""

    def __init__(self, unet: nn.Module, vae: VAE, scale: float, schedule: NoiseSchedule):
        self.unet, self.vae, self.scale, self.schedule = unet, vae, scale, schedule

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.vae.config.latent_shape

    def images(self, n: int, *, num_steps: int = 50, generator=None, progress: bool = True,
               batch_size: int | None = None, autocast: bool | None = None, **cond) -> Tensor:
        """``n`` images: latents by :func:`ddim_images` (x̂_0 not clipped, timesteps
        :data:`LATENT_SPACING`), then decoded."""
        latents = ddim_images(self.unet, n, self.schedule, num_steps=num_steps,
                              generator=generator, progress=progress, batch_size=batch_size,
                              image_shape=self.latent_shape, clip_x0=False, autocast=autocast,
                              spacing=LATENT_SPACING, **cond)
        return decode_latents(self.vae, latents, self.scale)


# ── 08 · Classifier-free guidance and a miniature Stable Diffusion ────────────────────
#
# Lesson 04 trained a conditional model with the condition sometimes dropped; lesson 09
# steers a model with the gradient of a separate classifier. Classifier-free guidance (Ho &
# Salimans 2022) needs no classifier: the one network trained with and without the caption
# gives both ε_θ(x_t, t, c) and ε_θ(x_t, t, ∅), and
#     ε̂ = ε_θ(x_t, t, ∅) + s (ε_θ(x_t, t, c) - ε_θ(x_t, t, ∅))
# follows ∇log p(x_t) + s ∇log p(c | x_t), the implicit classifier's gradient. With lesson 06's
# text encoder and lesson 07's latent space, this is Stable Diffusion in miniature:
#     prompt -> CLIP text encoder -> cross-attention latent UNet + DDIM + guidance -> VAE decoder


def training_caption(attrs: ShapeAttributes, rng: np.random.Generator) -> str:
    """A caption to train the text-to-image model on: half the time one of the data set's
    full wordings (:func:`caption_for`), otherwise a short one that names the colour and the
    shape and each other attribute with probability 1/2, e.g. ``"a red star"`` or
    ``"a large red star on a dark background"``: prompts may say as much or as little."""
    if rng.random() < 0.5:
        return caption_for(attrs, rng)
    size, position, background = rng.random(3) < 0.5
    words = [attrs.size] * bool(size) + [attrs.colour, attrs.shape]
    text = ("an " if words[0][0] in "aeiou" else "a ") + " ".join(words)
    if position:
        text += f" in the {attrs.position}"
    if background:
        text += f" on a {attrs.background} background"
    return text


def drop_captions(captions, p: float, *, generator: torch.Generator | None = None) -> list[str]:
    """Condition dropout for captions: each caption replaced by the empty caption ``""`` (the
    null prompt, ∅) with probability ``p``, independently; the input list is left unchanged.
    The one network then learns ε_θ(x_t, t, c) and ε_θ(x_t, t, ∅) (Ho & Salimans 2022, alg. 1)."""
    captions = [captions] if isinstance(captions, str) else list(captions)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be a probability in [0, 1], got {p}")
    drop = torch.rand(len(captions), generator=generator) < p
    return ["" if d else c for c, d in zip(captions, drop.tolist())]


def cfg_eps(eps_uncond: Tensor, eps_cond: Tensor, scale: float) -> Tensor:
    """The guided noise estimate of classifier-free guidance (Ho & Salimans 2022, eq. 6, in
    the form Stable Diffusion uses): ``eps_uncond + scale * (eps_cond - eps_uncond)``.
    ``scale`` 0: unconditional; 1: conditional; above 1: guided beyond it."""
    _check_same_shape(eps_cond, eps_uncond, "eps_cond", "eps_uncond")
    return eps_uncond + scale * (eps_cond - eps_uncond)


def img2img_start(x0: Tensor, strength: float, timesteps: Tensor, schedule: NoiseSchedule,
                  eps: Tensor) -> tuple[Tensor, Tensor]:
    """Where image-to-image (SDEdit, Meng et al. 2022) starts: of the sampler's ``timesteps``
    ``(S,)`` (descending), keep the last ``int(S * strength)``, noise the clean ``x0`` to the
    first of those with ``eps`` and return ``(x_t, kept timesteps)``. Strength 1 starts from
    (almost) pure noise; strength 0 returns ``x0`` and no steps."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must lie in [0, 1], got {strength}")
    _check_same_shape(eps, x0, "eps", "x0")
    kept = timesteps[len(timesteps) - min(int(len(timesteps) * strength), len(timesteps)):]
    if len(kept) == 0:
        return x0.clone(), kept
    t = torch.full((x0.shape[0],), int(kept[0]), device=x0.device, dtype=torch.long)
    return q_sample(x0, t, eps, schedule), kept


def inpaint_blend(x: Tensor, known: Tensor, keep: Tensor, t: Tensor, schedule: NoiseSchedule,
                  eps: Tensor) -> Tensor:
    """Inpainting by blending (RePaint's simple form, Lugmayr et al. 2022): after a sampling
    step has reached timestep ``t`` ``(B,)`` (-1: the clean end), put back the known region,
    noised to the same step: ``keep * q_sample(known, t, eps) + (1 - keep) * x``, with
    ``known`` itself where t = -1. ``keep`` is 1 on the region to keep, 0 on the one to
    repaint, and broadcasts against ``x`` (e.g. ``(1, 1, H, W)``)."""
    _check_same_shape(known, x, "known", "x")
    _check_same_shape(eps, x, "eps", "x")
    done = (t < 0).view(-1, *([1] * (x.dim() - 1)))
    known_t = torch.where(done, known, q_sample(known, t.clamp_min(0), eps, schedule))
    return keep * known_t + (1 - keep) * x


def sd_unet_config(vae_config: VAEConfig, context_dim: int | None) -> UNetConfig:
    """The latent UNet of lessons 07 and 08: 64 and 128 channels at the latent's 8x8 and 4x4,
    self-attention (and cross-attention to the caption when ``context_dim``) at both."""
    size = vae_config.latent_size
    return UNetConfig(in_channels=vae_config.latent_channels,
                      out_channels=vae_config.latent_channels, base_channels=64,
                      channel_mults=(1, 2), num_res_blocks=2, attention_resolutions=(size, size // 2),
                      context_dim=context_dim, image_size=size)


class MiniStableDiffusion:
    """prompt -> CLIP text encoder (lesson 06) -> cross-attention latent UNet with DDIM and
    classifier-free guidance -> VAE decoder (lesson 07): text-to-image, image-to-image and
    inpainting. ``MiniStableDiffusion.load()`` builds it from the shipped checkpoints.

    ``cfg_fn``, ``img2img_fn`` and ``blend_fn`` are the pieces lesson 08 has the learner write
    (:func:`cfg_eps`, :func:`img2img_start`, :func:`inpaint_blend` by default).
    """

    def __init__(self, text_encoder: TextEncoder, unet: UNet, vae: VAE, scale: float,
                 schedule: NoiseSchedule, *, cfg_fn=None, img2img_fn=None, blend_fn=None):
        self.text_encoder, self.unet, self.vae = text_encoder.eval(), unet.eval(), vae.eval()
        self.scale, self.schedule = scale, schedule
        self.cfg_fn = cfg_fn or cfg_eps
        self.img2img_fn = img2img_fn or img2img_start
        self.blend_fn = blend_fn or inpaint_blend

    @classmethod
    def load(cls, *, data_dir=None, device=None, **pieces) -> MiniStableDiffusion:
        unet, schedule = load_diffusion_model("sd_unet", data_dir=data_dir, device=device)
        text = TextEncoder(load_clip(data_dir=data_dir, device=device))
        return cls(text, unet, load_vae(data_dir=data_dir, device=device),
                   vae_scale(data_dir=data_dir), schedule, **pieces)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.vae.config.latent_shape

    @torch.no_grad()
    def encode_prompts(self, prompts) -> TextEncoding:
        return self.text_encoder(prompts)

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        """Images ``(B, 3, 32, 32)`` in [-1, 1] -> scaled latents (the posterior's mean)."""
        return encode_latents(self.vae, images.to(self.device), self.scale)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        return decode_latents(self.vae, latents, self.scale)

    @torch.no_grad()
    def guided_eps(self, z: Tensor, t: Tensor, cond: TextEncoding, uncond: TextEncoding,
                   guidance_scale: float) -> Tensor:
        """ε̂ for latents ``z``: the UNet run once on the batch doubled, [∅ or negative; c]."""
        if guidance_scale == 1.0:
            return self.unet(z, t, context=cond.tokens, context_mask=cond.mask)
        eps = self.unet(torch.cat([z, z]), torch.cat([t, t]),
                        context=torch.cat([uncond.tokens, cond.tokens]),
                        context_mask=torch.cat([uncond.mask, cond.mask]))
        eps_uncond, eps_cond = eps.chunk(2)
        return self.cfg_fn(eps_uncond, eps_cond, guidance_scale)

    @torch.no_grad()
    def sample(self, prompts, *, negative_prompt: str = "", num_steps: int = 25,
               guidance_scale: float = 4.0, generator: torch.Generator | None = None,
               init_latents: Tensor | None = None, strength: float = 1.0,
               keep: Tensor | None = None, progress: bool = True) -> Tensor:
        """Scaled latents for ``prompts`` (one per image) by DDIM (η = 0) with guidance, on
        the :data:`LATENT_SPACING` timesteps.

        ``init_latents`` (scaled, one per prompt) with ``strength`` < 1: image-to-image;
        with ``keep`` (1 = keep, broadcastable to the latents): inpainting, which blends
        the known region back after every step.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        n, device = len(prompts), self.device
        if keep is not None and init_latents is None:
            raise ValueError("keep (inpainting) needs init_latents: the scaled latents of the "
                             "image whose kept region is put back")
        if init_latents is not None and tuple(init_latents.shape) != (n, *self.latent_shape):
            raise ValueError(f"init_latents must have the shape {(n, *self.latent_shape)} "
                             f"(one scaled latent per prompt), got {tuple(init_latents.shape)}")
        cond = self.encode_prompts(prompts)
        one = self.encode_prompts([negative_prompt])           # the same for every image
        uncond = TextEncoding(*(v.expand(n, *v.shape[1:]) for v in
                                (one.tokens, one.mask, one.pooled)))
        timesteps = ddim_timesteps(self.schedule.T, num_steps, spacing=LATENT_SPACING)
        schedule = self.schedule.to(device)
        noise = torch.randn((n, *self.latent_shape), generator=generator).to(device)
        if init_latents is None:
            z, visit = noise, timesteps
        else:
            init_latents = init_latents.to(device)
            z, visit = self.img2img_fn(init_latents, strength if keep is None else 1.0,
                                       timesteps, schedule, noise)
        for i in tqdm(range(len(visit)), desc="sampling", disable=not progress):
            t = torch.full((n,), int(visit[i]), device=device, dtype=torch.long)
            t_prev = torch.full_like(t, int(visit[i + 1]) if i + 1 < len(visit) else -1)
            eps = self.guided_eps(z, t, cond, uncond, guidance_scale)
            z = ddim_step(eps, z, t, t_prev, schedule, eta=0.0, noise=torch.zeros_like(z))
            if keep is not None:
                fresh = torch.randn(z.shape, generator=generator).to(device)
                z = self.blend_fn(z, init_latents, keep.to(device), t_prev, schedule, fresh)
        return z

    def __call__(self, prompts, **kwargs) -> Tensor:
        """Images ``(B, 3, 32, 32)`` in [-1, 1] for ``prompts``; keywords as :meth:`sample`."""
        return self.decode(self.sample(prompts, **kwargs))


@torch.no_grad()
def cross_attention_maps(pipe: MiniStableDiffusion, prompt: str, *, num_steps: int = 25,
                         guidance_scale: float = 4.0, generator: torch.Generator | None = None,
                         ) -> tuple[Tensor, Tensor, list[str]]:
    """Where each word of ``prompt`` is looked at: one image is sampled while every
    cross-attention layer's attention probabilities for the prompt (not the null prompt) are
    recorded, averaged over heads, then brought to the latent's size and averaged over layers
    and steps (Hertz et al. 2022, "Prompt-to-Prompt", sec. 3.1).

    Returns ``(image (3, 32, 32), maps (n_tokens, h, w), tokens)``, with ``tokens`` the words
    of the prompt between ``<start>`` and ``<end>`` (both included); each map sums to 1 over
    the tokens at every position.
    """
    records = []
    size = pipe.latent_shape[1:]

    def record(module, args, output):
        x, context, mask = args[0], args[1], args[2] if len(args) > 2 else None
        n = 1                                        # the prompt's item: the batch's last
        tokens = module.norm(x[-n:]).flatten(2).transpose(1, 2)           # (1, H*W, C)
        q = _split_heads(module.q(tokens), module.heads)                   # (1, heads, H*W, d)
        k = _split_heads(module.kv(context[-n:]).chunk(2, dim=-1)[0], module.heads)
        scores = q.float() @ k.float().transpose(-1, -2) / math.sqrt(q.shape[-1])
        if mask is not None:
            scores = scores.masked_fill(~mask[-n:, None, None, :], float("-inf"))
        probs = scores.softmax(-1).mean(1)                                 # (1, H*W, L)
        grid = probs.transpose(1, 2).reshape(n, -1, *x.shape[2:])          # (1, L, H, W)
        records.append(F.interpolate(grid, size=size, mode="bilinear", align_corners=False))

    handles = [m.register_forward_hook(record) for m in pipe.unet.modules()
               if isinstance(m, CrossAttention)]
    try:
        image = pipe([prompt], num_steps=num_steps, guidance_scale=guidance_scale,
                     generator=generator, progress=False)[0]
    finally:
        for handle in handles:
            handle.remove()
    ids, mask = pipe.text_encoder.tokenizer.encode([prompt])
    length = int(mask.sum())
    maps = torch.stack(records).mean(0)[0, :length]                         # (n_tokens, h, w)
    words = [pipe.text_encoder.tokenizer.vocabulary[i] for i in ids[0, :length].tolist()]
    return image, maps.cpu(), words


# Generating images: :func:`generate` (and ``python -m tools.generate``) wraps the pipeline
# above with checked arguments, a seed, image files in and a PNG grid out.

GENERATE_MAX_IMAGES = 64


def save_image_grid(images: Tensor, path, *, nrow: int = 8, upscale: int = 4) -> Path:
    """Write ``images`` ``(B, 3, H, W)`` in [-1, 1] to the PNG file ``path`` as one grid,
    ``nrow`` images a row with 2 white pixels between them, every pixel drawn as an
    ``upscale x upscale`` block (nearest neighbour: 32 x 32 images stay sharp and visible).
    Creates the folder if needed; returns the path."""
    from PIL import Image

    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3 \
            or len(images) == 0:
        got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"save_image_grid expected images of shape (B, 3, H, W), B >= 1, "
                         f"got {got}")
    nrow, upscale = _check_int(nrow, "nrow", 1, 1024), _check_int(upscale, "upscale", 1, 64)
    path = _png_path(path, "path")
    pixels = to_unit_range(torch.nan_to_num(images.detach().float().cpu()))
    pixels = (pixels * 255).round().to(torch.uint8)
    pixels = pixels.repeat_interleave(upscale, 2).repeat_interleave(upscale, 3)  # (B, 3, uH, uW)
    B, _, h, w = pixels.shape
    pad, rows, cols = 2, -(-B // nrow), min(B, nrow)
    grid = torch.full((3, pad + rows * (h + pad), pad + cols * (w + pad)), 255, dtype=torch.uint8)
    for i, image in enumerate(pixels):
        top, left = pad + (i // nrow) * (h + pad), pad + (i % nrow) * (w + pad)
        grid[:, top:top + h, left:left + w] = image
    picture = Image.fromarray(grid.permute(1, 2, 0).numpy())    # (3, H, W) -> (H, W, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda temporary: picture.save(temporary, format="PNG"))
    return path


def _png_path(path, name: str) -> Path:
    """``path`` as a Path, checked to name a PNG file (not a folder)."""
    if not isinstance(path, (str, Path)):
        raise ValueError(f"{name} must be a file path ending in .png, got "
                         f"{type(path).__name__}")
    path = Path(path).expanduser()
    if path.suffix.lower() != ".png":
        raise ValueError(f"{name} must be a file path ending in .png (the grid is written as "
                         f"a PNG), got {str(path)!r}")
    if path.is_dir():
        raise ValueError(f"{name} {str(path)!r} is a folder; give a file name such as "
                         f"{str(path / 'grid.png')!r}")
    return path


def _check_generate_numbers(*, n, seed, guidance_scale, strength, nrow) -> None:
    """The checks of :func:`generate` that need no model: ValueError naming what is expected."""
    _check_int(n, "n", 1, GENERATE_MAX_IMAGES)
    if nrow is not None:
        _check_int(nrow, "nrow", 1, GENERATE_MAX_IMAGES)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) \
            or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be a non-negative int (below 2**63), e.g. 0; got {seed!r}")
    number = (int, float, np.integer, np.floating)
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, number) \
            or not math.isfinite(guidance_scale) or guidance_scale < 0:
        raise ValueError("guidance_scale must be a finite number >= 0 (0: unconditional, 1: "
                         f"the prompt without guidance, above 1: guided; 4 is typical), got "
                         f"{guidance_scale!r}")
    if isinstance(strength, bool) or not isinstance(strength, number) \
            or not 0 < strength <= 1:
        raise ValueError("strength must be a number in (0, 1]: the share of the sampling "
                         "steps redone from the noised init image (near 0 keeps the image, 1 "
                         f"starts from pure noise); got {strength!r}")


def _check_prompt(text, tokenizer, name: str, *, allow_empty: bool = False) -> None:
    """A prompt must be a str of words ``tokenizer`` knows; ValueError naming them otherwise."""
    known = ", ".join(tokenizer.vocabulary[3:])   # after <pad>, <start>, <end>
    if not isinstance(text, str):
        raise ValueError(f"{name} must be a str such as 'a red star', got {type(text).__name__}")
    if not allow_empty and not text.strip():
        raise ValueError(f"the {name} is empty: the empty prompt is the null prompt ∅, which "
                         "classifier-free guidance compares every prompt with, so it asks for "
                         f"nothing. Write some words, e.g. 'a red star'; the model knows: {known}")
    try:
        tokenizer.encode([text])
    except ValueError as err:
        unknown = any(w not in tokenizer.vocabulary for w in _words(text))
        hint = f"; the words it knows: {known}" if unknown else ""
        raise ValueError(f"{name}: {err}{hint}") from None


def _open_picture(source, name: str) -> tuple[Path | Tensor, tuple[int, int]]:
    """An image file's path (checked: it exists and PIL reads it) or a tensor (checked by
    :func:`_picture_tensor`), with its size ``(H, W)``."""
    if isinstance(source, Tensor):
        source = _picture_tensor(source, name)
        return source, tuple(source.shape[-2:])
    if not isinstance(source, (str, Path)):
        raise ValueError(f"{name} must be an image file's path or a tensor, got "
                         f"{type(source).__name__}")
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{name}: no image file at {str(path)!r}"
                                + (" (it is a folder)" if path.is_dir() else ""))
    from PIL import Image
    try:
        with Image.open(path) as im:
            im.load()
            return path, (im.height, im.width)
    except OSError as err:
        raise ValueError(f"{name}: cannot read {str(path)!r} as an image ({err})") from None


def _picture_tensor(x: Tensor, name: str) -> Tensor:
    """An init image ``(3, H, W)`` in [-1, 1], or a mask ``(H, W)`` / ``(1, H, W)`` in [0, 1]
    (1 = repaint), checked -> float32 ``(C, H, W)`` on the CPU."""
    if name == "init_image":
        fits = x.dim() == 3 and x.shape[0] == 3 and x.is_floating_point()
        expected, low = "(3, H, W), floating point, values in [-1, 1]", -1.0
    else:
        fits = x.dim() == 2 or (x.dim() == 3 and x.shape[0] == 1)
        expected, low = "(H, W) or (1, H, W), values in [0, 1] (1 = repaint)", 0.0
    if not fits or x.shape[-1] == 0 or x.shape[-2] == 0:
        raise ValueError(f"{name} must be a tensor of shape {expected}; got shape "
                         f"{tuple(x.shape)}, dtype {x.dtype}")
    x = x.detach().float().cpu().reshape(-1, *x.shape[-2:])
    if not bool(torch.isfinite(x).all()) or x.min() < low - 1e-3 or x.max() > 1 + 1e-3:
        hint = " (du.from_uint8 maps uint8 pixels there)" if low < 0 else ""
        raise ValueError(f"{name} values must lie in [{low:g}, 1]{hint}; got values from "
                         f"{x.min().item():.4g} to {x.max().item():.4g}")
    return x.clamp(low, 1.0)


def _in_frame(picture: Path | Tensor, size: int) -> Tensor:
    """A checked picture centre-cropped to a square and resized to ``size x size``: a file
    through :func:`load_photo` -> ``(3, size, size)`` in [-1, 1]; a tensor ``(C, H, W)`` alike."""
    if isinstance(picture, Path):
        return load_photo(size, path=picture)
    _, H, W = picture.shape
    side = min(H, W)
    top, left = (H - side) // 2, (W - side) // 2
    square = picture[:, top:top + side, left:left + side]
    if side == size:
        return square
    return F.interpolate(square[None], size=(size, size), mode="bilinear", antialias=True,
                         align_corners=False)[0]


def _keep_cells(repaint: Tensor, latent_size: int) -> Tensor:
    """The mask ``(1, S, S)`` (1 = repaint) -> ``keep`` ``(1, 1, h, w)`` on the latent grid:
    1 on the cells to keep. A cell is repainted when at least half of its pixels are."""
    share = F.adaptive_avg_pool2d(repaint[None], latent_size)   # (1, 1, h, w), area averages
    keep = (share < 0.5).float()
    if bool(keep.all()):
        cell = repaint.shape[-1] // latent_size
        raise ValueError("the mask marks nothing to repaint: white (1) marks the region to "
                         "repaint, black (0) the region to keep, and each latent cell of "
                         f"{cell} x {cell} pixels is repainted only when at least half of it "
                         "is white")
    return keep


def _start_latents(pipeline: MiniStableDiffusion, image, mask, n: int):
    """``(init_latents (n, C, h, w), keep (1, 1, h, w))`` for :meth:`MiniStableDiffusion.sample`
    from the opened init image and mask; ``None`` for what is not given."""
    if image is None:
        return None, None
    size = pipeline.vae.config.image_size
    (image, image_hw), (mask, mask_hw) = image, mask or (None, None)
    if mask is not None and mask_hw not in (image_hw, (size, size)):
        raise ValueError(f"the mask is {mask_hw[1]}x{mask_hw[0]} pixels but the init image is "
                         f"{image_hw[1]}x{image_hw[0]}: give a mask of the image's size (or "
                         f"{size}x{size}, the size the model works at)")
    latents = pipeline.encode_images(_in_frame(image, size)[None]).repeat(n, 1, 1, 1)
    if mask is None:
        return latents, None
    frame = _in_frame(mask, size)                          # a file reads as RGB in [-1, 1]
    repaint = to_unit_range(frame).mean(0, keepdim=True) if isinstance(mask, Path) else frame
    return latents, _keep_cells(repaint, pipeline.vae.config.latent_size)


def _load_generate_pipeline(data_dir, device) -> MiniStableDiffusion:
    """The shipped pipeline; FileNotFoundError naming the commands that build what is missing."""
    manifest = CheckpointManifest.load(data_dir)
    commands = {"vae": "vae", "clip": "clip", "sd_unet": "sd"}
    missing = [name for name in commands if name not in manifest.entries]
    if missing:
        raise FileNotFoundError(
            f"generating needs the checkpoints vae, clip and sd_unet; {manifest.path} has no "
            f"{', '.join(missing)}: build them with "
            + " then ".join(f"`python -m tools.train {commands[m]}`" for m in missing))
    return MiniStableDiffusion.load(data_dir=data_dir, device=device or get_device())


def generate(prompt: str, *, n: int = 8, seed: int = 0, steps: int = 25,
             guidance_scale: float = 4.0, negative_prompt: str = "", init_image=None,
             strength: float = 0.6, mask=None, out=None, nrow: int | None = None,
             pipeline: MiniStableDiffusion | None = None, data_dir=None, device=None,
             progress: bool = True) -> Tensor:
    """``n`` images ``(n, 3, 32, 32)`` in [-1, 1], on the CPU, for ``prompt`` from the miniature
    Stable Diffusion: ``pipeline``, by default the shipped one (``MiniStableDiffusion.load``
    from ``data_dir`` onto ``device``, default :func:`get_device`). ``python -m
    tools.generate`` is its command line.

    - Text-to-image: DDIM in ``steps`` steps (1 to T), classifier-free guidance of scale
      ``guidance_scale`` (0: unconditional, 1: the prompt without guidance, above 1: guided)
      away from ``negative_prompt`` (default "", the null prompt ∅).
    - Image-to-image (SDEdit) with ``init_image``: its latent noised ``strength`` of the way
      (in (0, 1]; fewer than one step, strength · steps < 1, gives back the image as the VAE
      reconstructs it; 1 starts from pure noise), then denoised towards the prompt.
    - Inpainting with ``init_image`` and ``mask``: **white (1) = repaint, black (0) = keep**.
      The mask is averaged over each latent cell (4 x 4 pixels) and a cell is repainted when
      at least half of it is white (a hard mask on the latent grid); after every step the
      kept cells are put back, noised to that step. Sampling starts from noise (``strength``
      is not used).

    ``init_image``: an image file (converted to RGB, centre-cropped square and resized to
    32 x 32 by :func:`load_photo`) or a tensor ``(3, H, W)`` in [-1, 1] (cropped and resized
    alike). ``mask``: an image file (grey levels) or a tensor ``(H, W)`` or ``(1, H, W)`` in
    [0, 1], the init image's size or 32 x 32. ``seed`` (an int >= 0) fixes every random draw:
    the same seed gives the same images. ``out``: a ``.png`` path to write the images to as a
    grid of ``nrow`` a row (default ``min(n, 8)``, :func:`save_image_grid`). ``progress``: a
    progress bar over the steps. Every argument is checked before any sampling: ValueError or
    FileNotFoundError saying what was expected.
    """
    _check_generate_numbers(n=n, seed=seed, guidance_scale=guidance_scale,
                            strength=strength, nrow=nrow)
    words = pipeline.text_encoder.tokenizer if pipeline is not None else CaptionTokenizer()
    _check_prompt(prompt, words, "prompt")         # at once, before any loading
    out = None if out is None else _png_path(out, "out")
    if mask is not None and init_image is None:
        raise ValueError("a mask needs an init_image: inpainting repaints part of a given image "
                         "(mask white = repaint, black = keep); pass init_image too")
    image = None if init_image is None else _open_picture(init_image, "init_image")
    mask = None if mask is None else _open_picture(mask, "mask")
    pipeline = pipeline or _load_generate_pipeline(data_dir, device)
    steps = _check_int(steps, "steps", 1, pipeline.schedule.T)
    _check_prompt(prompt, pipeline.text_encoder.tokenizer, "prompt")
    _check_prompt(negative_prompt, pipeline.text_encoder.tokenizer, "negative_prompt",
                  allow_empty=True)
    init_latents, keep = _start_latents(pipeline, image, mask, n)
    generator = torch.Generator().manual_seed(int(seed))   # on the CPU: same draws anywhere
    images = pipeline([prompt] * n, negative_prompt=negative_prompt, num_steps=steps,
                      guidance_scale=float(guidance_scale), generator=generator,
                      init_latents=init_latents, strength=float(strength), keep=keep,
                      progress=progress)
    if out is not None:
        save_image_grid(images, out, nrow=nrow or min(n, 8))
    return images.cpu()


# ── 09 · Guidance from outside the denoiser ──────────────────────────────────────────
#
# Lesson 05 showed the denoiser as a score: ε_θ(x_t, t) = -sqrt(1-ᾱ_t) ∇ log p(x_t). Bayes'
# rule adds a condition y without retraining the denoiser:
#     ∇ log p(x_t | y) = ∇ log p(x_t) + ∇ log p(y | x_t)
# so any model of p(y | x_t) that has a gradient steers sampling. Here: a classifier that
# reads noised images (classifier guidance) and CLIP measured on the predicted x̂_0.


class _TimeConvBlock(nn.Module):
    """conv 3x3 -> GroupNorm -> scale and shift from the time embedding -> SiLU."""

    def __init__(self, c_in: int, c_out: int, stride: int, time_dim: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)
        self.norm = nn.GroupNorm(8, c_out)
        self.time = nn.Linear(time_dim, 2 * c_out)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        scale, shift = self.time(emb)[:, :, None, None].chunk(2, dim=1)   # 2 x (B, c_out, 1, 1)
        return F.silu(self.norm(self.conv(x)) * (1 + scale) + shift)


class NoisyClassifier(nn.Module):
    """A noise-aware attribute classifier p_φ(y | x_t, t) (classifier guidance, Dhariwal &
    Nichol 2021, sec. 4): the CNN of :class:`AttributeClassifier`, each block told the
    timestep through a scale and shift of its normalised features.

    ``forward(xt, t)``: ``xt`` ``(B, 3, 32, 32)``, ``t`` ``(B,)`` integer timesteps ->
    ``{attribute: logits (B, K)}``. Trained by ``python -m tools.train noisy``; shipped as
    the checkpoint ``"noisy_classifier"``.
    """

    def __init__(self, num_classes: dict[str, int] | None = None, *, width: int = 32):
        super().__init__()
        self.num_classes = dict(num_classes or attribute_num_classes())
        w, time_dim = width, 4 * width
        self.width = w
        self.time_mlp = nn.Sequential(nn.Linear(w, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
        plan = [(3, w, 1), (w, w, 1), (w, 2 * w, 2), (2 * w, 2 * w, 1), (2 * w, 4 * w, 2), (4 * w, 4 * w, 1)]
        self.blocks = nn.ModuleList(_TimeConvBlock(a, b, s, time_dim) for a, b, s in plan)
        self.heads = nn.ModuleDict({name: nn.Linear(4 * w, k) for name, k in self.num_classes.items()})

    def forward(self, xt: Tensor, t: Tensor) -> dict[str, Tensor]:
        emb = self.time_mlp(sinusoidal_embedding(t, self.width).to(xt.dtype))   # (B, time_dim)
        h = xt
        for block in self.blocks:                             # (B, 3, 32, 32) -> (B, 4w, 8, 8)
            h = block(h, emb)
        h = h.mean(dim=(2, 3))                                # (B, 4w)
        return {name: head(h) for name, head in self.heads.items()}


def load_noisy_classifier(*, data_dir=None, device=None) -> NoisyClassifier:
    """The shipped noise-aware classifier (checkpoint ``"noisy_classifier"``), in eval mode."""
    return load_shipped_model(
        "noisy_classifier", lambda config: NoisyClassifier(config["num_classes"], width=config["width"]),
        data_dir=data_dir, device=device)


def _check_attribute(attribute: str) -> int:
    if attribute not in ATTRIBUTES:
        raise ValueError(f"attribute must be one of {ATTRIBUTES}, got {attribute!r}")
    return ATTRIBUTES.index(attribute)


def classifier_log_prob_grad(classifier: NoisyClassifier, xt: Tensor, t: Tensor, y: Tensor, *,
                             attribute: str = "shape") -> Tensor:
    """∇_{x_t} log p_φ(y | x_t, t), the classifier's pull towards class ``y`` ``(B,)``:
    the gradient of each sample's log-softmax at its own class, ``(B, 3, H, W)`` like ``xt``.
    Samples do not interact, so the gradient of the batch's sum is every sample's own."""
    _check_attribute(attribute)
    with torch.enable_grad():
        x = xt.detach().requires_grad_(True)
        logits = classifier(x, t)[attribute]                                  # (B, K)
        # bfloat16 logits (autocast) in float32; float64 stays float64
        log_probs = logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(dim=-1)
        chosen = log_probs.gather(1, y.view(-1, 1).to(log_probs.device)).sum()
        return torch.autograd.grad(chosen, x)[0]


def guided_eps(model_eps: Tensor, grad_log_prob: Tensor, t: Tensor, schedule: NoiseSchedule,
               scale: float) -> Tensor:
    """The noise estimate steered by a guide (classifier guidance, Dhariwal & Nichol 2021,
    eq. 14 / algorithm 2):

        ε̂ = ε_θ(x_t, t) - s · sqrt(1 - ᾱ_t) · ∇_{x_t} log p(y | x_t)

    ε = -sqrt(1-ᾱ_t) · score (lesson 05), so this adds s · ∇ log p(y | x_t) to the score.
    """
    _check_same_shape(grad_log_prob, model_eps, "grad_log_prob", "model_eps")
    sqrt_one_minus = extract(schedule.sqrt_one_minus_alpha_bars, t, model_eps.shape)
    return model_eps - scale * sqrt_one_minus * grad_log_prob.to(model_eps.dtype)


def clip_guided_eps(clip: CLIP, model_eps: Tensor, xt: Tensor, t: Tensor, schedule: NoiseSchedule,
                    text_features: Tensor, scale: float) -> Tensor:
    """CLIP guidance on the predicted clean image (after GLIDE's CLIP guidance, Nichol et al.
    2022, sec. 2.4; measured on x̂_0 because this CLIP has only seen clean images):

        1. x̂_0 = (x_t - sqrt(1-ᾱ_t) ε_θ) / sqrt(ᾱ_t)                          (lesson 05)
        2. g   = ∇ cos(CLIP_image(clip(x̂_0, -1, 1)), text)  w.r.t. the clipped x̂_0, ε_θ held fixed
        3. step the clean image, x̂_0' = x̂_0 + s g, and return the ε that predicts it:
           ε̂ = (x_t - sqrt(ᾱ_t) x̂_0') / sqrt(1-ᾱ_t) = ε_θ - s · sqrt(ᾱ_t / (1-ᾱ_t)) · g

    ``text_features`` ``(B, D)`` or ``(D,)``: the target caption's CLIP embedding; ``scale``
    s >= 0 (0 gives ε_θ back). ``xt``, ``model_eps``: ``(B, 3, H, W)``; returns ``(B, 3, H, W)``.
    """
    _check_same_shape(model_eps, xt, "model_eps", "xt")
    x0_hat = predict_x0(xt, t, model_eps, schedule)
    with torch.enable_grad():
        x = x0_hat.detach().clamp(-1, 1).to(clip.logit_scale.dtype).requires_grad_(True)
        image = F.normalize(clip.encode_image(x), dim=-1)                 # (B, D)
        target = F.normalize(text_features.to(image), dim=-1).expand_as(image)
        g = torch.autograd.grad((image * target).sum(), x)[0]             # (B, 3, H, W)
    sqrt_snr = 1 / extract(schedule.sqrt_recipm1_alpha_bars, t, xt.shape)   # sqrt(ᾱ_t / (1-ᾱ_t)), float64-made
    return model_eps - scale * sqrt_snr * g.to(model_eps.dtype)


class Guided:
    """A denoiser steered by a guide, called like a model: ``guided(xt, t)`` -> ε̂, so that
    :func:`ddim_sample` and :func:`ddim_images` sample from it unchanged.

    ``guide(model_eps, xt, t)`` returns the steered ε̂, e.g.
    ``lambda e, x, t: guided_eps(e, classifier_log_prob_grad(c, x, t, y), t, schedule, 2.0)``.
    """

    def __init__(self, model: nn.Module, guide):
        self.model, self.guide = model, guide
        self.config = getattr(model, "config", None)

    def __call__(self, xt: Tensor, t: Tensor) -> Tensor:
        with torch.no_grad(), _eval_mode(self.model):   # as ddim_sample runs a network
            model_eps = self.model(xt, t)
        return self.guide(model_eps, xt, t).detach()
