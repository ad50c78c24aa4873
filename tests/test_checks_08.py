"""Tests of lesson 08's exercise checks: the reference passes, a stub is "not attempted", right
versions written in other forms pass, and each planted mistake (the ones learners make, an
input changed in place, a tensor made on the CPU, a NaN) fails with a hint that names it."""
import math
import random

import numpy as np
import pytest
import torch

import diffusion_checks as dc
import diffusion_utilities as du

from check_helpers import DEVICE, IN_PLACE, NAN, table_tests  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def nan_of(reference):
    return lambda *args: reference(*args) * math.nan


def double_of(reference):
    return lambda *args: reference(*args).double()


# -- drop_captions --


def drop_with(*, drop="u < p", fill="", decide="each", seed=None, use_generator=True,
              fixed_generator=False):
    """A learner's drop_captions with one knob turned."""
    def drop_captions(captions, p, *, generator=None):
        if seed is not None:
            torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(0) if fixed_generator and generator else generator
        n = len(captions)
        if decide == "call":
            u = torch.rand(1, generator=gen if use_generator else None).expand(n)
        elif decide == "exact":
            u = torch.ones(n)
            u[torch.randperm(n, generator=gen)[:round(p * n)]] = 0.0
        elif decide == "first":
            u = torch.arange(n) / max(n, 1)
        else:
            u = torch.rand(n, generator=gen if use_generator else None)
        dropped = u >= p if drop == "u >= p" else u < p
        return [fill if d else c for c, d in zip(captions, dropped.tolist())]
    return drop_captions


def drop_inverted_after_shortcuts(captions, p, *, generator=None):
    if p in (0.0, 1.0):
        return du.drop_captions(captions, p, generator=generator)
    return drop_with(drop="u >= p")(captions, p, generator=generator)


def drop_filtered(captions, p, *, generator=None):
    return [c for c in du.drop_captions(captions, p, generator=generator) if c]


def drop_shuffled(captions, p, *, generator=None):
    out = du.drop_captions(captions, p, generator=generator)
    random.shuffle(out)
    return out


def drop_in_place(captions, p, *, generator=None):
    drop = torch.rand(len(captions), generator=generator) < p
    for i in drop.nonzero().flatten().tolist():
        captions[i] = ""
    return captions


def drop_no_generator_keyword(captions, p):
    return ["" if random.random() < p else c for c in captions]


def drop_bernoulli(captions, p, *, generator=None):
    drop = torch.bernoulli(torch.full((len(captions),), float(p)), generator=generator)
    return ["" if d else c for c, d in zip(captions, drop.bool().tolist())]


def drop_loop(captions, p, *, generator=None):
    out = []
    for caption in captions:
        u = torch.rand((), generator=generator).item()
        out.append(caption if u >= p else "")
    return out


def drop_python_random(captions, p, *, generator=None):
    """Python's random without a generator, the torch.Generator when one is given."""
    if generator is None:
        return [c if random.random() >= p else "" for c in captions]
    keep = torch.rand(len(captions), generator=generator) >= p
    return [c if k else "" for c, k in zip(captions, keep)]


