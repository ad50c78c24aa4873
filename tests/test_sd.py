"""Lesson 08's library section: the training captions, caption dropout, classifier-free
guidance, where image-to-image starts and the inpainting blend (against diffusers'
StableDiffusionPipeline and StableDiffusionImg2ImgPipeline where they have a counterpart), and
MiniStableDiffusion on tiny fresh modules: shapes, reproducibility, what guidance, negative
prompts, image-to-image and inpainting do; then the shipped pipeline once it is trained."""
import ast
import importlib.util
import math
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import diffusion_utilities as du

pytestmark = pytest.mark.usefixtures("one_thread")


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


def diffusers_source(relative: str) -> str:
    """The text of a file of the installed diffusers package (skip if there is none). Read,
    not imported: diffusers' Stable Diffusion pipelines import transformers, which the
    course does not need."""
    spec = importlib.util.find_spec("diffusers")
    if spec is None or spec.origin is None:
        pytest.skip("diffusers is a development dependency (pip install -r requirements-dev.txt); "
                    "without it the comparison with it is skipped")
    path = Path(spec.origin).parent / relative
    if not path.exists():
        pytest.skip(f"this diffusers has no {relative}")
    return path.read_text()


# ── training captions ──


@pytest.fixture(scope="module")
def attributes():
    shapes = du.make_shapes(40, seed=5)
    orange = du.ShapeAttributes("star", "orange", "small", "centre", "dark")  # "an orange"
    return [*shapes.attributes, orange]


def short_form(attrs: du.ShapeAttributes) -> re.Pattern:
    """The short captions of ``attrs``: colour and shape, the other attributes optional."""
    words = r"(?P<size>{size} )?{colour} {shape}".format(**vars(attrs))
    return re.compile(rf"^(?P<article>an?) {words}(?P<position> in the {attrs.position})?"
                      rf"(?P<background> on a {attrs.background} background)?$")


def full_forms(attrs: du.ShapeAttributes) -> set[str]:
    """The data set's wordings of ``attrs`` (caption_for with many generators)."""
    return {du.caption_for(attrs, np.random.default_rng(seed)) for seed in range(200)}


def test_training_captions_tokenize_and_name_the_colour_and_the_shape(attributes):
    rng = np.random.default_rng(0)
    captions = [du.training_caption(a, rng) for a in attributes for _ in range(20)]
    ids, mask = du.CaptionTokenizer().encode(captions)       # raises on an unknown word
    assert ids.shape[0] == len(captions) and mask[:, 2].all()
    for caption, attrs in zip(captions, [a for a in attributes for _ in range(20)]):
        words = du._words(caption)
        assert attrs.colour in words and attrs.shape in words, caption


def test_training_captions_mix_full_and_short_wordings(attributes):
    rng = np.random.default_rng(1)
    full_only, short_only, options = [], [], set()
    for attrs in attributes:
        full, pattern = full_forms(attrs), short_form(attrs)
        assert len(full) == 6 and du.canonical_caption(attrs) in full
        for _ in range(40):
            caption = du.training_caption(attrs, rng)
            match = pattern.match(caption)
            assert caption in full or match, caption
            # the canonical wording is both: the short form with every attribute
            full_only.append(match is None)
            if match:
                first = (match["size"] or attrs.colour)[0]
                assert match["article"] == ("an" if first in "aeiou" else "a"), caption
                kind = (bool(match["size"]), bool(match["position"]), bool(match["background"]))
                options.add(kind)
                short_only.append(not all(kind))
            else:
                short_only.append(False)
    # half full wordings (5 of whose 6 are not short forms), half short ones (7 of whose 8
    # kinds leave an attribute out); every one of the eight kinds appears
    assert abs(np.mean(full_only) - 0.5 * 5 / 6) < 0.05
    assert abs(np.mean(short_only) - 0.5 * 7 / 8) < 0.05
    assert len(options) == 8


def test_training_captions_follow_the_generator(attributes):
    first = [du.training_caption(a, np.random.default_rng(3)) for a in attributes]
    assert first == [du.training_caption(a, np.random.default_rng(3)) for a in attributes]
    assert first != [du.training_caption(a, np.random.default_rng(4)) for a in attributes]


