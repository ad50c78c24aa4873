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
                                  ``t = 0`` is the first noising step (one step of noise)
``betas``               β_t       variance of the noise added at step t, shape ``(T,)``
``alphas``              α_t       1 - β_t
``alpha_bars``          ᾱ_t       ∏_{s<=t} α_s, the fraction of signal variance left after
                                  step t. NB: the DDIM paper (Song et al. 2021) writes α_t
                                  for our ᾱ_t.
``alpha_bar_t``         ᾱ_t       ᾱ at the batch's timesteps, broadcast to ``(B, 1, 1, 1)``
``alpha_bar_prev``      ᾱ_{t-1}   ᾱ one step earlier; 1 for t = 0 (nothing before step 0)
``x0``                  x_0       clean image, ``(B, C, H, W)``, pixel values in [-1, 1]
``xt``                  x_t       noised image at step t
``eps``                 ε         standard Gaussian noise, same shape as ``x0``
``posterior_variance``  β̃_t       variance of q(x_{t-1} | x_t, x_0):
                                  β_t (1 - ᾱ_{t-1}) / (1 - ᾱ_t)
``snr``, ``log_snr``    SNR_t     ᾱ_t / (1 - ᾱ_t) and its logarithm
======================  ========  ==========================================================

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
    n = _check_int(n, "n", 1, 10**7)
    seed = _check_int(seed, "seed", 0, 2**63 - 1)
    split, image_size = _check_split(split), _check_image_size(image_size)
    draws = np.random.default_rng([seed, SPLITS.index(split)]).random((n, _N_DRAWS))
    labels = _labels_from_draws(draws, _pairs_for_split(split))  # (N, 5)
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
        image = self.data.images[i].float() / 127.5 - 1.0  # uint8 [0, 255] -> [-1, 1]
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


def show_images(images, *, captions=None, nrow: int = 8, title: str | None = None, figsize=None):
    """Draw a grid of images, ``nrow`` per row, each with its (wrapped) caption underneath.

    ``images``: uint8 (N, 3, H, W) or float in [-1, 1], on any device. Returns the matplotlib
    Figure (in a notebook, end the line with ``;`` so it is not drawn twice).
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
    panel, caption_h, title_h = 1.3, 0.14 * max(len(w) for w in lines) + 0.05, 0.35 if title else 0.05
    width, height = figsize or (ncols * panel, nrows * (panel + caption_h) + title_h)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width, height), squeeze=False)
    fig.subplots_adjust(left=0.01, right=0.99, top=1 - title_h / height, bottom=caption_h / height,
                        wspace=0.06, hspace=caption_h / panel)
    for i, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if i < n:
            ax.imshow(pixels[i], interpolation="nearest")
            ax.text(0.5, -0.03, "\n".join(lines[i]), transform=ax.transAxes, ha="center", va="top",
                    fontsize=6.5, linespacing=1.05)
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
    return pixels.float() / 127.5 - 1.0


REAL_DATASETS = ("MNIST", "FashionMNIST", "CIFAR10")


def _three_channels(x: Tensor) -> Tensor:
    """(1, H, W) grey -> (3, H, W); RGB passes through."""
    return x.repeat(3, 1, 1) if x.shape[0] == 1 else x


def real_dataset(name: str, root: str | Path, *, train: bool = True, download: bool = False, image_size: int = 32) -> Dataset:
    """MNIST, FashionMNIST or CIFAR10 through torchvision: items ``(image, class_index)`` with
    image float32 (3, image_size, image_size) in [-1, 1]. Optional (needs a network once,
    with ``download=True``); no lesson requires it."""
    key = str(name).lower().replace("-", "").replace("_", "")
    matches = [d for d in REAL_DATASETS if d.lower() == key]
    if not matches:
        raise ValueError(f"name must be one of {REAL_DATASETS}, got {name!r}")
    image_size, root = _check_image_size(image_size), Path(root)
    hint = f"pass download=True to fetch {matches[0]} (needs a network), or a root that already holds it"
    if not download and not root.exists():
        raise FileNotFoundError(f"data folder {root} does not exist; {hint}")
    from torchvision import datasets, transforms

    transform = transforms.Compose([
        transforms.Resize((image_size, image_size)), transforms.ToTensor(), _three_channels,  # [0, 1], (3, H, W)
        transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # -> [-1, 1]
    ])
    try:
        return getattr(datasets, matches[0])(str(root), train=train, download=download, transform=transform)
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
    process (fewer, larger steps for a small T; the same total noise). Hence T must be large
    enough that ``beta_end * 1000 / T`` stays below 1.
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
    The offset ``s`` keeps the first betas from being vanishingly small; the clipping
    avoids β = 1 (ᾱ = 0) at the very end.
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
    ``alpha_bars[0] = 1 - betas[0]``). Dtype and device follow ``betas``.
    """
    if not isinstance(betas, Tensor) or betas.ndim != 1:
        got = tuple(betas.shape) if isinstance(betas, Tensor) else type(betas).__name__
        raise ValueError(f"betas must be a 1-D tensor of shape (T,), got {got}")
    return torch.cumprod(1.0 - betas, dim=0)


