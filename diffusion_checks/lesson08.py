"""Checks of lesson 08's exercises (classifier-free guidance and a miniature Stable Diffusion).

``cfg_eps``, ``img2img_start`` and ``inpaint_blend`` are compared with the library's
(``du.cfg_eps``, ``du.img2img_start``, ``du.inpaint_blend``) on several batches, schedules,
guidance scales, strengths (chosen where rounding down, rounding and rounding up keep
different numbers of steps) and timesteps (t = -1, the clean end, included); the usual
mistakes are recomputed to name them. Their randomness (``eps``) is passed in.

``drop_captions`` draws its own random numbers, so its check measures what every right answer
does and never replays a seed: a list of one string per caption, each the caption itself or
the empty caption ``""``; none dropped with p = 0, all with p = 1, about a fraction p
otherwise, decided caption by caption and afresh on every call. It may draw in any way
(``torch.rand``, ``torch.bernoulli``, Python's ``random``) when no generator is given; when a
``torch.Generator`` is given it must draw with it, so that two equally seeded generators drop
the same captions.
"""
from __future__ import annotations

import functools
import math
import random

import numpy as np
import torch
from torch import Tensor

import diffusion_utilities as du

from ._core import (BROADCAST_HINT, call, call_pure, close, compare, exercise_check,
                    expect_tensor, fail, largest_difference, probe_device)


def _own_random_state(body):
    """Run a check's ``body`` with PyTorch's, Python's and NumPy's global random states
    seeded, and put the notebook's states back afterwards."""

    @functools.wraps(body)
    def wrapped(*args, **kwargs):
        python_state, numpy_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(80)      # the CPU's generator only
                random.seed(80)
                np.random.seed(80)
                return body(*args, **kwargs)
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)

    return wrapped


def _short(values) -> str:
    v = [int(i) for i in values]
    return str(v) if len(v) <= 8 else f"[{v[0]}, {v[1]}, {v[2]}, ..., {v[-2]}, {v[-1]}]"


# ── Exercise 1 · Caption dropout ─────────────────────────────────────────────────────

_WORDS = (("small", "large"), ("red", "green", "blue", "yellow", "purple", "orange"),
          ("circle", "square", "triangle", "star", "cross", "heart"))
_USE_GENERATOR = ("draw with it: torch.rand(len(captions), generator=generator) < p "
                  "(generator=None draws from PyTorch's global generator)")


def _captions(n: int) -> list[str]:
    """``n`` different captions: "a small red circle, picture 0", ..."""
    size, colour, shape = _WORDS
    return [f"a {size[i % 2]} {colour[i % 6]} {shape[(i // 6) % 6]}, picture {i}"
            for i in range(n)]


def _drop_call(fn, captions: list[str], p: float, *, what: str, **kwargs) -> list:
    """Call the learner's drop_captions on a copy; fail if it changed the list."""
    given = list(captions)
    try:
        out = call(fn, given, p, **kwargs)
    except TypeError as err:
        if "generator" not in str(err):
            raise
        fail("drop_captions does not accept the `generator` keyword: keep `*, generator=None` "
             f"in its signature and, when a generator is given, {_USE_GENERATOR} "
             f"(Python said: {err})")
    if given != captions:
        fail("your code changed its input `captions` in place (an in-place operation such as "
             "`captions[i] = ...`, `.pop(...)`, `.append(...)` or `random.shuffle` on it): "
             "leave the list as it is and build a new one, e.g. "
             "`['' if d else c for c, d in zip(captions, drop)]`")
    return out


def _expect_list(out, captions: list[str], *, what: str) -> list:
    """Check ``out`` is a list with one string per caption."""
    n = len(captions)
    if out is None:
        fail(f"{what} is None — did you forget the `return` statement?")
    if isinstance(out, str):
        fail(f"{what} is one string; return a list with one caption per input caption")
    if isinstance(out, np.ndarray):
        fail(f"{what} is a NumPy array; return a Python list of str (`.tolist()`)")
    if not isinstance(out, list):
        fail(f"{what} should be a list of {n} str (list[str]), got {type(out).__name__}"
             + (" — wrap it in list(...)" if isinstance(out, (tuple, map, filter))
                or hasattr(out, "__next__") else ""))
    if len(out) != n:
        if len(out) < n and all(isinstance(o, str) and o in captions for o in out):
            fail(f"{what} has {len(out)} captions for {n} images: the dropped captions were "
                 "left out of the list — replace each by the empty caption '' instead, so "
                 "that every caption stays with its image")
        fail(f"{what} should have one caption per input caption, {n}, got {len(out)}")
    return out