# ── caption dropout ──


CAPTIONS = [f"a {c} {s}" for c in du.COLOURS for s in du.SHAPES]


def test_drop_captions_at_zero_and_one():
    assert du.drop_captions(CAPTIONS, 0.0, generator=generator()) == CAPTIONS
    assert du.drop_captions(CAPTIONS, 1.0, generator=generator()) == [""] * len(CAPTIONS)
    assert du.drop_captions("a red star", 0.0) == ["a red star"]
    assert du.drop_captions(tuple(CAPTIONS[:3]), 1.0) == ["", "", ""]


def test_drop_captions_drops_each_with_probability_p_and_leaves_the_input():
    captions = CAPTIONS * 120                                   # 4320 captions
    before = list(captions)
    out = du.drop_captions(captions, 0.3, generator=generator(1))
    assert captions == before and out is not captions
    assert len(out) == len(captions)
    assert all(o in ("", c) for o, c in zip(out, captions))
    dropped = np.array([o == "" for o in out])
    sigma = math.sqrt(0.3 * 0.7 / len(out))
    assert abs(dropped.mean() - 0.3) < 4 * sigma
    # independently of the position: each half drops at the same rate
    assert abs(dropped[::2].mean() - dropped[1::2].mean()) < 8 * sigma
    # the same generator, the same choice
    assert du.drop_captions(captions, 0.3, generator=generator(1)) == out
    assert du.drop_captions(captions, 0.3, generator=generator(2)) != out


@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan")])
def test_drop_captions_refuses_what_is_not_a_probability(p):
    with pytest.raises(ValueError, match=r"p must be a probability in \[0, 1\]"):
        du.drop_captions(CAPTIONS, p)


# ── classifier-free guidance ──


