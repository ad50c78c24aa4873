"""Section 00 · the shapes data set, its Dataset/DataLoader, the image grid, the photograph,
and the optional torchvision data sets (only their errors: no network in tests)."""
import hashlib
import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import diffusion_utilities as du  # noqa: E402

N_SAMPLE = 600


@pytest.fixture(scope="module")
def sample() -> du.ShapesData:
    return du.make_shapes(N_SAMPLE, seed=1)


def digest(data: du.ShapesData) -> str:
    """sha256 of everything make_shapes returns: image bytes, labels, captions."""
    h = hashlib.sha256(data.images.numpy().tobytes())
    h.update(data.labels.numpy().tobytes())
    h.update("\n".join(data.captions).encode())
    return h.hexdigest()


def words(caption: str) -> list[str]:
    return re.findall(r"[a-z]+", caption.lower())


def render_stats(data: du.ShapesData) -> dict[str, np.ndarray]:
    """Read each image back: background (the corner closest to the nominal background),
    shape colour (the pixel farthest from it), per-pixel coverage, area and centroid."""
    x = data.images.numpy().astype(np.float64)  # (N, 3, H, W)
    labels = data.labels.numpy()
    n, _, size, _ = x.shape
    nominal_bg = np.array([du.BACKGROUND_RGB[b] for b in du.BACKGROUNDS], dtype=float)[labels[:, 4]]
    corners = x[:, :, [0, 0, -1, -1], [0, -1, 0, -1]]  # (N, 3, 4)
    bg = corners[np.arange(n), :, np.abs(corners - nominal_bg[:, :, None]).sum(1).argmin(1)]  # (N, 3)
    flat = x.reshape(n, 3, -1)
    fg = flat[np.arange(n), :, np.linalg.norm(flat - bg[:, :, None], axis=1).argmax(1)]  # (N, 3)
    direction = fg - bg
    cover = np.einsum("nchw,nc->nhw", x - bg[:, :, None, None], direction) / (direction**2).sum(1)[:, None, None]
    cover = np.clip(cover, 0.0, 1.0)
    area = cover.sum((1, 2))
    yy, xx = (np.mgrid[0:size, 0:size] + 0.5) / size
    centroid = np.stack([(cover * xx).sum((1, 2)), (cover * yy).sum((1, 2))], 1) / area[:, None]
    return {"bg": bg, "fg": fg, "cover": cover, "area": area, "centroid": centroid}


# ── the attribute vocabulary ─────────────────────────────────────────────────────────


def test_attribute_tuples_have_the_designed_sizes():
    assert du.ATTRIBUTES == ("shape", "colour", "size", "position", "background")
    assert len(du.SHAPES) >= 6 and len(du.COLOURS) >= 6
    assert du.SIZES == ("small", "large")
    assert du.POSITIONS == ("centre", "top left", "top right", "bottom left", "bottom right")
    assert len(du.BACKGROUNDS) == 2
    assert du.ATTRIBUTE_VALUES == (du.SHAPES, du.COLOURS, du.SIZES, du.POSITIONS, du.BACKGROUNDS)
    vocabulary = [w for values in du.ATTRIBUTE_VALUES for v in values for w in v.split()]
    assert len(set(du.SHAPES) | set(du.COLOURS)) == len(du.SHAPES) + len(du.COLOURS)
    assert set(vocabulary) >= set(du.SHAPES) | set(du.COLOURS)


def test_colours_stand_out_on_both_backgrounds_and_from_each_other():
    colours = np.array([du.COLOUR_RGB[c] for c in du.COLOURS], dtype=float)
    for background in du.BACKGROUNDS:
        gap = np.linalg.norm(colours - np.array(du.BACKGROUND_RGB[background]), axis=1)
        assert gap.min() > 140, f"a colour is too close to the {background} background"
    pairwise = np.linalg.norm(colours[:, None] - colours[None], axis=2) + 1e9 * np.eye(len(colours))
    assert pairwise.min() > 60


def test_held_out_pairs_are_valid_and_each_part_has_training_partners():
    assert len(du.HELD_OUT_COMBINATIONS) >= 4
    assert len(set(du.HELD_OUT_COMBINATIONS)) == len(du.HELD_OUT_COMBINATIONS)
    for shape, colour in du.HELD_OUT_COMBINATIONS:
        assert shape in du.SHAPES and colour in du.COLOURS
        train_partners_of_shape = {c for c in du.COLOURS if (shape, c) not in du.HELD_OUT_COMBINATIONS}
        train_partners_of_colour = {s for s in du.SHAPES if (s, colour) not in du.HELD_OUT_COMBINATIONS}
        assert len(train_partners_of_shape) >= 3 and len(train_partners_of_colour) >= 3