def _dropped(out, captions: list[str], *, what: str) -> list[bool]:
    """Which captions were dropped; fails unless each item is its caption or ""."""
    out = _expect_list(out, captions, what=what)
    dropped = []
    for i, (o, c) in enumerate(zip(out, captions)):
        if isinstance(o, str) and o == c:
            dropped.append(False)
        elif isinstance(o, str) and o == "":
            dropped.append(True)
        elif o is None:
            fail(f"{what}: a dropped caption became None (item {i}) — the null prompt ∅ is the "
                 "empty caption '' (a str the text encoder can read), not None")
        elif not isinstance(o, str):
            fail(f"{what}: item {i} is a {type(o).__name__}, not a str — return the captions "
                 "themselves, each kept as it is or replaced by ''")
        elif o in captions:
            fail(f"{what}: item {i} is the caption of item {captions.index(o)} — the captions "
                 "were moved (shuffled or reordered): a kept caption stays at its own index, "
                 "with its own image")
        elif o.strip() == "":
            fail(f"{what}: a dropped caption became {o!r} (item {i}) — white space is not the "
                 "empty caption: the null prompt ∅ is ''")
        elif all(x == o or x == c for x, c in zip(out, captions)):
            extra = (" ('<pad>' is a token, not a caption: the text encoder pads '' itself)"
                     if "pad" in o.lower() else "")
            fail(f"{what}: the dropped captions became {o!r}{extra} — the null prompt ∅ is the "
                 "empty caption ''")
        else:
            fail(f"{what}: item {i} is {o!r}, which is neither its caption {c!r} nor the empty "
                 "caption '' — keep each caption exactly as it is, or replace it by ''")
    return dropped


