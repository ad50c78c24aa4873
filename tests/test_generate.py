"""du.generate and its command line, python -m tools.generate, on a miniature Stable Diffusion
built from small fresh modules: shapes, seeds, the PNG grid, image-to-image and inpainting,
every refused argument (in Python and as a usage error), and one run of the shipped model when
its checkpoints are there."""
import dataclasses
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import diffusion_utilities as du
from tools import generate as cli

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
T = 50   # the small pipeline's number of diffusion steps


def small_modules():
    """A CLIP text encoder, a cross-attention latent UNet and a VAE, small and fresh, with the
    structure of the shipped ones."""
    torch.manual_seed(0)
    clip_config = du.ClipConfig(vision_width=16, vision_layers=1, vision_heads=2, text_width=16,
                                text_layers=1, text_heads=2, embed_dim=16)
    vae_config = du.VAEConfig(block_channels=(8, 8, 8), groups=4)
    unet_config = du.UNetConfig(in_channels=4, out_channels=4, base_channels=16,
                                channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(4,),
                                heads=2, groups=4, context_dim=clip_config.text_width,
                                image_size=vae_config.latent_size)
    clip, vae, unet = du.CLIP(clip_config), du.VAE(vae_config), du.UNet(unet_config)
    with torch.no_grad():   # the layers that start at zero: so that ε reads x_t and the prompt
        for p in unet.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(0.0, 0.05)
    scale = du.latent_scale(du.encode_latents(vae, du.reference_images(32), 1.0))
    return clip, vae, unet, scale


@pytest.fixture(scope="module")
def modules():
    return small_modules()


@pytest.fixture(scope="module")
def pipeline(modules):
    clip, vae, unet, scale = modules
    return du.MiniStableDiffusion(du.TextEncoder(clip), unet, vae, scale,
                                  du.NoiseSchedule.create("cosine", T))


@pytest.fixture(scope="module")
def data_dir(modules, tmp_path_factory):
    """The small modules saved as the checkpoints vae, clip and sd_unet, as tools.train does."""
    clip, vae, unet, scale = modules
    folder = tmp_path_factory.mktemp("checkpoints")
    du.save_checkpoint("clip", clip.state_dict(), command="test", data_dir=folder,
                       config=dataclasses.asdict(clip.config))
    du.save_checkpoint("vae", vae.state_dict(), command="test", data_dir=folder,
                       config=dataclasses.asdict(vae.config), latent_scale=scale)
    du.save_checkpoint("sd_unet", unet.state_dict(), command="test", data_dir=folder,
                       config=dataclasses.asdict(unet.config),
                       schedule={"name": "cosine", "T": T})
    return folder