# ── ShapeAttributes and captions ─────────────────────────────────────────────────────


def test_shape_attributes_labels_round_trip():
    attrs = du.ShapeAttributes("star", "blue", "large", "centre", "dark")
    assert attrs.labels() == (4, 4, 1, 0, 0)
    assert du.ShapeAttributes.from_labels(attrs.labels()) == attrs
    assert du.ShapeAttributes.from_labels(torch.tensor([4, 4, 1, 0, 0])) == attrs
    with pytest.raises(Exception):  # frozen
        attrs.shape = "circle"


@pytest.mark.parametrize("field", du.ATTRIBUTES)
def test_shape_attributes_reject_unknown_names_listing_the_allowed(field):
    values = dict(shape="circle", colour="red", size="small", position="centre", background="dark")
    values[field] = "plaid"
    allowed = du.ATTRIBUTE_VALUES[du.ATTRIBUTES.index(field)]
    with pytest.raises(ValueError, match=rf"{field} must be one of .*{allowed[0]}.*{allowed[-1]}.*'plaid'"):
        du.ShapeAttributes(**values)


@pytest.mark.parametrize("labels, message", [
    ((0, 0, 0, 0), r"expected 5 labels in the order \('shape'"),
    ((0, 6, 0, 0, 0), r"colour label must be an int in \[0, 5\]"),
    ((0, 0, 0, -1, 0), r"position label must be an int in \[0, 4\]"),
])
def test_from_labels_rejects_bad_labels(labels, message):
    with pytest.raises(ValueError, match=message):
        du.ShapeAttributes.from_labels(labels)


def test_canonical_caption_has_the_fixed_wording():
    attrs = du.ShapeAttributes("circle", "red", "small", "top left", "dark")
    assert du.canonical_caption(attrs) == "a small red circle in the top left on a dark background"
    orange = du.ShapeAttributes("star", "orange", "large", "centre", "light")
    assert du.canonical_caption(orange) == "a large orange star in the centre on a light background"


def test_caption_for_varies_its_wording_and_keeps_every_attribute():
    attrs = du.ShapeAttributes("cross", "orange", "large", "bottom right", "light")
    rng = np.random.default_rng(0)
    captions = {du.caption_for(attrs, rng) for _ in range(100)}
    assert len(captions) >= 4
    for caption in captions:
        for value in (attrs.shape, attrs.colour, attrs.size, attrs.position, attrs.background):
            assert value in caption, (value, caption)
        assert " a orange" not in caption and not caption.startswith("a orange")


def test_caption_for_is_reproducible_from_the_generator():
    attrs = du.ShapeAttributes("diamond", "green", "small", "centre", "dark")
    first = [du.caption_for(attrs, np.random.default_rng(7)) for _ in range(3)]
    assert len(set(first)) == 1


@pytest.mark.parametrize("call, message", [
    (lambda a: du.caption_for(a, 0), r"rng must be a numpy\.random\.Generator"),
    (lambda a: du.caption_for(("circle", "red"), np.random.default_rng()), r"expected a ShapeAttributes"),
    (lambda a: du.canonical_caption("a red circle"), r"expected a ShapeAttributes"),
])
def test_caption_functions_reject_wrong_arguments(call, message):
    attrs = du.ShapeAttributes("circle", "red", "small", "centre", "dark")
    with pytest.raises(ValueError, match=message):
        call(attrs)


# ── make_shapes ──────────────────────────────────────────────────────────────────────


def test_same_seed_gives_identical_bytes_and_other_seeds_differ():
    a, b = du.make_shapes(64, seed=3), du.make_shapes(64, seed=3)
    assert digest(a) == digest(b)
    assert digest(du.make_shapes(64, seed=4)) != digest(a)
    assert digest(du.make_shapes(64, seed=3, split="held_out")) != digest(a)


def test_a_prefix_of_a_larger_set_is_the_smaller_set():
    small, large = du.make_shapes(20, seed=2), du.make_shapes(300, seed=2)
    assert torch.equal(small.images, large.images[:20])
    assert torch.equal(small.labels, large.labels[:20])
    assert small.captions == large.captions[:20]