def _check_fraction(dropped: list[bool], p: float, *, what: str) -> None:
    """About a fraction p of the captions dropped (5 standard deviations), in each half too."""
    n = len(dropped)
    share = sum(dropped) / n
    tolerance = 5 * math.sqrt(p * (1 - p) / n)
    if share in (0.0, 1.0):
        fail(f"{what}: {'every' if share else 'no'} caption was dropped with p = {p}: one "
             "decision was made for the whole list — decide each caption on its own, "
             "drop = torch.rand(len(captions)) < p")
    if abs(share - (1 - p)) <= tolerance < abs(share - p):
        fail(f"{what}: {share:.1%} of the captions were dropped with p = {p}: the captions "
             "are kept with probability p instead of dropped — drop a caption when its "
             "number is below p (drop = u < p)")
    if abs(share - p) > tolerance:
        fail(f"{what}: {share:.1%} of the {n} captions were dropped; with p = {p} about "
             f"{p:.0%} (± {tolerance:.1%}) should be — drop each caption with probability p: "
             "torch.rand(len(captions)) < p")
    halves = [sum(half) / len(half) for half in (dropped[:n // 2], dropped[n // 2:])]
    tolerance = 5 * math.sqrt(p * (1 - p) / (n // 2))
    if any(abs(h - p) > tolerance for h in halves):
        fail(f"{what}: the dropped captions are not spread over the list ({halves[0]:.1%} of "
             f"the first half, {halves[1]:.1%} of the second, for p = {p}) — decide each "
             "caption on its own, torch.rand(len(captions)) < p, not a block of them")


@exercise_check("Exercise 1 · Caption dropout")
@_own_random_state
def check_drop_captions(fn) -> str:
    """Check ``drop_captions(captions, p, *, generator=None) -> list[str]``."""
    small = _captions(6)
    what = "drop_captions(captions, p=0)"
    dropped = _dropped(_drop_call(fn, small, 0.0, what=what), small, what=what)
    if all(dropped):
        fail(f"{what} dropped every caption: a caption is dropped with probability p, so "
             "p = 0 keeps them all (drop = u < p, not u >= p)")
    if any(dropped):
        fail(f"{what} dropped {sum(dropped)} of {len(small)} captions: with p = 0 every "
             "caption is kept")
    what = "drop_captions(captions, p=1)"
    dropped = _dropped(_drop_call(fn, small, 1.0, what=what), small, what=what)
    if not any(dropped):
        fail(f"{what} kept every caption: with p = 1 every caption becomes '' "
             "(drop = u < p, not u >= p)")
    if not all(dropped):
        fail(f"{what} kept {len(small) - sum(dropped)} of {len(small)} captions: with p = 1 "
             "every caption becomes ''")
    out = _drop_call(fn, [], 0.5, what="drop_captions([], p=0.5)")
    _expect_list(out, [], what="drop_captions([], p=0.5)")

    big, p = _captions(4000), 0.3
    masks = []
    for _ in range(3):
        what = f"drop_captions(captions, p={p}) on {len(big)} captions"
        dropped = _dropped(_drop_call(fn, big, p, what=what), big, what=what)
        _check_fraction(dropped, p, what=what)
        masks.append(dropped)
    if masks[0] == masks[1] or masks[1] == masks[2]:
        fail(f"drop_captions(captions, p={p}) dropped the same captions in two calls: draw "
             "fresh random numbers on every call (no fixed seed inside)")

    eight, counts = _captions(8), []
    for _ in range(200):
        what = "drop_captions(captions, p=0.5) on 8 captions"
        counts.append(sum(_dropped(_drop_call(fn, eight, 0.5, what=what), eight, what=what)))
    if set(counts) <= {0, 8}:
        fail("drop_captions(captions, p=0.5) on 8 captions dropped all or none of them in each "
             "of 200 calls: one decision was made per call — decide each caption on its own, "
             "drop = torch.rand(len(captions)) < p")
    if len(set(counts)) == 1:
        fail(f"drop_captions(captions, p=0.5) dropped exactly {counts[0]} of 8 captions in each "
             "of 200 calls: decide each caption on its own, torch.rand(len(captions)) < p, so "
             "that the number dropped varies from call to call")
    if not 2.5 < sum(counts) / len(counts) < 5.5:
        fail(f"drop_captions(captions, p=0.5) on 8 captions dropped {sum(counts) / 200:.2f} "
             "on average over 200 calls, not about 4")

    some = _captions(200)
    what = "drop_captions(captions, p=0.5, generator=...)"
    same = [_dropped(_drop_call(fn, some, 0.5, what=what,
                                generator=torch.Generator().manual_seed(seed)), some, what=what)
            for seed in (81, 81, 82)]
    if same[0] != same[1]:
        fail(f"{what}: two generators with the same seed dropped different captions — when a "
             f"generator is given, {_USE_GENERATOR}")
    if same[0] == same[2]:
        fail(f"{what}: generators with different seeds dropped the same captions — when a "
             f"generator is given, {_USE_GENERATOR}")
    return ("each caption replaced by '' with probability p, independently, the others kept in "
            "place; fresh draws each call, reproducible with a generator")


# ── Exercise 2 · Classifier-free guidance: the guided noise estimate ──────────────────

_CFG_RULE = "ε̂ = ε_∅ + s (ε_c − ε_∅), i.e. eps_uncond + scale * (eps_cond - eps_uncond)"


def _cfg_mistakes(u: Tensor, c: Tensor, s: float) -> dict[str, Tensor]:
    """The ε̂ that the usual mistakes give (in float64, then the inputs' dtype)."""
    u64, c64 = u.double(), c.double()
    mistakes = {
        "the scale multiplies eps_cond alone (ε_∅ + s ε_c): it multiplies the difference, "
        f"{_CFG_RULE}": u64 + s * c64,
        "eps_uncond and eps_cond are swapped (ε_c + s (ε_∅ − ε_c)): guidance starts from the "
        f"unconditional estimate and moves towards the conditional one, {_CFG_RULE}":
            c64 + s * (u64 - c64),
        "this is the \"w + 1\" form of Ho & Salimans 2022, (1 + w) ε_c − w ε_∅ = ε_c + w (ε_c − "
        "ε_∅), with w = scale: it guides one step further than asked. The course uses Stable "
        f"Diffusion's form, {_CFG_RULE}, where s = w + 1 (scale 1 is the plain conditional "
        "estimate)": c64 + s * (c64 - u64),
        "the scale was converted to Ho & Salimans' w = s − 1 (ε_∅ + (s − 1)(ε_c − ε_∅)): the "
        f"course's scale needs no conversion, {_CFG_RULE}": u64 + (s - 1) * (c64 - u64),
        "the difference points the wrong way (ε_∅ − ε_c): guidance pushes towards the "
        f"caption, {_CFG_RULE}": u64 + s * (u64 - c64),
        "this is the average of the two estimates: the scale s decides how far to go, "
        f"{_CFG_RULE}": (u64 + c64) / 2,
        "this is eps_cond unchanged: guidance combines both estimates, " + _CFG_RULE: c64,
        "this is eps_uncond unchanged: guidance combines both estimates, " + _CFG_RULE: u64,
        "the starting point ε_∅ is missing (only s (ε_c − ε_∅)): " + _CFG_RULE: s * (c64 - u64),
        "this is s · ε_c: the unconditional estimate must enter too, " + _CFG_RULE: s * c64,
        "the scale is applied twice (s²): " + _CFG_RULE: u64 + s * s * (c64 - u64),
    }
    return {hint: value.to(u.dtype) for hint, value in mistakes.items()}


def _cfg_cases():
    """(eps_uncond, eps_cond, scale, description): latents, images and points; the scales 0
    and 1 (the two estimates themselves) after scales that tell the mistakes apart."""
    g = torch.Generator().manual_seed(82)
    cases = []
    for shape, scale, dtype in [((2, 4, 8, 8), 4.0, torch.float32),
                                ((3, 3, 6, 5), 7.5, torch.float32),
                                ((5, 2), 3.0, torch.float32),
                                ((2, 4, 8, 8), 0.0, torch.float32),
                                ((2, 4, 8, 8), 1.0, torch.float32),
                                ((2, 4, 8, 8), 2.5, torch.float64)]:
        u = torch.randn(shape, generator=g).to(dtype)
        c = torch.randn(shape, generator=g).to(dtype)
        description = (f"shape {tuple(shape)}, scale = {scale:g}"
                       + (", float64" if dtype == torch.float64 else ""))
        cases.append((u, c, scale, description))
    return cases


def _call_tensors(fn, *args, names: tuple[str, ...], what: str, hints=(),
                  shapes: str = BROADCAST_HINT, **kwargs):
    """:func:`call_pure`, turning ``hints`` (pairs of words in an error message and what to
    say) and shape errors (``shapes``: what to say then) into hints."""
    try:
        return call_pure(fn, *args, names=names, **kwargs)
    except (RuntimeError, ValueError, IndexError) as err:
        text = str(err)
        first = text.splitlines()[0] if text else type(err).__name__
        for words, hint in hints:
            if words in text:
                fail(f"{what}: {hint} ({type(err).__name__}: {first})")
        if isinstance(err, RuntimeError) and ("size of tensor" in text or "broadcast" in text):
            fail(f"{what}: shapes do not fit ({first}) — {shapes}")
        raise


@exercise_check("Exercise 2 · Classifier-free guidance: the guided noise estimate")
def check_cfg_eps(fn) -> str:
    """Check ``cfg_eps(eps_uncond, eps_cond, scale)``."""
    names = ("eps_uncond", "eps_cond", "scale")
    cases = _cfg_cases()
    for u, c, scale, description in cases:
        what = f"ε̂ ({description})"
        expected = du.cfg_eps(u, c, scale)                  # the reference, before yours
        mistakes = _cfg_mistakes(u, c, scale)
        out = _call_tensors(fn, u.clone(), c.clone(), scale, names=names, what=what)
        out = expect_tensor(out, shape=u.shape, dtype=u.dtype, what=what,
                            shape_hint="ε̂ has the shape of eps_cond: combine the two estimates "
                                       "entry by entry (no torch.cat or torch.stack)")
        hint = {0.0: "with scale 0 the result is eps_uncond itself (the unconditional "
                     "estimate): " + _CFG_RULE,
                1.0: "with scale 1 the result is eps_cond itself (the conditional estimate): "
                     + _CFG_RULE}.get(scale, _CFG_RULE + ", linear in the scale")
        compare(out, expected, mistakes, what=what, term_hint=hint)
    u, c, scale, _ = cases[0]
    probe_device(fn, u, c, scale, what="cfg_eps")
    return (f"{_CFG_RULE}: scale 0 gives ε_∅, scale 1 gives ε_c, larger scales go beyond it; "
            "float32 and float64")


# ── Exercise 3 · Image-to-image: where to start ──────────────────────────────────────

_KEEP_RULE = ("of the S timesteps keep the last k = int(S * strength) (rounded down), "
              "timesteps[S - k:]")
_T_SHAPE = ("q_sample takes one timestep per image, t of shape (B,) and dtype long: "
            "torch.full((B,), int(kept[0]), dtype=torch.long, device=x0.device)")


def _img2img_cases():
    """(x0, strength, timesteps, schedule, eps, description): S = 50, 10 and 25 steps, with
    strengths where int, round and ceil of S * strength differ, and strengths keeping nothing."""
    g = torch.Generator().manual_seed(83)
    linear = (du.NoiseSchedule.create("linear", 1000), "linear", 1000)
    cosine = (du.NoiseSchedule.create("cosine", 50), "cosine", 50)
    cases = []
    for (schedule, kind, T), S, strength, shape, spacing in [
            (linear, 50, 0.6, (2, 4, 8, 8), "trailing"),   # k = 30: S * strength an integer
            (linear, 10, 1.0, (2, 4, 8, 8), "trailing"),   # k = 10: every step, from t = 999
            (linear, 10, 0.222, (3, 3, 6, 5), "leading"),  # 2.22: int 2, round 2, ceil 3
            (cosine, 25, 0.55, (2, 4, 8, 8), "trailing"),  # 13.75: int 13, round and ceil 14
            (linear, 25, 0.0, (2, 4, 8, 8), "trailing"),   # no step kept
            (linear, 10, 0.05, (2, 4, 8, 8), "trailing")]:  # 0.5: int 0 keeps no step either
        timesteps = du.ddim_timesteps(T, S, spacing=spacing)
        x0 = torch.rand(shape, generator=g) * 2 - 1
        eps = torch.randn(shape, generator=g)
        description = (f"strength = {strength:g}, S = {S} timesteps ({spacing}) of a {kind} "
                       f"schedule with T = {T}, x0 {tuple(shape)}")
        cases.append((x0, strength, timesteps, schedule, eps, description))
    return cases


def _as_timesteps(kept, *, what: str) -> Tensor:
    """The kept timesteps as a 1-D long tensor (from a tensor, list, tuple or array of ints)."""
    if kept is None:
        fail(f"{what}: the kept timesteps are None — return them too, (x_t, timesteps[S - k:]), "
             "an empty tensor when no step is kept")
    if isinstance(kept, (int, np.integer)) or (isinstance(kept, Tensor) and kept.ndim == 0):
        fail(f"{what}: the second item is one number ({int(kept)}) — return all the kept "
             f"timesteps, the sampler visits each of them: {_KEEP_RULE}")
    if isinstance(kept, Tensor):
        if kept.ndim != 1 or kept.dtype.is_floating_point or kept.dtype == torch.bool:
            fail(f"{what}: the kept timesteps should be a 1-D tensor of integers, got "
                 f"dtype {kept.dtype} and shape {tuple(kept.shape)} — {_KEEP_RULE}")
        return kept.detach().cpu().long()
    try:
        values = [int(v) for v in kept]
        if any(float(v) != int(v) for v in kept):
            raise ValueError
    except (TypeError, ValueError, RuntimeError):
        fail(f"{what}: the kept timesteps should be a 1-D tensor (or list) of integer "
             f"timesteps, got {type(kept).__name__} — {_KEEP_RULE}")
    return torch.tensor(values, dtype=torch.long)


def _kept_hint(out: Tensor, timesteps: Tensor, strength: float) -> str:
    """What is wrong with the kept timesteps ``out``."""
    S = len(timesteps)
    k = min(int(S * strength), S)
    expected = timesteps[S - k:]
    rules = f"{_KEEP_RULE}; here S = {S}, strength = {strength:g}, so k = {k}"

    def is_(values) -> bool:
        return len(out) == len(values) and torch.equal(out, values.long())

    if k == 0 and is_(timesteps):
        return ("no step should be kept (k = 0) but all are: timesteps[-k:] with k = 0 is "
                "timesteps[0:], the whole tensor (−0 is 0) — slice timesteps[S - k:]")
    if k > 0 and is_(timesteps[:k]) and k < S:
        return ("these are the first k timesteps, the noisiest; image-to-image skips those and "
                "denoises the rest: " + rules)
    if k > 1 and is_(expected.flip(0)):
        return ("these are the right timesteps in ascending order: keep the sampler's order "
                "(descending, noisiest first), timesteps[S - k:]")
    if 0 < k < S and is_(timesteps[:S - k]) and S - k != k:
        return ("these are the timesteps to skip, not the ones to keep (strength is the "
                "fraction of the steps that are run): " + rules)
    n = len(out)
    if n > 0 and is_(timesteps[S - n:]):
        product = S * strength
        if n == k + 1:
            if product != int(product) and n == math.ceil(product) and n == round(product):
                return (f"{n} steps kept: S * strength = {product:g} was rounded to the nearest "
                        f"or up (round, math.ceil); {rules}")
            if product != int(product) and n == math.ceil(product):
                return (f"{n} steps kept: S * strength = {product:g} was rounded up "
                        f"(math.ceil, or S − int(S * (1 − strength))); {rules}")
            return f"one step too many (off by one: {n} kept, k + 1): {rules}"
        if n == k - 1:
            return f"one step too few (off by one: {n} kept, k − 1): {rules}"
        return f"{n} steps kept, not k = {k}: {rules}"
    return f"{rules} = {_short(expected)}"


def _noised_to(out: Tensor, x0: Tensor, eps: Tensor, schedule) -> int | None:
    """The timestep t* with q_sample(x0, t*, eps) = ``out``, or None."""
    B = len(x0)
    for s in range(schedule.T):
        t = torch.full((B,), s, dtype=torch.long)
        if close(out, du.q_sample(x0, t, eps, schedule)):
            return s
    return None


def _x_t_hint(out: Tensor, x0: Tensor, eps: Tensor, schedule, timesteps: Tensor, k: int,
              what: str) -> None:
    """Fail, naming the timestep ``out`` was noised to or the mistake it makes."""
    S = len(timesteps)
    first = int(timesteps[S - k])
    t_star = _noised_to(out, x0, eps, schedule)
    start = (f"x0 is noised to the first kept timestep, kept[0] = timesteps[S - k] = {first}: "
             "q_sample(x0, t, eps) with t = that value for every image")
    if t_star is not None:
        if t_star == int(timesteps[0]) and k < S:
            fail(f"{what}: x_t is x0 noised to timesteps[0] = {t_star}, the noisiest, whatever "
                 f"the strength — {start}")
        if t_star == S - k and t_star != first:
            fail(f"{what}: x_t is x0 noised to t = {t_star}, the index S − k of the first kept "
                 f"timestep, not its value — {start}")
        if t_star == int(timesteps[-1]) and k > 1:
            fail(f"{what}: x_t is x0 noised to the last kept timestep ({t_star}, the least "
                 f"noisy) — {start}")
        if S - k - 1 >= 0 and t_star == int(timesteps[S - k - 1]):
            fail(f"{what}: x_t is x0 noised to timesteps[S - k - 1] = {t_star}, the step before "
                 f"the first kept one (off by one) — {start}")
        if k > 1 and t_star == int(timesteps[S - k + 1]):
            fail(f"{what}: x_t is x0 noised to timesteps[S - k + 1] = {t_star}, the second kept "
                 f"step (off by one) — {start}")
        fail(f"{what}: x_t is x0 noised to t = {t_star} — {start}")
    t = torch.full((len(x0),), first, dtype=torch.long)
    a = du.extract(schedule.alpha_bars, t, x0.shape).double()
    mistakes = {
        f"x_t is the clean x0: it was not noised — {start}": x0,
        "x_t is eps, pure noise: q_sample keeps sqrt(ᾱ_t) x0 of the image (a little even at "
        f"t = T − 1) — {start}": eps,
        f"x0 and eps are swapped in q_sample(x0, t, eps) — {start}": du.q_sample(eps, t, x0,
                                                                                 schedule),
        "the square roots are missing: x_t = sqrt(ᾱ_t) x0 + sqrt(1 − ᾱ_t) eps (du.q_sample) — "
        + start: (a * x0.double() + (1 - a) * eps.double()).float(),
    }
    for hint, wrong in mistakes.items():
        if close(out, wrong):
            fail(f"{what}: {hint}")
    expected = du.q_sample(x0, t, eps, schedule)
    fail(f"{what}: x_t differs from the reference ({largest_difference(out, expected)}) — "
         f"{start}")


def _expect_pair(out, *, what: str):
    """``(x_t, kept)`` from what came back."""
    if out is None:
        fail(f"{what} is None — did you forget the `return` statement?")
    if isinstance(out, Tensor):
        fail(f"{what} is one tensor; return two things, (x_t, kept timesteps): the sampler "
             "needs to know which steps remain")
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        fail(f"{what} should be a pair (x_t, kept timesteps), got "
             + (f"a {type(out).__name__} of {len(out)}" if isinstance(out, (tuple, list))
                else type(out).__name__))
    x_t, kept = out
    if isinstance(kept, Tensor) and kept.ndim > 1:
        fail(f"{what}: the pair is the wrong way round — return (x_t, kept timesteps)")
    return x_t, kept


@exercise_check("Exercise 3 · Image-to-image: where to start")
def check_img2img_start(fn) -> str:
    """Check ``img2img_start(x0, strength, timesteps, schedule, eps) -> (x_t, kept)``."""
    names = ("x0", "strength", "timesteps", "schedule", "eps")
    shape_hints = [("t must be a 1-D integer tensor", _T_SHAPE),
                   ("t should hold one timestep per batch item", _T_SHAPE)]
    empty = ("indexing failed: here k = int(S * strength) = 0, no step is kept, so there is "
             "no kept[0] — then return x0 (a copy) and the empty timesteps, timesteps[S:]")
    cases = _img2img_cases()
    for x0, strength, timesteps, schedule, eps, description in cases:
        what = f"img2img_start ({description})"
        expected_x, expected_kept = du.img2img_start(x0, strength, timesteps, schedule, eps)
        hints = shape_hints + ([("out of range", empty), ("out of bounds", empty)]
                               if len(expected_kept) == 0 else [])
        out = _call_tensors(fn, x0.clone(), strength, timesteps.clone(), schedule, eps.clone(),
                            names=names, what=what, hints=hints)
        x_t, kept = _expect_pair(out, what=what)
        kept = _as_timesteps(kept, what=what)
        if not torch.equal(kept, expected_kept):
            fail(f"{what}: the kept timesteps are {_short(kept)} — "
                 + _kept_hint(kept, timesteps, strength))
        x_t = expect_tensor(x_t, shape=x0.shape, dtype=x0.dtype, what=f"x_t of {what}",
                            shape_hint="x_t has x0's shape: " + _T_SHAPE)
        if len(expected_kept) == 0:
            if not close(x_t, x0):
                fail(f"{what}: no step is kept (k = int(S * strength) = 0), so there is nothing "
                     "to denoise: x_t is x0 itself (a copy), not noised")
            continue
        if not close(x_t, expected_x):
            _x_t_hint(x_t, x0, eps, schedule, timesteps, len(expected_kept), what)
    x0, strength, timesteps, schedule, eps, _ = cases[0]
    probe_device(fn, x0, strength, timesteps, schedule, eps, what="img2img_start")
    return (f"{_KEEP_RULE}, x0 noised to the first of them with eps; strength 1 starts at "
            "t = T − 1, a strength keeping no step returns x0; S = 10, 25 and 50")


# ── Exercise 4 · Inpainting: putting the known region back ───────────────────────────

_BLEND_RULE = ("keep * q_sample(known, t, eps) + (1 - keep) * x, with known itself (not "
               "noised) where t = -1")


def _blend_cases():
    """(x, known, keep, t, schedule, eps, description): masks of 0s and 1s, shared
    (1, 1, H, W) or one per image (B, 1, H, W); t = -1 (the clean end) and t = 0 included."""
    g = torch.Generator().manual_seed(84)
    linear = (du.NoiseSchedule.create("linear", 1000), "linear")
    cosine = (du.NoiseSchedule.create("cosine", 50), "cosine")
    C, H, W = 4, 6, 5
    cases = []
    for (schedule, kind), t, shared in [(linear, [500, 0, -1], True),
                                        (linear, [998, 250], False),
                                        (cosine, [49, 10, 3], True),
                                        (linear, [-1, -1], False)]:
        B = len(t)
        x = torch.randn(B, C, H, W, generator=g)
        known = torch.rand(B, C, H, W, generator=g) * 2 - 1
        eps = torch.randn(B, C, H, W, generator=g)
        keep = (torch.rand(1 if shared else B, 1, H, W, generator=g) < 0.5).float()
        keep[..., 0, 0], keep[..., -1, -1] = 1.0, 0.0                 # both regions in each
        description = (f"t = {t}, {kind} schedule, T = {schedule.T}, keep "
                       f"{tuple(keep.shape)}, x {tuple(x.shape)}")
        cases.append((x, known, keep, torch.tensor(t), schedule, eps, description))
    return cases


def _noised(known: Tensor, t: Tensor, eps: Tensor, schedule, *, at_end="known") -> Tensor:
    """``known`` noised to each item's t; where t < 0: ``at_end`` "known" (itself), "t0"
    (noised to t = 0) or "last" (noised to T − 1, as alpha_bars[-1] reads)."""
    T = schedule.T
    s = {"known": t.clamp(0, T - 1), "t0": t.clamp(0, T - 1),
         "last": torch.where(t < 0, t % T, t.clamp(max=T - 1))}[at_end]
    out = du.q_sample(known, s, eps, schedule)
    if at_end == "known":
        out = torch.where((t < 0).view(-1, 1, 1, 1), known, out)
    return out


def _blend_mistakes(x, known, keep, t, schedule, eps) -> dict[str, Tensor]:
    T = schedule.T
    right = _noised(known, t, eps, schedule)
    t_later = torch.where(t < 0, t, (t - 1))                          # t - 1; -1 stays the end
    a = du.extract(schedule.alpha_bars, t.clamp(0, T - 1), x.shape)
    no_sqrt = torch.where((t < 0).view(-1, 1, 1, 1), known, a * known + (1 - a) * eps)
    channel0 = x.clone()
    channel0[:, :1] = (keep * right + (1 - keep) * x)[:, :1]
    step = "the function gets the step the sampler has reached, t: noise known to that t"
    return {
        "keep and repaint are swapped: keep is 1 on the known region, which comes from known "
        f"(noised), and 0 where x is repainted — {_BLEND_RULE}": keep * x + (1 - keep) * right,
        "the known region was put back clean at every step: noise it to the step reached, "
        f"q_sample(known, t, eps), so that it matches x_t — {_BLEND_RULE}":
            keep * known + (1 - keep) * x,
        f"known was noised one step too far (t + 1): {step} — {_BLEND_RULE}":
            keep * _noised(known, t + 1, eps, schedule, at_end="t0") + (1 - keep) * x,
        f"known was noised one step too little (t − 1): {step} — {_BLEND_RULE}":
            keep * _noised(known, t_later, eps, schedule) + (1 - keep) * x,
        "at t = -1 (the sampler has reached the clean end) known was still noised, to t = 0: "
        f"there the known region is known itself — {_BLEND_RULE}":
            keep * _noised(known, t, eps, schedule, at_end="t0") + (1 - keep) * x,
        "at t = -1 (the clean end) alpha_bars[-1] was read, the last and noisiest step: there "
        f"the known region is known itself — {_BLEND_RULE}":
            keep * _noised(known, t, eps, schedule, at_end="last") + (1 - keep) * x,
        "known was noised with x instead of eps: the noise to add is the eps given, "
        f"q_sample(known, t, eps) — {_BLEND_RULE}":
            keep * _noised(known, t, x, schedule) + (1 - keep) * x,
        "the square roots are missing: known is noised as sqrt(ᾱ_t) known + sqrt(1 − ᾱ_t) eps "
        f"(du.q_sample) — {_BLEND_RULE}": keep * no_sqrt + (1 - keep) * x,
        "only the first channel was blended: the mask (1 on the known region) applies to every "
        f"channel; let it broadcast over them — {_BLEND_RULE}": channel0,
        f"x was added whole: outside the known region x stays, so multiply it by (1 − keep) — "
        f"{_BLEND_RULE}": keep * right + x,
        f"the region to repaint is zero: it keeps x, (1 − keep) · x — {_BLEND_RULE}":
            keep * right,
    }


def _region_hint(out: Tensor, expected: Tensor, x: Tensor, known: Tensor, keep: Tensor,
                 t: Tensor, schedule, eps: Tensor) -> str:
    """Which region differs, and whether the known region holds fresh noise."""
    keep_b = keep.expand_as(x).bool()
    diff = (out.detach().double().cpu() - expected.double()).abs().nan_to_num(nan=math.inf)
    if float(diff[keep_b].max()) <= 1e-4:
        return ("the known region (keep = 1) is right; the region to repaint (keep = 0) "
                "differs: there the result is x, unchanged")
    noisy = (t >= 0).view(-1, 1, 1, 1).expand_as(x) & keep_b
    if bool(noisy.any()) and float(diff[~keep_b].max()) <= 1e-4:
        a = du.extract(schedule.alpha_bars, t.clamp_min(0), x.shape).double()
        z = (out.detach().double().cpu() - a.sqrt() * known.double()) / (1 - a).sqrt()
        z = z[noisy]
        if (abs(float(z.mean())) < 0.5 and abs(float(z.std()) - 1) < 0.5
                and not torch.allclose(z, eps.double()[noisy], atol=1e-3)):
            return ("the known region holds fresh noise: noise known with the eps given, "
                    "q_sample(known, t, eps), not with torch.randn_like")
    return ("the known region (keep = 1) differs: there the result is q_sample(known, t, eps), "
            "known itself where t = -1; outside it, x unchanged")


@exercise_check("Exercise 4 · Inpainting: putting the known region back")
def check_inpaint_blend(fn) -> str:
    """Check ``inpaint_blend(x, known, keep, t, schedule, eps)``."""
    names = ("x", "known", "keep", "t", "schedule", "eps")
    end = ("t = -1 means the sampler has reached the clean end: use known itself there "
           "(torch.where(t < 0, ...)) and q_sample only where t >= 0, e.g. on t.clamp(min=0)")
    index = ("indexing failed: t runs from T − 1 down to -1 (the clean end); read ᾱ at t "
             "itself, and use known itself where t = -1")
    hints = [("timesteps t must lie in", end), ("out of bounds", index), ("out of range", index),
             ("t should hold one timestep per batch item",
              "t holds one timestep per image, (B,): pass it to q_sample as it is")]
    cases = _blend_cases()
    for x, known, keep, t, schedule, eps, description in cases:
        what = f"the blend ({description})"
        expected = du.inpaint_blend(x, known, keep, t, schedule, eps)   # before yours
        mistakes = _blend_mistakes(x, known, keep, t, schedule, eps)
        out = _call_tensors(fn, x.clone(), known.clone(), keep.clone(), t.clone(), schedule,
                            eps.clone(), names=names, what=what, hints=hints,
                            shapes="keep broadcasts against x as it is, (1, 1, H, W) or "
                                   "(B, 1, H, W); per-image values of shape (B,) must become "
                                   "(B, 1, 1, 1) before they multiply (B, C, H, W)")
        out = expect_tensor(out, shape=x.shape, dtype=x.dtype, what=what,
                            shape_hint="the result has x's shape (B, C, H, W): keep "
                                       "(1, 1, H, W) or (B, 1, H, W) broadcasts against it")
        if not close(out, expected):
            compare(out, expected, mistakes, what=what,
                    term_hint=_region_hint(out, expected, x, known, keep, t, schedule, eps)
                    + " — " + _BLEND_RULE,
                    item_names=[f"t = {int(s)}" for s in t])
    x, known, keep, t, schedule, eps, _ = cases[0]
    probe_device(fn, x, known, keep, t, schedule, eps, what="inpaint_blend")
    return (f"{_BLEND_RULE}: shared and per-image masks, t from T − 1 down to 0 and -1, "
            "linear and cosine schedules")