def write_png(path, pixels: np.ndarray) -> Path:
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A 64 x 48 photo, masks (white = repaint: the left half), a file that is no image."""
    folder = tmp_path_factory.mktemp("files")
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    left_half = np.zeros((48, 64), np.uint8)
    left_half[:, :32] = 255
    small_left_half = np.zeros((32, 32), np.uint8)
    small_left_half[:, :16] = 255
    (folder / "notes.png").write_text("not an image")
    return SimpleNamespace(
        folder=folder, photo=write_png(folder / "photo.png", photo),
        mask=write_png(folder / "mask.png", left_half),
        mask32=write_png(folder / "mask32.png", small_left_half),
        mask40=write_png(folder / "mask40.png", np.zeros((40, 40), np.uint8)),
        not_an_image=folder / "notes.png", missing=folder / "missing.png")


def run(pipeline, prompt="a red star", **kwargs):
    kwargs = {"n": 2, "steps": 4, "progress": False, **kwargs}
    return du.generate(prompt, pipeline=pipeline, **kwargs)


def record_sampling(pipeline, monkeypatch):
    """Wrap pipeline.sample to record what generate passed it and the latents it returned."""
    seen = {}
    sample = pipeline.sample

    def recording(prompts, **kwargs):
        seen.update(kwargs, prompts=prompts)
        seen["latents"] = sample(prompts, **kwargs)
        return seen["latents"]
    monkeypatch.setattr(pipeline, "sample", recording)
    return seen


def reconstruction(pipeline, image):
    """The init image as the VAE gives it back: decode(encode(image)), (1, 3, 32, 32)."""
    return pipeline.decode(pipeline.encode_images(image[None])).cpu()


# ── text to image ─────────────────────────────────────────────────────────────────────


def test_images_have_the_asked_shape_and_range_on_the_cpu(pipeline):
    images = run(pipeline, n=3)
    assert images.shape == (3, 3, 32, 32) and images.dtype == torch.float32
    assert images.device.type == "cpu"
    assert bool(torch.isfinite(images).all()) and images.min() >= -1 and images.max() <= 1
    assert not torch.equal(images[0], images[1])   # each image its own noise


def test_the_same_seed_gives_the_same_images_and_another_seed_others(pipeline):
    first, again = run(pipeline, seed=7), run(pipeline, seed=7)
    assert torch.equal(first, again)
    assert (run(pipeline, seed=8) - first).abs().mean() > 1e-3
    assert torch.equal(run(pipeline, seed=np.int64(7)), first)


def test_the_prompt_counts_only_with_guidance(pipeline):
    star, circle = run(pipeline, "a red star"), run(pipeline, "a blue circle")
    assert (star - circle).abs().mean() > 1e-4
    # scale 0: ε_θ(x_t, t, ∅) alone, whatever the prompt
    star0, circle0 = (run(pipeline, p, guidance_scale=0) for p in ("a red star", "a blue circle"))
    assert torch.allclose(star0, circle0, atol=1e-6)
    # the negative prompt replaces ∅
    assert (run(pipeline, negative_prompt="a small star") - star).abs().mean() > 1e-4


def test_the_arguments_reach_the_sampler(pipeline, monkeypatch):
    seen = record_sampling(pipeline, monkeypatch)
    run(pipeline, "a red star", n=3, steps=7, guidance_scale=2.5, negative_prompt="a circle")
    assert seen["prompts"] == ["a red star"] * 3 and seen["num_steps"] == 7
    assert seen["guidance_scale"] == 2.5 and seen["negative_prompt"] == "a circle"
    assert seen["init_latents"] is None and seen["keep"] is None


def test_a_progress_bar_counts_the_steps_unless_turned_off(pipeline, capsys):
    run(pipeline, steps=5, progress=True)
    err = capsys.readouterr().err
    assert "sampling" in err and "5/5" in err
    run(pipeline, steps=5, progress=False)
    assert "sampling" not in capsys.readouterr().err


# ── the PNG grid ──────────────────────────────────────────────────────────────────────


def test_out_writes_a_png_grid_of_the_images(pipeline, tmp_path):
    path = tmp_path / "new folder" / "grid.png"
    images = run(pipeline, n=3, out=path, nrow=2)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "RGB"
        grid = np.array(im)
    # 2 a row, 2 white pixels around and between, each pixel a 4 x 4 block
    assert grid.shape == (2 + 2 * (128 + 2), 2 + 2 * (128 + 2), 3)
    first = (du.to_unit_range(images[0]) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.array_equal(grid[2:130:4, 2:130:4], first)
    assert np.array_equal(grid[2:130, 2:130], first.repeat(4, 0).repeat(4, 1))
    assert (grid[:2] == 255).all() and (grid[130:132] == 255).all()
    assert (grid[132:, 132:] == 255).all()          # no fourth image
    assert not list(path.parent.glob(".*.tmp"))     # written under a temporary name, renamed


def test_the_grid_holds_up_to_eight_images_a_row_by_default(pipeline, tmp_path):
    run(pipeline, n=9, steps=1, out=tmp_path / "nine.png")
    with Image.open(tmp_path / "nine.png") as im:
        assert im.size == (2 + 8 * 130, 2 + 2 * 130)


def test_save_image_grid_upscales_by_nearest_neighbour(tmp_path):
    images = torch.linspace(-1, 1, 2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    path = du.save_image_grid(images, tmp_path / "g.png", nrow=1, upscale=3)
    assert path == tmp_path / "g.png"
    with Image.open(path) as im:
        grid = np.array(im)
    assert grid.shape == (2 + 2 * (12 + 2), 2 + 15 + 2, 3)
    second = np.array(grid[16:28, 2:17])
    expected = (du.to_unit_range(images[1]) * 255).round().byte().permute(1, 2, 0).numpy()
    assert np.array_equal(second, expected.repeat(3, 0).repeat(3, 1))


@pytest.mark.parametrize("images, path, options, message", [
    (torch.zeros(3, 32, 32), "g.png", {}, "(B, 3, H, W)"),
    (torch.zeros(2, 1, 32, 32), "g.png", {}, "(B, 3, H, W)"),
    (torch.zeros(0, 3, 32, 32), "g.png", {}, "B >= 1"),
    (torch.zeros(2, 3, 32, 32), "g.jpg", {}, "ending in .png"),
    (torch.zeros(2, 3, 32, 32), "g.png", {"nrow": 0}, "nrow must be an int in [1, 1024]"),
    (torch.zeros(2, 3, 32, 32), "g.png", {"upscale": 0}, "upscale must be an int in [1, 64]"),
])
def test_save_image_grid_refuses_what_it_cannot_write(images, path, options, message, tmp_path):
    with pytest.raises(ValueError, match=re.escape(message)):
        du.save_image_grid(images, tmp_path / path, **options)


def test_save_image_grid_refuses_a_folder(tmp_path):
    (tmp_path / "grid.png").mkdir()
    with pytest.raises(ValueError, match="is a folder"):
        du.save_image_grid(torch.zeros(1, 3, 8, 8), tmp_path / "grid.png")


# ── image to image ────────────────────────────────────────────────────────────────────


def test_less_than_one_step_of_strength_gives_back_the_reconstruction(pipeline, files):
    photo = du.load_photo(32, path=files.photo)
    images = run(pipeline, init_image=photo, strength=0.1, steps=5)   # int(5 * 0.1) = 0 steps
    assert torch.allclose(images, reconstruction(pipeline, photo).expand_as(images), atol=1e-5)


def test_a_small_strength_stays_close_to_the_reconstruction(pipeline, monkeypatch):
    photo = du.load_photo(32)
    seen = record_sampling(pipeline, monkeypatch)
    init_latents = pipeline.encode_images(photo[None]).cpu()
    assert 0.5 < init_latents.std() < 2                  # the scale gives latents of unit scale
    near = run(pipeline, init_image=photo, strength=1 / T, steps=T)  # one step, from t = 0
    # one DDIM step from t = 0 moves the latents by sqrt(1/ᾱ_0 - 1) (ε - ε̂), ᾱ_0 close to 1
    assert (seen["latents"].cpu() - init_latents).abs().mean() < 0.1
    target = reconstruction(pipeline, photo)
    far = run(pipeline, init_image=photo, strength=0.5, steps=T)     # 25 steps, from t = 24
    assert (near - target).abs().mean() < 0.05     # pixels in [-1, 1]
    assert (near - target).abs().mean() < 0.5 * (far - target).abs().mean()


def test_strength_sets_how_many_steps_run(pipeline):
    calls = []
    hook = pipeline.unet.register_forward_hook(lambda *_: calls.append(1))
    try:
        run(pipeline, init_image=du.load_photo(32), strength=0.6, steps=10)
    finally:
        hook.remove()
    assert len(calls) == 6       # the last int(10 · 0.6) of the 10 steps, guided in one call each


def test_an_image_file_reads_as_its_centre_crop_at_32_pixels(pipeline, files):
    from_file = run(pipeline, init_image=str(files.photo), strength=0.5)
    from_tensor = run(pipeline, init_image=du.load_photo(32, path=files.photo), strength=0.5)
    assert torch.equal(from_file, from_tensor)


def test_an_image_tensor_of_another_size_is_centre_cropped_and_resized(pipeline):
    photo = du.load_photo(32)
    wide = torch.cat([-torch.ones(3, 32, 8), photo, torch.ones(3, 32, 8)], dim=2)   # (3, 32, 48)
    assert torch.equal(run(pipeline, init_image=wide, strength=0.5),
                       run(pipeline, init_image=photo, strength=0.5))


# ── inpainting ────────────────────────────────────────────────────────────────────────


def test_inpainting_keeps_the_kept_latents_and_repaints_the_rest(pipeline, monkeypatch):
    photo = du.load_photo(32)
    repaint = torch.zeros(32, 32)
    repaint[:, :16] = 1                                  # white (1) = repaint: the left half
    seen = record_sampling(pipeline, monkeypatch)
    images = run(pipeline, init_image=photo, mask=repaint, steps=6)
    keep = torch.zeros(1, 1, 8, 8)
    keep[..., 4:] = 1                                    # 1 = keep: the right half of the cells
    assert torch.equal(seen["keep"].cpu(), keep)
    latents, init_latents = seen["latents"].cpu(), pipeline.encode_images(photo[None]).cpu()
    assert torch.allclose(latents[..., 4:], init_latents[..., 4:].expand(2, -1, -1, -1),
                          atol=1e-6)
    assert (latents[..., :4] - init_latents[..., :4]).abs().mean() > 0.1
    # what comes back is the decoded latents: the init image's reconstruction where kept
    kept = torch.where(keep.bool(), init_latents, latents)
    assert torch.allclose(pipeline.decode(kept).cpu(), images, atol=1e-5)


def test_a_mask_file_is_read_like_the_image_it_goes_with(pipeline, files):
    tensor_mask = torch.zeros(48, 64)
    tensor_mask[:, :32] = 1
    with_file = run(pipeline, init_image=files.photo, mask=files.mask)
    assert torch.equal(with_file, run(pipeline, init_image=files.photo, mask=tensor_mask))
    assert torch.equal(with_file, run(pipeline, init_image=files.photo, mask=files.mask32))
    assert torch.equal(with_file, run(pipeline, init_image=files.photo, mask=tensor_mask[None] > 0))


def test_a_latent_cell_is_repainted_when_half_of_it_is_white(pipeline, monkeypatch):
    seen = record_sampling(pipeline, monkeypatch)
    repaint = torch.zeros(32, 32)
    repaint[8:12, 8:10] = 1                              # half of the cell (2, 2)
    run(pipeline, init_image=du.load_photo(32), mask=repaint, steps=2)
    expected = torch.ones(1, 1, 8, 8)
    expected[..., 2, 2] = 0
    assert torch.equal(seen["keep"].cpu(), expected)
    repaint[8:12, 9] = 0                                 # a quarter of it: nothing to repaint
    with pytest.raises(ValueError, match="nothing to repaint.*at least half"):
        run(pipeline, init_image=du.load_photo(32), mask=repaint)


# ── refused arguments ─────────────────────────────────────────────────────────────────

PHOTO = du.load_photo(32)
MASK = torch.ones(32, 32)

ERRORS = [
    # (keyword arguments, error, words the message must hold)
    ({"prompt": ""}, ValueError, ["prompt is empty", "null prompt", "Write some words", "red"]),
    ({"prompt": "  \t "}, ValueError, ["prompt is empty", "null prompt"]),
    ({"prompt": None}, ValueError, ["prompt must be a str"]),
    ({"prompt": "a purple dragon"}, ValueError,
     ["unknown word 'dragon'", "the words it knows: a, against", "triangle"]),
    ({"prompt": "a red star " * 10}, ValueError, ["prompt: ", "has 30 words; at most 22 fit"]),
    ({"negative_prompt": "a cat"}, ValueError,
     ["negative_prompt", "unknown word 'cat'", "the words it knows"]),
    ({"n": 0}, ValueError, ["n must be an int in [1, 64], got 0"]),
    ({"n": 65}, ValueError, ["n must be an int in [1, 64]"]),
    ({"n": 2.0}, ValueError, ["n must be an int"]),
    ({"steps": 0}, ValueError, [f"steps must be an int in [1, {T}], got 0"]),
    ({"steps": T + 1}, ValueError, [f"steps must be an int in [1, {T}], got {T + 1}"]),
    ({"steps": 4.5}, ValueError, ["steps must be an int"]),
    ({"guidance_scale": -0.5}, ValueError, ["guidance_scale must be a finite number >= 0"]),
    ({"guidance_scale": math.nan}, ValueError, ["guidance_scale must be a finite number"]),
    ({"guidance_scale": math.inf}, ValueError, ["guidance_scale must be a finite number"]),
    ({"guidance_scale": "4"}, ValueError, ["guidance_scale must be a finite number"]),
    ({"init_image": PHOTO, "strength": 0.0}, ValueError, ["strength must be a number in (0, 1]"]),
    ({"init_image": PHOTO, "strength": 1.5}, ValueError, ["strength must be a number in (0, 1]"]),
    ({"strength": math.nan}, ValueError, ["strength must be a number in (0, 1]"]),
    ({"seed": -1}, ValueError, ["seed must be a non-negative int", "got -1"]),
    ({"seed": 1.5}, ValueError, ["seed must be a non-negative int"]),
    ({"seed": True}, ValueError, ["seed must be a non-negative int"]),
    ({"seed": 2**64}, ValueError, ["seed must be a non-negative int"]),
    ({"nrow": 0}, ValueError, ["nrow must be an int in [1, 64]"]),
    ({"mask": MASK}, ValueError, ["a mask needs an init_image", "white = repaint"]),
    ({"init_image": PHOTO[None]}, ValueError, ["init_image must be a tensor of shape (3, H, W)",
                                               "(1, 3, 32, 32)"]),
    ({"init_image": ((PHOTO + 1) * 127.5).byte()}, ValueError, ["floating point"]),
    ({"init_image": (PHOTO + 1) * 127.5}, ValueError,
     ["init_image values must lie in [-1, 1]", "from_uint8"]),
    ({"init_image": PHOTO, "mask": MASK.expand(3, 32, 32)}, ValueError,
     ["mask must be a tensor of shape (H, W) or (1, H, W)"]),
    ({"init_image": PHOTO, "mask": MASK * 2}, ValueError, ["mask values must lie in [0, 1]"]),
    ({"init_image": PHOTO, "mask": torch.ones(40, 40)}, ValueError,
     ["the mask is 40x40 pixels but the init image is 32x32"]),
    ({"init_image": PHOTO, "mask": torch.zeros(32, 32)}, ValueError, ["nothing to repaint"]),
    ({"init_image": 3}, ValueError, ["init_image must be an image file's path or a tensor"]),
    ({"out": "grid.jpg"}, ValueError, ["out must be a file path ending in .png"]),
]


@pytest.mark.parametrize("kwargs, error, words", ERRORS,
                         ids=[f"{next(iter(k))}={str(list(k.values())[-1])[:20]}"
                              for k, _, _ in ERRORS])
def test_bad_arguments_are_refused_naming_what_was_expected(pipeline, kwargs, error, words):
    with pytest.raises(error) as caught:
        run(pipeline, **kwargs)
    for word in words:
        assert word in str(caught.value)


FILE_ERRORS = [
    (lambda f: {"init_image": f.missing}, FileNotFoundError,
     ["init_image: no image file at", "missing.png"]),
    (lambda f: {"init_image": f.folder}, FileNotFoundError, ["no image file", "is a folder"]),
    (lambda f: {"init_image": f.not_an_image}, ValueError,
     ["init_image: cannot read", "notes.png", "as an image"]),
    (lambda f: {"init_image": f.photo, "mask": f.missing}, FileNotFoundError,
     ["mask: no image file at", "missing.png"]),
    (lambda f: {"init_image": f.photo, "mask": str(f.not_an_image)}, ValueError,
     ["mask: cannot read", "as an image"]),
    (lambda f: {"init_image": f.photo, "mask": f.mask40}, ValueError,
     ["the mask is 40x40 pixels but the init image is 64x48", "or 32x32"]),
    (lambda f: {"init_image": PHOTO, "mask": f.mask}, ValueError,
     ["the mask is 64x48 pixels but the init image is 32x32"]),
    (lambda f: {"mask": f.mask}, ValueError, ["a mask needs an init_image"]),
    (lambda f: {"out": f.folder}, ValueError, ["ending in .png"]),
]


@pytest.mark.parametrize("make, error, words", FILE_ERRORS)
def test_missing_and_unreadable_files_are_refused(pipeline, files, make, error, words):
    with pytest.raises(error) as caught:
        run(pipeline, **make(files))
    for word in words:
        assert word in str(caught.value)


def test_arguments_are_checked_before_any_model_is_loaded(monkeypatch, files):
    def no_loading(*_):
        raise AssertionError("loaded the model before checking the arguments")
    monkeypatch.setattr(du, "_load_generate_pipeline", no_loading)
    for kwargs in [{"prompt": ""}, {"prompt": "a red star", "n": 0},
                   {"prompt": "a red star", "init_image": files.missing},
                   {"prompt": "a red star", "mask": files.mask}]:
        with pytest.raises((ValueError, FileNotFoundError)):
            du.generate(**kwargs)


# ── the shipped pipeline, loaded from a data folder ───────────────────────────────────


def test_without_a_pipeline_the_checkpoints_of_data_dir_are_loaded(pipeline, data_dir):
    loaded = du.generate("a red star", n=2, steps=4, data_dir=data_dir, device="cpu",
                         progress=False)
    assert torch.allclose(loaded, run(pipeline), atol=1e-5)


def test_missing_checkpoints_name_the_commands_that_build_them(tmp_path):
    with pytest.raises(FileNotFoundError) as caught:
        du.generate("a red star", data_dir=tmp_path)
    message = str(caught.value)
    assert "no vae, clip, sd_unet" in message
    for command in ("python -m tools.train vae", "python -m tools.train clip",
                    "python -m tools.train sd"):
        assert command in message


SHIPPED = {"vae", "clip", "sd_unet"} <= set(du.CheckpointManifest.load().entries)


@pytest.mark.skipif(not SHIPPED, reason="the checkpoints vae, clip and sd_unet are not in "
                    "data/ yet (python -m tools.train vae, clip, sd)")
def test_the_shipped_model_generates_edits_and_inpaints():
    shipped = du.MiniStableDiffusion.load()
    images = du.generate("a red star", n=2, steps=10, pipeline=shipped, progress=False)
    assert images.shape == (2, 3, 32, 32) and bool(torch.isfinite(images).all())
    assert torch.equal(images, du.generate("a red star", n=2, steps=10, pipeline=shipped,
                                           progress=False))
    photo = du.load_photo(32)
    target = reconstruction(shipped, photo)
    kept = du.generate("a red star", n=2, steps=10, pipeline=shipped, progress=False,
                       init_image=photo, strength=0.05)
    assert torch.allclose(kept, target.expand_as(kept), atol=1e-5)
    repaint = torch.zeros(32, 32)
    repaint[:, :16] = 1
    inpainted = du.generate("a red star", n=2, steps=10, pipeline=shipped, progress=False,
                            init_image=photo, mask=repaint)
    error = (inpainted - target).abs().mean(dim=(0, 1, 2))                 # per column
    assert error[20:].mean() < error[:12].mean()    # the kept right half stays closer


# ── the command line ──────────────────────────────────────────────────────────────────


def test_the_command_writes_the_grid_of_the_function(pipeline, data_dir, tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert cli.main(["a red star", "--n", "3", "--steps", "4", "--seed", "5", "--guidance",
                     "2", "--negative", "a circle", "--out", str(out), "--nrow", "2",
                     "--data-dir", str(data_dir), "--device", "cpu", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote 3 images of 'a red star' to {out} in " in printed and printed.endswith(" s\n")
    same = run(pipeline, n=3, steps=4, seed=5, guidance_scale=2, negative_prompt="a circle",
               out=tmp_path / "same.png", nrow=2)
    assert same.shape == (3, 3, 32, 32)
    with Image.open(out) as a, Image.open(tmp_path / "same.png") as b:
        assert np.abs(np.array(a, dtype=int) - np.array(b, dtype=int)).max() <= 1


def test_the_command_edits_and_inpaints_image_files(data_dir, files, tmp_path, capsys):
    common = ["--n", "2", "--steps", "4", "--data-dir", str(data_dir), "--device", "cpu",
              "--quiet", "--init-image", str(files.photo)]
    cli.main(["a red star", *common, "--strength", "0.5", "--out", str(tmp_path / "a.png")])
    cli.main(["a red star", *common, "--mask", str(files.mask), "--out", str(tmp_path / "b.png")])
    assert (tmp_path / "a.png").is_file() and (tmp_path / "b.png").is_file()
    assert capsys.readouterr().out.count("wrote 2 images") == 2


@pytest.mark.parametrize("argv, words", [
    (["", "--quiet"], ["the prompt is empty"]),
    (["a purple dragon"], ["unknown word 'dragon'", "the words it knows"]),
    (["a red star", "--negative", "a cat"], ["argument --negative: unknown word 'cat'"]),
    (["a red star", "--n", "0"], ["argument --n: n must be an int in [1, 64]"]),
    (["a red star", "--n", "two"], ["argument --n: invalid int value: 'two'"]),
    (["a red star", "--steps", str(T + 1)],
     [f"argument --steps: steps must be an int in [1, {T}]"]),
    (["a red star", "--guidance", "-1"], ["argument --guidance: guidance_scale must be"]),
    (["a red star", "--guidance", "nan"], ["argument --guidance:"]),
    (["a red star", "--seed", "-3"], ["argument --seed: seed must be a non-negative int"]),
    (["a red star", "--strength", "0"],
     ["argument --strength: strength must be a number in (0, 1]"]),
    (["a red star", "--mask", "m.png"], ["a mask needs an init_image"]),
    (["a red star", "--init-image", "no-such-file.png"],
     ["argument --init-image: no image file at 'no-such-file.png'"]),
    (["a red star", "--out", "grid.jpg"],
     ["argument --out: out must be a file path ending in .png"]),
    (["a red star", "--device", "nonsense"], ["argument --device: expected cpu, cuda"]),
])
def test_bad_arguments_are_usage_errors(argv, words, data_dir, capsys):
    with pytest.raises(SystemExit) as caught:
        cli.main([*argv, "--data-dir", str(data_dir)])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert "usage: python -m tools.generate" in err
    for word in words:
        assert word in err


def test_missing_checkpoints_are_a_usage_error_naming_the_commands(tmp_path, capsys):
    with pytest.raises(SystemExit) as caught:
        cli.main(["a red star", "--data-dir", str(tmp_path)])
    assert caught.value.code == 2
    assert "python -m tools.train sd" in capsys.readouterr().err


def test_the_command_exits_with_status_2_on_a_bad_argument():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "tools.generate", "a red star", "--n", "0"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "argument --n: n must be an int in [1, 64], got 0" in done.stderr
    assert done.stdout == ""


def test_the_help_shows_examples_and_the_words(capsys):
    with pytest.raises(SystemExit) as caught:
        cli.main(["--help"])
    assert caught.value.code == 0
    out = capsys.readouterr().out
    assert 'python -m tools.generate "a red star"' in out and "--init-image" in out
    assert "words: a, against, an" in out