def test_shapes_dtypes_and_ranges(sample):
    assert len(sample) == N_SAMPLE
    assert sample.images.shape == (N_SAMPLE, 3, 32, 32) and sample.images.dtype == torch.uint8
    assert sample.labels.shape == (N_SAMPLE, 5) and sample.labels.dtype == torch.int64
    sizes = torch.tensor([len(v) for v in du.ATTRIBUTE_VALUES])
    assert (sample.labels >= 0).all() and (sample.labels < sizes).all()
    assert len(sample.captions) == len(sample.attributes) == N_SAMPLE
    assert all(isinstance(c, str) and c for c in sample.captions)
    assert [a.labels() for a in sample.attributes] == [tuple(row) for row in sample.labels.tolist()]


@pytest.mark.parametrize("image_size", [16, 48])
def test_image_size_is_configurable(image_size):
    data = du.make_shapes(3, image_size=image_size)
    assert data.images.shape == (3, 3, image_size, image_size)


def test_every_attribute_value_occurs(sample):
    for column, (name, values) in enumerate(zip(du.ATTRIBUTES, du.ATTRIBUTE_VALUES)):
        seen = set(sample.labels[:, column].tolist())
        assert seen == set(range(len(values))), f"some {name} values never occur"


def test_captions_name_the_labelled_colour_and_shape_and_no_other(sample):
    for caption, attrs in zip(sample.captions, sample.attributes):
        found = words(caption)
        assert [w for w in found if w in du.COLOURS] == [attrs.colour], caption
        assert [w for w in found if w in du.SHAPES] == [attrs.shape], caption
        assert attrs.size in found and attrs.background in found and attrs.position in caption


def test_captions_vary_in_wording(sample):
    canonical = [du.canonical_caption(a) for a in sample.attributes]
    share_canonical = np.mean([c == k for c, k in zip(sample.captions, canonical)])
    assert 0.05 < share_canonical < 0.5


def test_train_never_shows_a_held_out_pair_and_held_out_shows_only_those():
    held_out = set(du.HELD_OUT_COMBINATIONS)
    train = du.make_shapes(2000, seed=11)
    train_pairs = {(a.shape, a.colour) for a in train.attributes}
    assert not train_pairs & held_out
    assert len(train_pairs) == len(du.SHAPES) * len(du.COLOURS) - len(held_out)  # all the others occur
    test = du.make_shapes(100, seed=11, split="held_out")
    assert {(a.shape, a.colour) for a in test.attributes} == held_out


def test_rendered_shape_has_the_requested_colour(sample):
    stats = render_stats(sample)
    named = np.array([du.COLOUR_RGB[c] for c in du.COLOURS], dtype=float)
    nearest = np.linalg.norm(stats["fg"][:, None] - named[None], axis=2).argmin(1)
    assert (nearest == sample.labels[:, 1].numpy()).all()
    nominal_bg = np.array([du.BACKGROUND_RGB[b] for b in du.BACKGROUNDS], dtype=float)[sample.labels[:, 4]]
    assert np.abs(stats["bg"] - nominal_bg).max() <= 7  # background jitter is slight


def test_rendered_shape_is_in_the_requested_position(sample):
    centroid = render_stats(sample)["centroid"]  # (N, 2) as fractions of the side: x right, y down
    for i, attrs in enumerate(sample.attributes):
        x, y = centroid[i]
        if attrs.position == "centre":
            assert abs(x - 0.5) < 0.1 and abs(y - 0.5) < 0.1, attrs
        else:
            assert (y < 0.45) == ("top" in attrs.position) and (y > 0.55) == ("bottom" in attrs.position), attrs
            assert (x < 0.45) == ("left" in attrs.position) and (x > 0.55) == ("right" in attrs.position), attrs


def test_large_shapes_cover_more_than_small_ones(sample):
    area = render_stats(sample)["area"]  # in pixels at 32 x 32
    large = sample.labels[:, 2].numpy() == du.SIZES.index("large")
    assert area[~large].max() < 80 < area[large].min()


def test_edges_are_anti_aliased(sample):
    cover = render_stats(sample)["cover"]
    partial = ((cover > 0.1) & (cover < 0.9)).sum((1, 2))  # pixels the edge only partly covers
    assert np.median(partial) >= 8 and (partial > 0).mean() > 0.95