DROP_MISTAKES = [
    ("inverted", drop_with(drop="u >= p"), "p = 0 keeps them all (drop = u < p, not u >= p)"),
    ("inverted_after_shortcuts", drop_inverted_after_shortcuts,
     "kept with probability p instead of dropped"),
    ("one_decision_per_call", drop_with(decide="call"), "one decision was made for the whole list"),
    ("first_ones", drop_with(decide="first"), "the dropped captions are not spread"),
    ("exact_count", drop_with(decide="exact"), "dropped exactly 4 of 8 captions in each"),
    ("fixed_seed", drop_with(seed=0), "dropped the same captions in two calls"),
    ("none", drop_with(fill=None), "a dropped caption became None"),
    ("pad", drop_with(fill="<pad>"), "'<pad>' is a token, not a caption"),
    ("space", drop_with(fill=" "), "white space is not the empty caption"),
    ("null_word", drop_with(fill="null"), "the dropped captions became 'null'"),
    ("filtered_out", drop_filtered, "the dropped captions were left out of the list"),
    ("shuffled", drop_shuffled, "the captions were moved (shuffled or reordered)"),
    ("generator_ignored", drop_with(use_generator=False),
     "two generators with the same seed dropped different captions"),
    ("fixed_generator", drop_with(fixed_generator=True),
     "generators with different seeds dropped the same captions"),
    ("no_generator_keyword", drop_no_generator_keyword, "does not accept the `generator` keyword"),
    ("tuple", lambda captions, p, **kw: tuple(du.drop_captions(captions, p, **kw)),
     "should be a list of 6 str (list[str]), got tuple — wrap it in list(...)"),
    ("numpy", lambda captions, p, **kw: np.array(du.drop_captions(captions, p, **kw)),
     "return a Python list of str (`.tolist()`)"),
    ("generator_expression", lambda captions, p, **kw: (c for c in captions),
     "wrap it in list(...)"),
    ("in_place", drop_in_place, f"input `captions` {IN_PLACE}"),
    ("no_return", lambda captions, p, **kw: None, "did you forget the `return`"),
]
DROP_RIGHT = [("library_like", drop_with()), ("bernoulli", drop_bernoulli),
              ("loop", drop_loop), ("python_random", drop_python_random)]


# -- cfg_eps --


def cfg_with(form):
    def cfg_eps(eps_uncond, eps_cond, scale):
        u, c, s = eps_uncond, eps_cond, scale
        return {"scale_cond_only": lambda: u + s * c, "swapped": lambda: c + s * (u - c),
                "w_plus_one": lambda: c + s * (c - u), "one_plus_s": lambda: u + (1 + s) * (c - u),
                "s_minus_one": lambda: u + (s - 1) * (c - u), "sign": lambda: u - s * (c - u),
                "average": lambda: (u + c) / 2, "cond": lambda: c, "uncond": lambda: u,
                "no_base": lambda: s * (c - u), "s_times_cond": lambda: s * c,
                "s_squared": lambda: u + s ** 2 * (c - u)}[form]()
    return cfg_eps


def cfg_lerp(eps_uncond, eps_cond, scale):
    return torch.lerp(eps_uncond, eps_cond, scale)


def cfg_weights(eps_uncond, eps_cond, scale):
    return (1 - scale) * eps_uncond + scale * eps_cond


def cfg_float64(eps_uncond, eps_cond, scale):
    u, c = eps_uncond.double(), eps_cond.double()
    return (u + scale * (c - u)).to(eps_cond.dtype)


def cfg_add_alpha(eps_uncond, eps_cond, scale):
    return eps_uncond.add(eps_cond.sub(eps_uncond), alpha=scale)


def cfg_in_place(eps_uncond, eps_cond, scale):
    eps_uncond += scale * (eps_cond - eps_uncond)
    return eps_uncond


def cfg_cpu_scale(eps_uncond, eps_cond, scale):
    return eps_uncond + torch.full(eps_cond.shape, scale) * (eps_cond - eps_uncond)