def eps_pair(shape=(3, 4, 4, 4), seed=0):
    g = generator(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def test_cfg_eps_is_unconditional_at_0_and_conditional_at_1():
    eps_uncond, eps_cond = eps_pair()
    assert torch.equal(du.cfg_eps(eps_uncond, eps_cond, 0.0), eps_uncond)
    torch.testing.assert_close(du.cfg_eps(eps_uncond, eps_cond, 1.0), eps_cond)
    # beyond 1: further from the unconditional estimate, along the same direction
    guided = du.cfg_eps(eps_uncond, eps_cond, 3.0)
    torch.testing.assert_close(guided - eps_uncond, 3.0 * (eps_cond - eps_uncond))


@pytest.mark.parametrize("scale", [0.0, 1.0, 2.5, 7.5])
def test_cfg_eps_is_stable_diffusions_formula(scale):
    noise_pred_uncond, noise_pred_text = eps_pair(seed=1)
    # StableDiffusionPipeline.__call__, as written there
    expected = noise_pred_uncond + scale * (noise_pred_text - noise_pred_uncond)
    torch.testing.assert_close(du.cfg_eps(noise_pred_uncond, noise_pred_text, scale), expected,
                               rtol=0, atol=0)


def test_cfg_eps_agrees_with_the_line_in_diffusers():
    source = diffusers_source("pipelines/stable_diffusion/pipeline_stable_diffusion.py")
    lines = [line.strip() for line in source.splitlines()
             if re.match(r"\s*noise_pred = noise_pred_uncond \+", line)]
    assert lines, "StableDiffusionPipeline's guidance line was not found"
    noise_pred_uncond, noise_pred_text = eps_pair(seed=2)
    for scale in (0.0, 1.0, 7.5):
        names = {"noise_pred_uncond": noise_pred_uncond, "noise_pred_text": noise_pred_text,
                 "self": SimpleNamespace(guidance_scale=scale)}
        theirs = eval(lines[0].split("=", 1)[1], {}, names)  # noqa: S307 (diffusers' own line)
        torch.testing.assert_close(du.cfg_eps(noise_pred_uncond, noise_pred_text, scale), theirs)


def test_cfg_eps_refuses_estimates_of_different_shapes():
    eps_uncond, eps_cond = eps_pair()
    with pytest.raises(ValueError, match="eps_cond must have the shape of eps_uncond"):
        du.cfg_eps(eps_uncond, eps_cond[:2], 2.0)


# ── image-to-image: where to start ──


@pytest.fixture(scope="module")
def schedule():
    return du.NoiseSchedule.create("cosine", 100)


def kept_by_diffusers_logic(timesteps, strength):
    """StableDiffusionImg2ImgPipeline.get_timesteps, as documented (scheduler order 1):
    init_timestep = min(int(S * strength), S); t_start = max(S - init_timestep, 0)."""
    S = len(timesteps)
    init_timestep = min(int(S * strength), S)
    t_start = max(S - init_timestep, 0)
    return timesteps[t_start:]


STRENGTHS = [0.0, 0.1, 0.25, 0.3, 0.5, 0.6, 0.7, 0.75, 0.8, 0.99, 1.0]


@pytest.mark.parametrize("S", [1, 4, 10, 25, 50])
def test_img2img_start_keeps_the_timesteps_diffusers_keeps(S, schedule):
    timesteps = du.ddim_timesteps(schedule.T, S)
    g = generator(S)
    x0, eps = torch.rand(2, 4, 3, 3, generator=g) * 2 - 1, torch.randn(2, 4, 3, 3, generator=g)
    for strength in STRENGTHS:
        xt, kept = du.img2img_start(x0, strength, timesteps, schedule, eps)
        assert torch.equal(kept, kept_by_diffusers_logic(timesteps, strength)), strength
        if len(kept):
            t = torch.full((2,), int(kept[0]), dtype=torch.long)
            torch.testing.assert_close(xt, du.q_sample(x0, t, eps, schedule))
        else:
            assert torch.equal(xt, x0) and xt is not x0


def diffusers_get_timesteps():
    """StableDiffusionImg2ImgPipeline.get_timesteps itself, taken from its source file (the
    module cannot be imported without transformers); it only reads ``self.scheduler``."""
    source = diffusers_source("pipelines/stable_diffusion/pipeline_stable_diffusion_img2img.py")
    found = [node for node in ast.walk(ast.parse(source))
             if isinstance(node, ast.FunctionDef) and node.name == "get_timesteps"]
    if not found:
        pytest.skip("this diffusers' img2img pipeline has no get_timesteps")
    namespace = {}
    exec(compile(ast.Module(body=found[:1], type_ignores=[]), "get_timesteps", "exec"), namespace)
    return namespace["get_timesteps"]


@pytest.mark.parametrize("S", [4, 10, 25])
def test_img2img_start_agrees_with_diffusers_get_timesteps(S, schedule):
    get_timesteps = diffusers_get_timesteps()
    from diffusers import DDIMScheduler
    scheduler = DDIMScheduler(num_train_timesteps=schedule.T, beta_schedule="squaredcos_cap_v2",
                              timestep_spacing="trailing", steps_offset=0)
    scheduler.set_timesteps(S)
    ours = du.ddim_timesteps(schedule.T, S)
    assert torch.equal(scheduler.timesteps, ours)
    x0 = torch.zeros(1, 4, 2, 2)
    for strength in STRENGTHS:
        theirs, steps = get_timesteps(SimpleNamespace(scheduler=scheduler), S, strength, "cpu")
        _, kept = du.img2img_start(x0, strength, ours, schedule, torch.zeros_like(x0))
        assert torch.equal(kept, theirs) and len(kept) == steps, strength


def test_img2img_start_refuses_a_strength_outside_0_1_and_a_wrong_eps(schedule):
    x0, timesteps = torch.zeros(2, 4, 3, 3), du.ddim_timesteps(schedule.T, 5)
    for strength in (-0.1, 1.01):
        with pytest.raises(ValueError, match=r"strength must lie in \[0, 1\]"):
            du.img2img_start(x0, strength, timesteps, schedule, torch.zeros_like(x0))
    with pytest.raises(ValueError, match="eps must have the shape of x0"):
        du.img2img_start(x0, 0.5, timesteps, schedule, torch.zeros(1, 4, 3, 3))


# ── inpainting: putting the known region back ──


def blend_inputs(seed=0):
    g = generator(seed)
    x, known, eps = (torch.randn(2, 4, 6, 6, generator=g) for _ in range(3))
    keep = torch.zeros(1, 1, 6, 6)
    keep[..., :3] = 1.0                       # keep the left half, repaint the right half
    return x, known, keep, eps


def test_inpaint_blend_at_the_clean_end_keeps_the_known_region_exactly(schedule):
    x, known, keep, eps = blend_inputs()
    out = du.inpaint_blend(x, known, keep, torch.tensor([-1, -1]), schedule, eps)
    assert torch.equal(out[..., :3], known[..., :3])
    assert torch.equal(out[..., 3:], x[..., 3:])


def test_inpaint_blend_noises_the_known_region_to_each_items_step(schedule):
    x, known, keep, eps = blend_inputs(1)
    t = torch.tensor([-1, 40])
    out = du.inpaint_blend(x, known, keep, t, schedule, eps)
    assert torch.equal(out[0, ..., :3], known[0, ..., :3])
    noised = du.q_sample(known[1:], t[1:], eps[1:], schedule)
    torch.testing.assert_close(out[1:, ..., :3], noised[..., :3])
    assert torch.equal(out[..., 3:], x[..., 3:])
    # a soft mask blends linearly; a per-item mask (B, 1, H, W) works as well
    soft = torch.full((2, 1, 6, 6), 0.25)
    torch.testing.assert_close(du.inpaint_blend(x, known, soft, t, schedule, eps),
                               0.25 * torch.cat([known[:1], noised]) + 0.75 * x)


def test_inpaint_blend_refuses_mismatched_tensors(schedule):
    x, known, keep, eps = blend_inputs()
    t = torch.tensor([3, 3])
    with pytest.raises(ValueError, match="known must have the shape of x"):
        du.inpaint_blend(x, known[:, :3], keep, t, schedule, eps)
    with pytest.raises(ValueError, match="eps must have the shape of x"):
        du.inpaint_blend(x, known, keep, t, schedule, eps[:1])


# ── MiniStableDiffusion on tiny fresh modules ──


PROMPTS = ["a red star", "a small blue circle in the centre"]


@pytest.fixture(scope="module")
def modules():
    """A tiny CLIP's text encoder (width 16), a tiny VAE (8 x 8 images, 4 x 4 x 4 latents)
    and a tiny cross-attention UNet on its latents, every weight moved off its initial value
    (the UNet's output conv starts at zero)."""
    torch.manual_seed(0)
    clip = du.CLIP(du.ClipConfig(image_size=8, patch_size=4, vision_width=16, vision_layers=1,
                                 vision_heads=2, text_width=16, text_layers=1, text_heads=2,
                                 embed_dim=8))
    vae = du.VAE(du.VAEConfig(block_channels=(8, 8), groups=4, latent_channels=4, image_size=8))
    unet = du.UNet(du.UNetConfig(in_channels=4, out_channels=4, base_channels=8,
                                 channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(4,),
                                 heads=2, groups=4, context_dim=16, image_size=4))
    with torch.no_grad():
        for p in [*clip.parameters(), *vae.parameters(), *unet.parameters()]:
            p.add_(0.1 * torch.randn_like(p))
    return du.TextEncoder(clip), unet, vae


# A gentle schedule (ᾱ_{T-1} = 0.98^100 = 0.13): x̂_0 divides by sqrt(ᾱ_t), so at the cosine
# schedule's ᾱ_{T-1} = 2e-7 a random UNet's latents would grow to thousands.
GENTLE = du.NoiseSchedule.from_betas(torch.full((100,), 0.02, dtype=torch.float64))


def tiny_pipeline(modules, **pieces) -> du.MiniStableDiffusion:
    text, unet, vae = modules
    return du.MiniStableDiffusion(text, unet, vae, 1.25, GENTLE, **pieces)


class UNetCalls:
    """Records the batch size of every call of ``unet`` inside a ``with`` block."""

    def __init__(self, unet):
        self.unet, self.sizes = unet, []

    def __enter__(self):
        self.handle = self.unet.register_forward_hook(
            lambda module, args, out: self.sizes.append(args[0].shape[0]))
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def sample(pipe, prompts=PROMPTS, seed=0, **kwargs):
    kwargs = {"num_steps": 4, "guidance_scale": 3.0, "progress": False, **kwargs}
    return pipe.sample(prompts, generator=generator(seed), **kwargs)


def test_sample_gives_latents_and_call_gives_images(modules):
    pipe = tiny_pipeline(modules)
    assert pipe.latent_shape == (4, 4, 4) and pipe.device == torch.device("cpu")
    latents = sample(pipe)
    assert latents.shape == (2, 4, 4, 4) and torch.isfinite(latents).all()
    assert sample(pipe, "a red star").shape == (1, 4, 4, 4)        # one prompt as a str
    images = pipe(PROMPTS, num_steps=3, generator=generator(), progress=False)
    assert images.shape == (2, 3, 8, 8) and images.min() >= -1 and images.max() <= 1
    torch.testing.assert_close(images, pipe.decode(sample(pipe, num_steps=3, guidance_scale=4.0)))


def test_sampling_is_reproducible_with_a_generator(modules):
    pipe = tiny_pipeline(modules)
    a, b = sample(pipe, seed=7), sample(pipe, seed=7)
    assert torch.equal(a, b)
    assert not torch.allclose(a, sample(pipe, seed=8))


def test_guidance_runs_the_unet_once_per_step_on_the_doubled_batch(modules):
    calls = []
    pipe = tiny_pipeline(modules, cfg_fn=lambda u, c, s: calls.append(s) or du.cfg_eps(u, c, s))
    with UNetCalls(pipe.unet) as unet:
        sample(pipe, num_steps=4, guidance_scale=3.0)
    assert unet.sizes == [4] * 4 and calls == [3.0] * 4


def test_guidance_scale_1_is_a_single_conditional_pass(modules):
    pipe = tiny_pipeline(modules)
    with UNetCalls(pipe.unet) as unet:
        plain = sample(pipe, guidance_scale=1.0)
    assert unet.sizes == [2] * 4                       # the prompts only, once per step
    # the conditional half of a doubled batch gives the same
    conditional = sample(tiny_pipeline(modules, cfg_fn=lambda u, c, s: c), guidance_scale=3.0)
    torch.testing.assert_close(plain, conditional, rtol=1e-4, atol=1e-5)
    # and at scale 1 the negative prompt plays no part
    assert torch.equal(plain, sample(pipe, guidance_scale=1.0, negative_prompt="a red star"))


def test_guidance_scale_0_follows_the_negative_prompt_alone(modules):
    pipe = tiny_pipeline(modules)
    unconditional = sample(pipe, guidance_scale=0.0, negative_prompt="a green cross")
    alone = sample(pipe, ["a green cross"] * 2, guidance_scale=1.0)
    torch.testing.assert_close(unconditional, alone, rtol=1e-4, atol=1e-5)


def test_the_negative_prompt_changes_a_guided_sample(modules):
    pipe = tiny_pipeline(modules)
    plain = sample(pipe, guidance_scale=4.0)
    negative = sample(pipe, guidance_scale=4.0, negative_prompt="a green cross")
    assert (plain - negative).abs().max() > 1e-2 * plain.abs().max()


def test_img2img_at_strength_0_returns_the_init_latents(modules):
    pipe = tiny_pipeline(modules)
    init = torch.randn(2, 4, 4, 4, generator=generator(3))
    with UNetCalls(pipe.unet) as unet:
        out = sample(pipe, init_latents=init, strength=0.0)
    assert torch.equal(out, init) and unet.sizes == []


def test_img2img_runs_the_kept_steps_from_the_noised_init(modules):
    seen = []

    def img2img(x0, strength, timesteps, schedule, eps):
        seen.append((strength, timesteps, eps))
        return du.img2img_start(x0, strength, timesteps, schedule, eps)
    pipe = tiny_pipeline(modules, img2img_fn=img2img)
    init = torch.randn(2, 4, 4, 4, generator=generator(3))
    with UNetCalls(pipe.unet) as unet:
        out = sample(pipe, init_latents=init, strength=0.5, num_steps=6)
    strength, timesteps, eps = seen[0]
    assert strength == 0.5 and torch.equal(timesteps, du.ddim_timesteps(100, 6, spacing=du.LATENT_SPACING))
    assert torch.equal(eps, torch.randn(2, 4, 4, 4, generator=generator(0)))  # the first draw
    assert unet.sizes == [4] * 3                        # the last half of the 6 steps
    assert not torch.allclose(out, init)
    # more strength, further from the init
    stronger = sample(pipe, init_latents=init, strength=0.9, num_steps=6)
    assert (stronger - init).norm() > (out - init).norm()


def test_inpainting_with_everything_kept_returns_the_init_latents(modules):
    pipe = tiny_pipeline(modules)
    init = torch.randn(2, 4, 4, 4, generator=generator(4))
    out = sample(pipe, init_latents=init, keep=torch.ones(1, 1, 4, 4))
    assert torch.equal(out, init)


def test_inpainting_keeps_the_known_region_and_repaints_the_rest(modules):
    calls = []

    def blend(x, known, keep, t, schedule, eps):
        calls.append(t.tolist())
        return du.inpaint_blend(x, known, keep, t, schedule, eps)
    pipe = tiny_pipeline(modules, blend_fn=blend)
    init = torch.randn(2, 4, 4, 4, generator=generator(4))
    keep = torch.zeros(1, 1, 4, 4)
    keep[..., :2, :] = 1.0
    out = sample(pipe, init_latents=init, keep=keep, strength=0.3)   # strength: not used
    assert torch.equal(out[..., :2, :], init[..., :2, :])
    assert not torch.allclose(out[..., 2:, :], init[..., 2:, :])
    steps = du.ddim_timesteps(100, 4, spacing=du.LATENT_SPACING).tolist()
    assert calls == [[t, t] for t in [*steps[1:], -1]]   # after every step, at its t_prev


def test_inpainting_with_nothing_kept_is_image_to_image_at_strength_1(modules):
    # the same start, q_sample(init, T-1, the first noise draw); the blend's fresh noise
    # is multiplied by keep = 0, so it changes nothing
    pipe = tiny_pipeline(modules)
    init = torch.randn(2, 4, 4, 4, generator=generator(5))
    inpainted = sample(pipe, init_latents=init, keep=torch.zeros(1, 1, 4, 4))
    assert torch.equal(inpainted, sample(pipe, init_latents=init, strength=1.0))


# ── the shipped pipeline ──


def test_the_shipped_pipeline_makes_images():
    entries = du.CheckpointManifest.load().entries
    missing = [name for name in ("sd_unet", "vae", "clip") if name not in entries]
    if missing:
        pytest.skip(f"the shipped checkpoint(s) {missing} are not trained yet "
                    "(python -m tools.train vae, then python -m tools.train sd)")
    trained_on = entries["sd_unet"]["trained_on"]
    assert trained_on["vae_sha256"] == entries["vae"]["sha256"]
    assert trained_on["clip_sha256"] == entries["clip"]["sha256"]
    assert trained_on["latent_scale"] == pytest.approx(entries["vae"]["latent_scale"])
    pipe = du.MiniStableDiffusion.load()
    assert pipe.unet.config.context_dim == pipe.text_encoder.width
    assert pipe.unet.config.in_channels == pipe.latent_shape[0]
    assert not (pipe.unet.training or pipe.vae.training or pipe.text_encoder.training)
    images = pipe(["a red star", "a large blue circle in the centre on a light background"],
                  num_steps=3, generator=generator(), progress=False)
    assert images.shape == (2, 3, 32, 32) and images.min() >= -1 and images.max() <= 1
