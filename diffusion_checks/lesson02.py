"""Checks of lesson 02's exercises (the UNet)."""
from __future__ import annotations

import functools

import torch
from torch import Tensor

import diffusion_utilities as du

from ._core import (BROADCAST_HINT, DEVICE_HINT, NOT_ATTEMPTED_MARK, PASSED_MARK,  # noqa: F401
                    call, call_pure, changed, close, compare, exercise_check, expect_finite,
                    expect_float, expect_tensor, fail, largest_difference, near, other_device,
                    passed, probe_device, snapshot, to_device, yours_if_passed)


# ── 02 · UNet ────────────────────────────────────────────────────────────────────────
# The module exercises (ResBlock, SelfAttention, the UNet's forward) give the learner a
# class whose __init__ is written; the check builds the reference module, gives every
# parameter a random value (so zero-initialised layers do something), copies the same
# weights into the learner's module and compares outputs on fixed inputs.

import math  # noqa: E402  (this lesson's imports, kept with its section)

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402


def _scramble(module: nn.Module, seed: int) -> nn.Module:
    """Give every parameter a deterministic random value of a sensible size."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            std = 1 / math.sqrt(p[0].numel()) if p.dim() > 1 else 0.5
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module.eval()


def _learner_copy(cls, reference: nn.Module, *args, **kwargs) -> nn.Module:
    """Build the learner's module with ``cls(*args, **kwargs)`` and load ``reference``'s weights."""
    mine = cls(*args, **kwargs)
    if not isinstance(mine, nn.Module):
        fail(f"{cls.__name__}(...) should build an nn.Module, got {type(mine).__name__}")
    try:
        mine.load_state_dict(reference.state_dict())
    except RuntimeError as err:
        fail(f"{cls.__name__}'s layers differ from the ones given in __init__ — keep __init__ "
             f"as given and write only forward ({str(err).splitlines()[0]})")
    return mine.eval()


def _call_02(fn, *args, what: str, hint: str = "", **kwargs):
    """Call the learner's code; an error other than the stub's becomes a hint."""
    try:
        with torch.no_grad():
            return call(fn, *args, **kwargs)
    except (RuntimeError, ValueError, TypeError, IndexError) as err:
        fail(f"{what} raised {type(err).__name__}: {err}{hint}")


# -- sinusoidal_embedding --


def _sinusoid_variants(t: Tensor, dim: int, max_period: float) -> dict[str, Tensor]:
    half = dim // 2
    i = torch.arange(half, dtype=torch.float64)
    tt = t.double()[:, None]

    def emb(freqs, first=torch.sin, second=torch.cos, times=True):
        angles = (tt if times else torch.ones_like(tt)) * freqs[None, :]
        return torch.cat([first(angles), second(angles)], dim=1)

    right = max_period ** (-i / half)
    angles = tt * right[None, :]
    return {
        "the cosines come first — put the sines in the first half, the cosines in the second":
            emb(right, torch.cos, torch.sin),
        "the exponent divides by dim — the frequencies are max_period^(-i / half) with "
        "half = dim // 2": emb(max_period ** (-i / dim)),
        "the exponent divides by half - 1 — use max_period^(-i / half), i = 0 .. half-1":
            emb(max_period ** (-i / max(half - 1, 1))),
        "every row is the same — multiply the frequencies by the timesteps t[:, None]":
            emb(right, times=False),
        "sines and cosines are interleaved — concatenate [all sines, all cosines] along dim=1":
            torch.stack([angles.sin(), angles.cos()], dim=-1).reshape(len(t), dim),
        "max_period is ignored — use the max_period argument, not a fixed 10000":
            emb(10000.0 ** (-i / half)),
    }


@exercise_check("Exercise 1 · Telling the network the time: the sinusoidal embedding")
def check_sinusoidal_embedding(fn) -> str:
    t = torch.tensor([0, 1, 7, 50, 999])
    for dim, max_period in [(8, 10000), (32, 10000), (6, 100)]:
        what = f"sinusoidal_embedding(t, {dim}, max_period={max_period})"
        out = expect_tensor(call(fn, t, dim, max_period=max_period), shape=(len(t), dim),
                            dtype=torch.float32, what=what)
        compare(out, du.sinusoidal_embedding(t, dim, max_period=max_period),
                _sinusoid_variants(t, dim, max_period), what=what, atol=1e-3, rtol=1e-3)
    t64 = torch.tensor([0.5, 12.25], dtype=torch.float64)
    what = "sinusoidal_embedding of float64 t"
    out = expect_tensor(call(fn, t64, 8), shape=(2, 8), dtype=torch.float64,
                        what=what + " (the dtype should follow t: compute with t.dtype)")
    compare(out, du.sinusoidal_embedding(t64, 8), {}, what=what, atol=1e-6)
    return "sines then cosines, frequencies max_period^(-i/half), dtype follows t"


# -- ResBlock --


def _res_block_variants(b: nn.Module, x: Tensor, emb: Tensor) -> dict[str, Tensor]:
    act = F.silu
    temb = b.time_proj(emb)[:, :, None, None]                     # (B, out_ch, 1, 1)
    h1 = b.conv1(act(b.norm1(x)))

    def second(h):
        return b.conv2(act(b.norm2(h)))

    swapped = b.conv2(b.norm2(act(b.conv1(b.norm1(act(x))) + temb)))
    return {
        "the time embedding is never added — add self.time_proj(emb)[:, :, None, None] to h "
        "after the first conv": b.skip(x) + second(h1),
        "the time embedding is added after the second conv — add it between the two convs":
            b.skip(x) + second(h1) + temb,
        "the skip connection is missing — return self.skip(x) + h": second(h1 + temb),
        "GroupNorm and SiLU are in the wrong order — normalise first: "
        "conv(SiLU(GroupNorm(x)))": b.skip(x) + swapped,
    }


@exercise_check("Exercise 2 · The residual block, with the time injected")
def check_res_block(cls) -> str:
    time_dim, B = 12, 2
    for in_ch, out_ch in [(8, 8), (8, 16)]:
        ref = _scramble(du.ResBlock(in_ch, out_ch, time_dim, groups=4), seed=in_ch + out_ch)
        mine = _learner_copy(cls, ref, in_ch, out_ch, time_dim, groups=4)
        g = torch.Generator().manual_seed(out_ch)
        x = torch.randn(B, in_ch, 6, 5, generator=g)
        emb = torch.randn(B, time_dim, generator=g)
        what = f"ResBlock({in_ch}, {out_ch}, {time_dim})"
        hint = ("" if in_ch == out_ch else " — when in_ch != out_ch, x must go through "
                "self.skip (a 1x1 conv) so its channels match h: self.skip(x) + h")
        out = expect_tensor(_call_02(mine, x, emb, what=what, hint=hint),
                            shape=(B, out_ch, 6, 5), what=f"{what}'s output")
        with torch.no_grad():
            expected, wrong = ref(x, emb), _res_block_variants(ref, x, emb)
        compare(out, expected, wrong, what=f"{what}'s output", atol=1e-4, rtol=1e-3)
    return "norm -> SiLU -> conv, time added per channel, zero-init conv, skip (1x1 when needed)"


# -- SelfAttention --


def _attention_variants(a: nn.Module, x: Tensor) -> dict[str, Tensor]:
    B, C, H, W = x.shape
    heads, N = a.heads, H * W
    d = C // heads
    q, k, v = a.qkv(a.norm(x).flatten(2).transpose(1, 2)).chunk(3, dim=-1)  # (B, N, C)

    def split(z):
        return z.view(B, N, heads, d).transpose(1, 2)            # (B, heads, N, d)

    def attend(q, k, v, *, scale=True, dim=-1):
        scores = q @ k.transpose(-1, -2) / (math.sqrt(d) if scale else 1.0)
        return scores.softmax(dim=dim) @ v                       # (B, heads, N, d)

    def finish(out, *, residual=True):                           # (B, N, C) -> (B, C, H, W)
        out = a.proj(out).transpose(1, 2).reshape(B, C, H, W)
        return x + out if residual else out

    def merge(o):
        return o.transpose(1, 2).reshape(B, N, C)

    right = attend(split(q), split(k), split(v))
    wrong_split = attend(*(z.reshape(B, heads, N, d) for z in (q, k, v)))
    return {
        "the scores are not scaled — divide q kᵀ by sqrt(d), d = C // heads":
            finish(merge(attend(split(q), split(k), split(v), scale=False))),
        "softmax runs over the wrong axis — normalise over the keys (the last axis, dim=-1)":
            finish(merge(attend(split(q), split(k), split(v), dim=-2))),
        "the residual is missing — return x + the attention output":
            finish(merge(right), residual=False),
        "the heads are split wrongly — (B, N, C) -> view(B, N, heads, d).transpose(1, 2), "
        "not reshape(B, heads, N, d)": finish(wrong_split.reshape(B, N, C)),
        "the heads are merged wrongly — (B, heads, N, d) -> transpose(1, 2).reshape(B, N, C)":
            finish(right.reshape(B, N, C)),
        "the tokens go back to an image wrongly — (B, N, C) -> transpose(1, 2) before "
        "reshape(B, C, H, W)": x + a.proj(merge(right)).reshape(B, C, H, W),
    }


@exercise_check("Exercise 3 · Self-attention: every pixel looks at every other")
def check_self_attention(cls) -> str:
    B, C = 2, 16
    for heads, (H, W) in [(4, (4, 6)), (1, (3, 3)), (2, (5, 4))]:
        ref = _scramble(du.SelfAttention(C, heads=heads, groups=4), seed=heads)
        mine = _learner_copy(cls, ref, C, heads=heads, groups=4)
        x = torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(H * W))
        what = f"SelfAttention({C}, heads={heads}) on a {H}x{W} map"
        out = expect_tensor(_call_02(mine, x, what=what), shape=(B, C, H, W),
                            what=f"{what}'s output")
        with torch.no_grad():
            expected, wrong = ref(x), _attention_variants(ref, x)
        compare(out, expected, wrong, what=f"{what}'s output", atol=1e-4, rtol=1e-3)
    return "softmax(q kᵀ / sqrt(d)) v over heads, output projection, residual"


# -- UNet.forward --


def _unet_variants(m: nn.Module, x: Tensor, t: Tensor, kw: dict) -> dict[str, Tensor]:
    def forward(*, middle=True, skip_first=False):
        emb = m.embed(t, kw.get("labels"))
        cond = (kw.get("context"), kw.get("context_mask"))
        h, skips = m.in_conv(x), []
        for level, down in zip(m.down, m.downsample):
            h = level(h, emb, *cond)
            skips.append(h)
            h = down(h)
        h = m.middle(h, emb, *cond) if middle else h
        for level, up in zip(m.up, m.upsample):
            skip = skips.pop()
            h = up(level(torch.cat([skip, h] if skip_first else [h, skip], dim=1), emb, *cond))
        return m.out(h)

    return {"the middle block is skipped — run self.middle between the down and up paths":
            forward(middle=False),
            "the skip comes first in the concatenation — use torch.cat([h, skip], dim=1)":
            forward(skip_first=True)}


def _trace_levels(model: nn.Module) -> tuple[list, list]:
    """Record which of middle / up levels started and finished (forward hooks)."""
    events, handles = [], []
    levels = [("middle", model.middle)] + [(f"up{i}", lv) for i, lv in enumerate(model.up)]
    for name, level in levels:
        handles += [level.register_forward_pre_hook(lambda *_, n=name: events.append(("start", n))),
                    level.register_forward_hook(lambda *_, n=name: events.append(("end", n)))]
    return events, handles


def _unet_cases():
    small = dict(base_channels=8, channel_mults=(1, 2, 2), num_res_blocks=1,
                 attention_resolutions=(4,), heads=2, groups=4, image_size=8)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 3, 8, 8, generator=g), torch.tensor([3, 700])
    cond = dict(labels=torch.tensor([1, 3]), context=torch.randn(2, 5, 6, generator=g),
                context_mask=torch.tensor([[True] * 3 + [False] * 2, [True] * 5]))
    return [(du.UNetConfig(**small), x, t, {}),
            (du.UNetConfig(**small, num_classes=3, context_dim=6), x, t, cond)]


@exercise_check("Exercise 4 · The whole UNet")
def check_unet_forward(cls) -> str:
    for config, x, t, kw in _unet_cases():
        torch.manual_seed(0)
        ref = _scramble(du.UNet(config), seed=1)
        mine = _learner_copy(cls, ref, config)
        what = "your UNet's forward" + (" with labels and a context" if kw else "")
        events, handles = _trace_levels(mine)
        try:
            out = _call_02(mine, x, t, what=what, **kw)
        except AssertionError as err:
            glue_failed = "RuntimeError" in str(err) and events and events[-1][0] == "end"
            if glue_failed:
                fail("the up path met a skip of another resolution — append h to skips after "
                     "each down level (before downsampling), take them back with skips.pop() "
                     "(last in, first out), and upsample after each up level")
            raise
        finally:
            for handle in handles:
                handle.remove()
        if isinstance(out, Tensor) and out.dim() == 4 and out.shape[1] == config.base_channels:
            fail(f"{what} returns the last feature map — finish with self.out(h)")
        out = expect_tensor(out, shape=tuple(x.shape), what=f"{what}'s output")
        with torch.no_grad():
            expected, wrong = ref(x, t, **kw), _unet_variants(ref, x, t, kw)
        compare(out, expected, wrong, what=f"{what}'s output", atol=1e-4, rtol=1e-3)
    return "down path with skips, middle, up path concatenating skips last-in first-out"