CFG_MISTAKES = [
    ("scale_cond_only", cfg_with("scale_cond_only"), "the scale multiplies eps_cond alone"),
    ("swapped", cfg_with("swapped"), "eps_uncond and eps_cond are swapped"),
    ("w_plus_one", cfg_with("w_plus_one"), "this is the \"w + 1\" form of Ho & Salimans 2022"),
    ("one_plus_s", cfg_with("one_plus_s"), "this is the \"w + 1\" form of Ho & Salimans 2022"),
    ("s_minus_one", cfg_with("s_minus_one"), "converted to Ho & Salimans' w = s − 1"),
    ("sign", cfg_with("sign"), "the difference points the wrong way"),
    ("average", cfg_with("average"), "this is the average of the two estimates"),
    ("cond", cfg_with("cond"), "this is eps_cond unchanged"),
    ("uncond", cfg_with("uncond"), "this is eps_uncond unchanged"),
    ("no_base", cfg_with("no_base"), "the starting point ε_∅ is missing"),
    ("s_times_cond", cfg_with("s_times_cond"), "this is s · ε_c"),
    ("s_squared", cfg_with("s_squared"), "the scale is applied twice (s²)"),
    ("scale_zero", lambda u, c, s: du.cfg_eps(u, c, s or 0.1),
     "with scale 0 the result is eps_uncond itself"),
    ("scale_one", lambda u, c, s: du.cfg_eps(u, c, 1.1 if s == 1 else s),
     "with scale 1 the result is eps_cond itself"),
    ("stacked", lambda u, c, s: torch.stack([u, du.cfg_eps(u, c, s)]),
     "combine the two estimates entry by entry (no torch.cat or torch.stack)"),
    ("float64", double_of(du.cfg_eps), "should have dtype torch.float32"),
    ("in_place", cfg_in_place, f"input `eps_uncond` {IN_PLACE}"),
    ("cpu_scale", cfg_cpu_scale, DEVICE),
    ("nan", nan_of(du.cfg_eps), NAN),
    ("no_return", lambda u, c, s: None, "did you forget the `return`"),
]
CFG_RIGHT = [("lerp", cfg_lerp), ("weights", cfg_weights), ("float64", cfg_float64),
             ("add_alpha", cfg_add_alpha)]


# -- img2img_start --


def img2img_with(*, keep="last", count="int", start="first", noise="q_sample", t_as="full",
                 empty="x0", returns="pair"):
    """A learner's img2img_start with one knob turned."""
    def img2img_start(x0, strength, timesteps, schedule, eps):
        S, B = len(timesteps), len(x0)
        k = {"int": int(S * strength), "round": round(S * strength),
             "ceil": math.ceil(S * strength), "plus_one": int(S * strength) + 1,
             "minus_one": max(int(S * strength) - 1, 0),
             "one_minus": S - int(S * (1 - strength))}[count]
        k = min(k, S)
        kept = {"last": lambda: timesteps[S - k:], "first": lambda: timesteps[:k],
                "minus_k": lambda: timesteps[-k:], "skipped": lambda: timesteps[:S - k],
                "ascending": lambda: timesteps[S - k:].flip(0)}[keep]()
        if len(kept) == 0 and empty == "x0":
            return (x0.clone(), kept) if returns == "pair" else x0.clone()
        if len(kept) == 0 and empty == "last_step":
            t_value = int(timesteps[-1])
        else:
            t_value = {"first": lambda: int(kept[0]), "timesteps0": lambda: int(timesteps[0]),
                       "index": lambda: S - k, "last": lambda: int(kept[-1]),
                       "before": lambda: int(timesteps[max(S - k - 1, 0)])}[start]()
        t = {"full": lambda: torch.full((B,), t_value, device=x0.device, dtype=torch.long),
             "one": lambda: torch.tensor([t_value], device=x0.device),
             "float": lambda: torch.full((B,), float(t_value), device=x0.device)}[t_as]()
        x_t = {"q_sample": lambda: du.q_sample(x0, t, eps, schedule),
               "clean": lambda: x0, "eps": lambda: eps,
               "cpu_zeros": lambda: du.q_sample(x0, t, eps, schedule) + torch.zeros(x0.shape),
               "swapped": lambda: du.q_sample(eps, t, x0, schedule),
               "no_sqrt": lambda: (du.extract(schedule.alpha_bars, t, x0.shape) * x0
                                   + (1 - du.extract(schedule.alpha_bars, t, x0.shape)) * eps),
               }[noise]()
        return {"pair": (x_t, kept), "x_t": x_t, "reversed": (kept, x_t),
                "count": (x_t, len(kept)), "none": (x_t, None)}[returns]
    return img2img_start