@pytest.mark.parametrize("kwargs, message", [
    (dict(n=0), r"n must be an int in \[1, "),
    (dict(n=2.5), r"n must be an int in \[1, "),
    (dict(n=True), r"n must be an int in \[1, "),
    (dict(n=4, split="test"), r"split must be one of \('train', 'held_out'\), got 'test'"),
    (dict(n=4, image_size=8), r"image_size must be an int in \[16, 256\], got 8"),
    (dict(n=4, image_size=300), r"image_size must be an int in \[16, 256\], got 300"),
    (dict(n=4, image_size=32.0), r"image_size must be an int in \[16, 256\], got 32\.0"),
    (dict(n=4, seed=-1), r"seed must be an int in \[0, "),
])
def test_make_shapes_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        du.make_shapes(**kwargs)


# ── Dataset and DataLoader ───────────────────────────────────────────────────────────


def test_dataset_items_are_scaled_images_labels_and_captions():
    dataset = du.ShapesDataset(10, seed=4)
    data = du.make_shapes(10, seed=4)
    assert len(dataset) == 10
    image, labels, caption = dataset[3]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert image.min() >= -1.0 and image.max() <= 1.0
    torch.testing.assert_close(du.to_unit_range(image), data.images[3].float() / 255.0)
    assert torch.equal(labels, data.labels[3]) and caption == data.captions[3]


def test_dataloader_batches_and_seeded_shuffle():
    loader = du.shapes_dataloader(40, batch_size=16, seed=2, image_size=16)
    images, labels, captions = next(iter(loader))
    assert images.shape == (16, 3, 16, 16) and images.dtype == torch.float32
    assert labels.shape == (16, 5) and labels.dtype == torch.int64
    assert isinstance(captions, (list, tuple)) and len(captions) == 16
    assert [len(batch[0]) for batch in loader] == [16, 16, 8]
    again = du.shapes_dataloader(40, batch_size=16, seed=2, image_size=16)
    assert torch.equal(next(iter(again))[1], labels)  # same seed, same order
    in_order = du.shapes_dataloader(40, batch_size=40, seed=2, shuffle=False, image_size=16)
    assert torch.equal(next(iter(in_order))[1], loader.dataset.data.labels)


def test_dataloader_rejects_bad_batch_size():
    with pytest.raises(ValueError, match=r"batch_size must be an int in \[1, "):
        du.shapes_dataloader(8, batch_size=0)


# ── display helpers ──────────────────────────────────────────────────────────────────


def test_to_unit_range_maps_and_clamps():
    x = torch.tensor([-1.5, -1.0, 0.0, 1.0, 2.0], dtype=torch.float64)
    torch.testing.assert_close(du.to_unit_range(x), torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"expected a floating-point tensor with values in \[-1, 1\]"):
        du.to_unit_range(torch.zeros(3, dtype=torch.uint8))


def test_show_images_returns_a_figure_for_uint8_and_float_input(sample):
    fig = du.show_images(sample.images[:10], captions=sample.captions[:10], nrow=4, title="shapes")
    assert isinstance(fig, matplotlib.figure.Figure)
    assert sum(ax.has_data() for ax in fig.axes) == 10 and len(fig.axes) == 12  # 3 rows of 4
    plt.close(fig)
    floats = (sample.images[:3].float() / 127.5 - 1).requires_grad_()  # detached inside
    fig = du.show_images(floats * 1.0)
    assert len(fig.axes) == 3
    plt.close(fig)
    fig = du.show_images(floats[0].detach())  # a single (3, H, W) image
    assert len(fig.axes) == 1
    plt.close(fig)


def test_show_images_labels_rows(sample):
    fig = du.show_images(sample.images[:6], nrow=3, row_labels=["first", "second"], fontsize=9)
    labels = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert "first" in labels and "second" in labels
    with pytest.raises(ValueError, match=r"one row label per row \(2\), got 3"):
        du.show_images(sample.images[:6], nrow=3, row_labels=["a", "b", "c"])