@dataclass
class NoiseSchedule:
    """Everything the forward process needs, one value per timestep: each field has shape ``(T,)``.

    Computed in float64 and stored in float32. Index with integer timesteps t in [0, T),
    ``t = 0`` being one step of noise; use :func:`extract` to broadcast over a batch.
    The posterior fields describe q(x_{t-1} | x_t, x_0) (DDPM, Ho et al. 2020, eqs. 6-7):
    mean = posterior_mean_coef_x0 · x_0 + posterior_mean_coef_xt · x_t, variance
    posterior_variance (β̃_t, which is 0 at t = 0; its log is clipped there, as in
    improved-diffusion).
    """

    betas: Tensor                           # β_t
    alphas: Tensor                          # α_t = 1 - β_t
    alpha_bars: Tensor                      # ᾱ_t
    alpha_bar_prev: Tensor                  # ᾱ_{t-1}, with ᾱ_{-1} = 1
    posterior_variance: Tensor              # β̃_t = β_t (1 - ᾱ_{t-1}) / (1 - ᾱ_t)
    posterior_log_variance_clipped: Tensor  # log β̃_t, with β̃_0 replaced by β̃_1
    posterior_mean_coef_x0: Tensor          # β_t sqrt(ᾱ_{t-1}) / (1 - ᾱ_t)
    posterior_mean_coef_xt: Tensor          # sqrt(α_t) (1 - ᾱ_{t-1}) / (1 - ᾱ_t)

    @property
    def T(self) -> int:
        """The number of diffusion steps."""
        return self.betas.shape[0]

    @classmethod
    def from_betas(cls, betas) -> NoiseSchedule:
        """Build the schedule from β_t ``(T,)`` (tensor or array, values in (0, 1])."""
        betas = torch.as_tensor(betas)
        device = betas.device
        b = betas.detach().to("cpu", torch.float64)  # float64 on the CPU (MPS has no float64)
        if b.ndim != 1 or b.numel() < 1:
            raise ValueError(f"betas must be a 1-D tensor of shape (T,), T >= 1, "
                             f"got shape {tuple(b.shape)}")
        if not ((b > 0) & (b <= 1)).all():
            raise ValueError(f"betas must lie in (0, 1], got values in "
                             f"[{b.min().item():.3g}, {b.max().item():.3g}]")
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
    """SNR_t = ᾱ_t / (1 - ᾱ_t), the signal-to-noise ratio of x_t, shape ``(T,)``."""
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
    alpha_bar_t = extract(schedule.alpha_bars, t, x0.shape).to(x0.device)  # (B, 1, 1, 1)
    signal = alpha_bar_t.sqrt().to(x0.dtype)
    noise = (1.0 - alpha_bar_t).sqrt().to(x0.dtype)
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