def img2img_diffusers(x0, strength, timesteps, schedule, eps):
    """As diffusers' img2img pipeline: t_start = max(S - init_timestep, 0); ᾱ read by hand."""
    S = len(timesteps)
    init_timestep = min(int(S * strength), S)
    kept = timesteps[max(S - init_timestep, 0):]
    if init_timestep == 0:
        return x0, kept                                # x0 itself: nothing to do
    t = kept[:1].repeat(len(x0))
    a = schedule.alpha_bars[t].view(-1, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * eps, kept


def img2img_list_float64(x0, strength, timesteps, schedule, eps):
    """The kept timesteps as a Python list; a scalar ᾱ in float64."""
    values = timesteps.tolist()
    k = int(strength * len(values))
    kept = values[len(values) - k:]
    if not kept:
        return x0.clone(), kept
    a = schedule.alpha_bars.double()[kept[0]]
    return (a.sqrt() * x0.double() + (1 - a).sqrt() * eps.double()).to(x0.dtype), kept


def img2img_in_place(x0, strength, timesteps, schedule, eps):
    x_t, kept = du.img2img_start(x0, strength, timesteps, schedule, eps)
    return x0.copy_(x_t), kept


IMG2IMG_MISTAKES = [
    ("first_k", img2img_with(keep="first"), "these are the first k timesteps, the noisiest"),
    ("minus_k_slice", img2img_with(keep="minus_k"), "timesteps[-k:] with k = 0 is"),
    ("ascending", img2img_with(keep="ascending"), "in ascending order"),
    ("skipped_ones", img2img_with(keep="skipped"), "these are the timesteps to skip"),
    ("plus_one", img2img_with(count="plus_one"), "one step too many (off by one"),
    ("minus_one", img2img_with(count="minus_one"), "one step too few (off by one"),
    ("round", img2img_with(count="round"), "was rounded to the nearest or up (round, math.ceil)"),
    ("ceil", img2img_with(count="ceil"), "was rounded up (math.ceil, or S − int(S * (1 − "),
    ("one_minus_strength", img2img_with(count="one_minus"),
     "was rounded up (math.ceil, or S − int(S * (1 − strength)))"),
    ("noised_to_timesteps0", img2img_with(start="timesteps0"),
     "noised to timesteps[0] = 999, the noisiest, whatever the strength"),
    ("noised_to_index", img2img_with(start="index"), "the index S − k of the first kept timestep"),
    ("noised_to_last", img2img_with(start="last"), "noised to the last kept timestep"),
    ("noised_one_before", img2img_with(start="before"),
     "the step before the first kept one (off by one)"),
    ("clean_x0", img2img_with(noise="clean"), "x_t is the clean x0: it was not noised"),
    ("pure_noise", img2img_with(noise="eps"), "x_t is eps, pure noise"),
    ("swapped", img2img_with(noise="swapped"), "x0 and eps are swapped"),
    ("no_sqrt", img2img_with(noise="no_sqrt"), "the square roots are missing"),
    ("t_of_one", img2img_with(t_as="one"), "q_sample takes one timestep per image"),
    ("t_float", img2img_with(t_as="float"), "q_sample takes one timestep per image"),
    ("no_empty_case", img2img_with(empty="index"), "there is no kept[0]"),
    ("noised_when_nothing_kept", img2img_with(empty="last_step"),
     "x_t is x0 itself (a copy), not noised"),
    ("x_t_only", img2img_with(returns="x_t"), "return two things, (x_t, kept timesteps)"),
    ("reversed_pair", img2img_with(returns="reversed"), "the pair is the wrong way round"),
    ("count", img2img_with(returns="count"), "the second item is one number (30)"),
    ("none_kept", img2img_with(returns="none"), "the kept timesteps are None"),
    ("float64", lambda *args: (du.img2img_start(*args)[0].double(), du.img2img_start(*args)[1]),
     "should have dtype torch.float32"),
    ("in_place", img2img_in_place, f"input `x0` {IN_PLACE}"),
    ("cpu_zeros", img2img_with(noise="cpu_zeros"), DEVICE),
    ("nan", lambda *args: (du.img2img_start(*args)[0] * math.nan, du.img2img_start(*args)[1]),
     NAN),
    ("no_return", lambda *args: None, "did you forget the `return`"),
]
IMG2IMG_RIGHT = [("diffusers_like", img2img_diffusers), ("list_float64", img2img_list_float64),
                 ("library_like", img2img_with())]


# -- inpaint_blend --


def blend_with(*, step=0, end="known", noise="eps", combine="blend", channels="all",
               no_end_case=False):
    """A learner's inpaint_blend with one knob turned."""
    def inpaint_blend(x, known, keep, t, schedule, eps):
        T = schedule.T
        s = t + step
        if no_end_case:
            a = du.extract(schedule.alpha_bars, s, x.shape)
        elif end == "wrap":
            a = schedule.alpha_bars[s].view(-1, 1, 1, 1)          # -1 reads the last value
        else:
            a = du.extract(schedule.alpha_bars, s.clamp(0, T - 1), x.shape)
        z = {"eps": eps, "x": x, "fresh": torch.randn_like(x)}[noise]
        known_t = a.sqrt() * known + (1 - a).sqrt() * z
        if end == "known" and not no_end_case:
            known_t = torch.where((s < 0).view(-1, 1, 1, 1), known, known_t)
        if combine == "clean":
            known_t = known
        if channels == "first":
            out = x.clone()
            out[:, :1] = (keep * known_t + (1 - keep) * x)[:, :1]
            return out
        if channels == "squeezed":
            keep = keep[:, 0]
        return {"blend": lambda: keep * known_t + (1 - keep) * x,
                "clean": lambda: keep * known_t + (1 - keep) * x,
                "swapped": lambda: keep * x + (1 - keep) * known_t,
                "x_whole": lambda: keep * known_t + x,
                "x_missing": lambda: keep * known_t}[combine]()
    return inpaint_blend


def blend_where(x, known, keep, t, schedule, eps):
    known_t = du.q_sample(known, t.clamp(min=0), eps, schedule)
    known_t = torch.where(t.view(-1, 1, 1, 1) < 0, known, known_t)
    return torch.where(keep.bool(), known_t, x)


def blend_lerp(x, known, keep, t, schedule, eps):
    known_t = du.q_sample(known, t.clamp(min=0), eps, schedule)
    done = (t < 0).to(x.dtype).view(-1, 1, 1, 1)
    return torch.lerp(x, torch.lerp(known_t, known, done), keep)


def blend_loop_float64(x, known, keep, t, schedule, eps):
    """One image at a time, ᾱ_t as a Python float in float64."""
    out = []
    for i in range(len(x)):
        m = keep[i] if len(keep) > 1 else keep[0]
        step = int(t[i])
        if step < 0:
            known_i = known[i].double()
        else:
            a = float(schedule.alpha_bars.double()[step])
            known_i = math.sqrt(a) * known[i].double() + math.sqrt(1 - a) * eps[i].double()
        out.append((m * known_i + (1 - m) * x[i].double()).to(x.dtype))
    return torch.stack(out)


def blend_in_place(x, known, keep, t, schedule, eps):
    out = du.inpaint_blend(x, known, keep, t, schedule, eps)
    return x.copy_(out)


def blend_cpu_ones(x, known, keep, t, schedule, eps):
    out = du.inpaint_blend(x, known, keep, t, schedule, eps)
    return out * torch.ones(out.shape)


BLEND_MISTAKES = [
    ("swapped", blend_with(combine="swapped"), "keep and repaint are swapped"),
    ("known_clean", blend_with(combine="clean"), "the known region was put back clean"),
    ("t_plus_one", blend_with(step=1), "known was noised one step too far (t + 1)"),
    ("t_minus_one", blend_with(step=-1), "known was noised one step too little (t − 1)"),
    ("end_noised", blend_with(end="t0"), "at t = -1 (the sampler has reached the clean end) "
                                         "known was still noised, to t = 0"),
    ("end_wraps", blend_with(end="wrap"), "alpha_bars[-1] was read, the last and noisiest step"),
    ("end_refused", blend_with(no_end_case=True), "t = -1 means the sampler has reached the "
                                                  "clean end: use known itself there"),
    ("noise_of_x", blend_with(noise="x"), "known was noised with x instead of eps"),
    ("fresh_noise", blend_with(noise="fresh"), "the known region holds fresh noise"),
    ("first_channel", blend_with(channels="first"), "only the first channel was blended"),
    ("mask_squeezed", blend_with(channels="squeezed"),
     "keep broadcasts against x as it is, (1, 1, H, W) or (B, 1, H, W)"),
    ("x_whole", blend_with(combine="x_whole"), "x was added whole"),
    ("x_missing", blend_with(combine="x_missing"), "the region to repaint is zero"),
    ("float64", double_of(du.inpaint_blend), "should have dtype torch.float32"),
    ("in_place", blend_in_place, f"input `x` {IN_PLACE}"),
    ("cpu_ones", blend_cpu_ones, DEVICE),
    ("nan", nan_of(du.inpaint_blend), NAN),
    ("no_return", lambda *args: None, "did you forget the `return`"),
]
BLEND_RIGHT = [("where", blend_where), ("lerp", blend_lerp), ("loop_float64", blend_loop_float64),
               ("library_like", blend_with())]


# ── the tests ──

CHECKS = {
    "drop_captions": (dc.check_drop_captions, du.drop_captions),
    "cfg_eps": (dc.check_cfg_eps, du.cfg_eps),
    "img2img_start": (dc.check_img2img_start, du.img2img_start),
    "inpaint_blend": (dc.check_inpaint_blend, du.inpaint_blend),
}
MISTAKES = {"drop_captions": DROP_MISTAKES, "cfg_eps": CFG_MISTAKES,
            "img2img_start": IMG2IMG_MISTAKES, "inpaint_blend": BLEND_MISTAKES}
RIGHT = {"drop_captions": DROP_RIGHT, "cfg_eps": CFG_RIGHT, "img2img_start": IMG2IMG_RIGHT,
         "inpaint_blend": BLEND_RIGHT}


(test_reference_passes, test_stub_is_not_attempted, test_right_versions_in_other_forms_pass,
 test_planted_mistakes_fail_with_their_hint) = table_tests(CHECKS, RIGHT, MISTAKES)


def test_exercise_names_match_the_notebook_headings():
    assert [check.exercise for check, _ in CHECKS.values()] == [
        "Exercise 1 · Caption dropout",
        "Exercise 2 · Classifier-free guidance: the guided noise estimate",
        "Exercise 3 · Image-to-image: where to start",
        "Exercise 4 · Inpainting: putting the known region back"]


def test_every_check_has_in_place_and_two_right_forms_and_the_tensor_ones_device_and_nan():
    for name in CHECKS:
        hints = [hint for _, _, hint in MISTAKES[name]]
        assert any(IN_PLACE in hint for hint in hints)
        assert len(RIGHT[name]) >= 2
        if name != "drop_captions":
            assert DEVICE in hints and NAN in hints


@pytest.mark.parametrize("name", CHECKS)
def test_the_check_leaves_the_notebooks_random_numbers_alone(name):
    check, reference = CHECKS[name]
    torch.manual_seed(123)
    random.seed(123)
    expected = (torch.rand(3), random.random())
    torch.manual_seed(123)
    random.seed(123)
    assert check(reference) is True
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]