@pytest.mark.parametrize("images, kwargs, message", [
    (torch.zeros(2, 3, 8, 8), dict(captions=["one"]), r"expected one caption per image \(2\), got 1"),
    (torch.zeros(2, 4, 8, 8), {}, r"expected images of shape \(N, 3, H, W\) or \(N, 1, H, W\)"),
    (torch.zeros(2, 3, 8, 8, dtype=torch.int64), {}, r"expected uint8 images or float images in \[-1, 1\]"),
    (torch.zeros(2, 3, 8, 8), dict(nrow=0), r"nrow must be an int in \[1, "),
])
def test_show_images_rejects_bad_input(images, kwargs, message):
    with pytest.raises(ValueError, match=message):
        du.show_images(images, **kwargs)
    plt.close("all")


# ── the photograph ───────────────────────────────────────────────────────────────────


def test_photo_file_is_small_square_and_documented():
    assert du.PHOTO_PATH.is_file() and du.PHOTO_PATH.stat().st_size < 64_000
    with Image.open(du.PHOTO_PATH) as im:
        assert im.size == (128, 128) and im.mode == "RGB"
    readme = (du.DATA_DIR / "README.md").read_text()
    assert du.PHOTO_PATH.name in readme and "public domain" in readme
    assert hashlib.sha256(du.PHOTO_PATH.read_bytes()).hexdigest() in readme


@pytest.mark.parametrize("size", [64, 128, 20])
def test_load_photo_shape_and_range(size):
    photo = du.load_photo(size)
    assert photo.shape == (3, size, size) and photo.dtype == torch.float32
    assert photo.min() >= -1.0 and photo.max() <= 1.0
    assert photo.std() > 0.2  # a real picture, not a flat colour


def test_load_photo_centre_crops_another_file(tmp_path):
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, 10:30] = 255  # the centre square is white, the sides black
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    photo = du.load_photo(16, path=tmp_path / "wide.png")
    assert photo.shape == (3, 16, 16) and photo.min() > 0.9


@pytest.mark.parametrize("size", [4, 129, 64.0, True])
def test_load_photo_rejects_bad_sizes(size):
    with pytest.raises(ValueError, match=r"size must be an int in \[8, 128\]"):
        du.load_photo(size)


def test_load_photo_names_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"photo not found at .*missing\.png"):
        du.load_photo(32, path=tmp_path / "missing.png")


# ── optional real data sets (no network here) ────────────────────────────────────────


def test_real_dataset_rejects_unknown_names():
    with pytest.raises(ValueError, match=r"name must be one of \('MNIST', 'FashionMNIST', 'CIFAR10'\), got 'imagenet'"):
        du.real_dataset("imagenet", "/nonexistent")


def test_real_dataset_without_files_names_the_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist; put torchvision's MNIST files"):
        du.real_dataset("mnist", tmp_path / "nothing-here")
    with pytest.raises(FileNotFoundError, match=r"MNIST not found under .*; put torchvision's MNIST files"):
        du.real_dataset("MNIST", tmp_path)  # the folder exists but holds no data


def test_real_dataset_never_downloads_and_maps_to_three_channels(tmp_path, monkeypatch):
    import torchvision

    calls = {}

    class FakeFashionMNIST:
        def __init__(self, root, *, train, download, transform):
            calls.update(root=root, train=train, download=download)
            self.transform = transform

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", FakeFashionMNIST)
    dataset = du.real_dataset("fashion-mnist", tmp_path, train=False, image_size=16)
    assert calls == dict(root=str(tmp_path), train=False, download=False)
    grey = Image.fromarray(np.linspace(0, 255, 28 * 28).reshape(28, 28).astype(np.uint8))
    image = dataset.transform(grey)
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32
    assert image.min() >= -1.0 and image.max() <= 1.0 and image.min() < -0.8 and image.max() > 0.8


def test_from_uint8_maps_pixels_to_the_model_range():
    pixels = torch.tensor([0, 128, 255], dtype=torch.uint8)
    expected = torch.tensor([-1.0, 128 / 127.5 - 1, 1.0])
    assert torch.allclose(du.from_uint8(pixels), expected, atol=1e-6)
    with pytest.raises(ValueError, match="expected a uint8 tensor, got torch.float32"):
        du.from_uint8(pixels.float())


def test_combination_labels_are_the_data_sets_labels_without_its_images():
    for split, n, seed in (("train", 1, 0), ("train", 300, 7), ("held_out", 256, 20_001)):
        labels = du.combination_labels(n, split=split, seed=seed)
        assert torch.equal(labels, du.make_shapes(n, seed=seed, split=split).labels)
    with pytest.raises(ValueError, match="split must be one of"):
        du.combination_labels(4, split="test")
