"""Checks of lesson 02's exercises (the UNet)."""
from __future__ import annotations

import copy
import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import diffusion_utilities as du

from ._core import (BROADCAST_HINT, DEVICE_HINT, NOT_ATTEMPTED_MARK, PASSED_MARK,  # noqa: F401
                    call, call_pure, changed, close, compare, exercise_check, expect_finite,
                    expect_float, expect_tensor, fail, largest_difference, near, other_device,
                    passed, probe_device, same_values, snapshot, to_device, yours_if_passed)


# ── 02 · UNet ────────────────────────────────────────────────────────────────────────
# The module exercises (ResBlock, SelfAttention, the UNet's forward) give the learner a
# class whose __init__ is written; the check builds the reference module, gives every
# parameter a random value (so zero-initialised layers do something), copies the same
# weights into the learner's module and compares outputs on fixed inputs. Forward hooks
# on the layers given in __init__ show which step went wrong: what went into each layer
# is compared with what went into the reference's.


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


class _Trace:
    """Which of a module's layers ran, in order, and what each got on its first call.

    ``with _Trace(module, ["conv1", "down.0"]) as trace: module(x)``; then ``trace.events``
    holds ("start" | "end", name) in order, ``trace.args[name]`` the first call's positional
    inputs (detached copies) and ``trace.kwargs[name]`` its keyword inputs.
    """

    def __init__(self, module: nn.Module, parts):
        self.module, self.parts = module, list(parts)
        self.events: list[tuple[str, str]] = []
        self.args: dict[str, tuple] = {}
        self.kwargs: dict[str, dict] = {}
        self._handles: list = []

    def __enter__(self) -> _Trace:
        for name in self.parts:
            part = self.module.get_submodule(name)
            self._handles += [part.register_forward_pre_hook(functools.partial(self._start, name),
                                                             with_kwargs=True),
                              part.register_forward_hook(functools.partial(self._end, name))]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()

    def _start(self, name, module, args, kwargs) -> None:
        self.events.append(("start", name))
        if name not in self.args:
            copy_ = lambda a: a.detach().clone() if isinstance(a, Tensor) else a  # noqa: E731
            self.args[name] = tuple(copy_(a) for a in args)
            self.kwargs[name] = {k: copy_(v) for k, v in kwargs.items()}

    def _end(self, name, module, args, output) -> None:
        self.events.append(("end", name))

    def started(self, name: str) -> bool:
        return ("start", name) in self.events

    def finished(self, name: str) -> bool:
        return ("end", name) in self.events

    def failed(self) -> list[str]:
        """The layers that started and never finished (a crash inside them)."""
        return [name for name in self.parts if self.started(name) and not self.finished(name)]

    def first_input(self, name: str):
        args = self.args.get(name)
        return args[0] if args else None

    def level_inputs(self, name: str) -> dict | None:
        """What a UNetLevel ``name`` got: h, emb, context, context_mask (by position or
        keyword), or None when it never ran."""
        if name not in self.args:
            return None
        bound = dict(zip(("h", "emb", "context", "context_mask"), self.args[name]))
        return {k: bound.get(k, self.kwargs[name].get(k))
                for k in ("h", "emb", "context", "context_mask")}


def _first_difference(mine: _Trace, ref: _Trace, steps, otherwise: str) -> str:
    """The first layer whose input differs from the reference's, with what it should get."""
    for name, should in steps:
        expected = ref.first_input(name)
        if expected is None:
            continue
        got = mine.first_input(name)
        if got is None:
            return f"self.{name} is never called — {should}"
        if not close(got, expected, atol=1e-4, rtol=1e-3):
            shape = (f" (yours is {tuple(got.shape)}, it should be {tuple(expected.shape)})"
                     if isinstance(got, Tensor) and got.shape != expected.shape else "")
            return f"what goes into self.{name} differs{shape}: {should}"
    return otherwise


def _run(fn, *args, what: str, names=(), explain=None, **kwargs):
    """Call the learner's code (no gradients; inputs watched); an error other than the stub's
    becomes a hint, sharpened by ``explain(err)`` when it recognises the cause."""
    try:
        with torch.no_grad():
            return call_pure(fn, *args, names=names, **kwargs)
    except (RuntimeError, ValueError, TypeError, IndexError) as err:
        hint = explain(err) if explain is not None else None
        fail(f"{what} raised {type(err).__name__}: {err}" + (f" — {hint}" if hint else ""))


def _forward(module: nn.Module, *args, **kwargs):
    return module(*args, **kwargs)


def _probe_module(module: nn.Module, *args, what: str, **kwargs) -> None:
    """The device probe for a module: a copy of it and its inputs on another device."""
    with torch.no_grad():
        probe_device(_forward, copy.deepcopy(module), *args, what=what, **kwargs)


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
        "the frequencies grow — ω_i = max_period^(-i / half) falls from 1 (mind the minus "
        "sign), and the angle is t · ω_i, not t / ω_i": emb(max_period ** (i / half)),
        "i starts at 1 — i = 0 .. half-1 (torch.arange(half)), so the first frequency is 1":
            emb(max_period ** (-(i + 1) / half)),
        "there is no 2π — the angles are t · ω_i": emb(2 * math.pi * right),
        "log10 where the natural log belongs — ω_i = exp(-ln(max_period) · i / half) "
        "(math.log, torch.log)": emb(torch.exp(-math.log10(max_period) * i / half)),
    }


_SMALL_T = slice(0, 3)  # the rows t = 0, 1, 7: float32 angles there are exact enough


def _sinusoid_mistake(out: Tensor, expected: Tensor, mistakes: dict[str, Tensor], *,
                      what: str) -> None:
    """Name a known mistake, judged on the rows of small t: a mistake that makes the angles
    huge (frequencies that grow) leaves float32 sines of large t with no digit to compare."""
    rows = _SMALL_T
    for hint, wrong in mistakes.items():
        if close(wrong[rows], expected[rows], atol=1e-3, rtol=1e-3):
            continue  # these rows cannot tell this mistake from the right answer
        if close(out[rows], wrong[rows].to(out.dtype), atol=1e-3, rtol=1e-3):
            fail(f"{what} is not right: {hint}")


def _sinusoid_shape_hint(out, B: int, dim: int) -> str | None:
    if not isinstance(out, Tensor):
        return None
    half = dim // 2
    hints = {
        (dim, B): "transposed — one row per timestep: angles = t[:, None] * freqs[None, :] "
                  "is (B, half)",
        (2 * B, half): "the sines and the cosines are stacked along dim=0 — put them side by "
                       "side: torch.cat([sines, cosines], dim=1)",
        (B, half): "only half the features — concatenate the sines and the cosines",
        (B, 2 * dim): "twice the features — there are half = dim // 2 frequencies: "
                      "dim // 2 sines, then dim // 2 cosines",
        (B, 2, half): "flatten the stacked sines and cosines to (B, dim): .flatten(1), or "
                      "torch.cat([sines, cosines], dim=1)",
        (B, half, 2): "that interleaves sines and cosines — torch.cat([sines, cosines], dim=1)",
    }
    return hints.get(tuple(out.shape), "one row of dim features per timestep: (B, dim)")


def _sinusoid_term_hint(out: Tensor, expected: Tensor) -> str:
    half = expected.shape[1] // 2
    diff = (out.detach().double() - expected.double()).abs().nan_to_num(nan=math.inf)
    column = int(diff.max(dim=0).values.argmax())
    part = (f"sin(t ω_{column})" if column < half else f"cos(t ω_{column - half})")
    return (f"the largest difference is in column {column}, which holds {part}, "
            f"ω_i = max_period^(-i / half), half = {half}")


@exercise_check("Exercise 1 · Telling the network the time: the sinusoidal embedding")
def check_sinusoidal_embedding(fn) -> str:
    t = torch.tensor([0, 1, 7, 50, 999])
    items = [f"t = {v}" for v in t.tolist()]
    names = ("t", "dim")
    for dim, max_period in [(8, 10000), (32, 10000), (6, 100)]:
        what = f"sinusoidal_embedding(t, {dim}, max_period={max_period})"
        expected = du.sinusoidal_embedding(t, dim, max_period=max_period)
        mistakes = _sinusoid_variants(t, dim, max_period)
        out = _run(fn, t.clone(), dim, what=what, names=names, max_period=max_period)
        out = expect_tensor(out, shape=(len(t), dim), dtype=torch.float32, what=what,
                            shape_hint=_sinusoid_shape_hint(out, len(t), dim))
        if not close(out, expected, atol=1e-3, rtol=1e-3):
            _sinusoid_mistake(out, expected, mistakes, what=what)
        compare(out, expected, {}, what=what, atol=1e-3, rtol=1e-3, item_names=items,
                term_hint=_sinusoid_term_hint(out, expected))
    t64 = torch.tensor([0.5, 12.25], dtype=torch.float64)
    what = "sinusoidal_embedding of float64 t"
    expected = du.sinusoidal_embedding(t64, 8)
    out = _run(fn, t64.clone(), 8, what=what, names=names)
    out = expect_tensor(out, shape=(2, 8), dtype=torch.float64,
                        what=what + " (the dtype should follow t: compute with t.dtype)",
                        shape_hint=_sinusoid_shape_hint(out, 2, 8))
    compare(out, expected, {}, what=what, atol=1e-6, item_names=["t = 0.5", "t = 12.25"],
            term_hint=_sinusoid_term_hint(out, expected))
    probe_device(fn, t, 8, what="sinusoidal_embedding(t, 8)")
    return "sines then cosines, frequencies max_period^(-i/half), dtype follows t"


# -- ResBlock --


def _res_block_variants(b: nn.Module, x: Tensor, emb: Tensor) -> dict[str, Tensor]:
    act = F.silu
    temb = b.time_proj(emb)[:, :, None, None]                     # (B, out_ch, 1, 1)
    h1 = b.conv1(act(b.norm1(x)))

    def second(h):
        return b.conv2(act(b.norm2(h)))

    right = second(h1 + temb)
    swapped = b.conv2(b.norm2(act(b.conv1(b.norm1(act(x))) + temb)))
    variants = {
        "the time embedding is never added — add self.time_proj(emb)[:, :, None, None] to h "
        "after the first conv": b.skip(x) + second(h1),
        "the time embedding is added after the second conv — add it between the two convs":
            b.skip(x) + second(h1) + temb,
        "the time embedding is added after norm2 — add it to conv1's output, before norm2":
            b.skip(x) + b.conv2(act(b.norm2(h1) + temb)),
        "the time embedding is added after norm2 and SiLU — add it to conv1's output, before "
        "norm2": b.skip(x) + b.conv2(act(b.norm2(h1)) + temb),
        "the time embedding multiplies h — it is added: h + self.time_proj(emb)[:, :, None, None]":
            b.skip(x) + second(h1 * temb),
        "SiLU is applied to the time embedding twice — self.time_proj already starts with "
        "SiLU: use self.time_proj(emb) as it is": b.skip(x) + second(h1 + act(temb)),
        "the time embedding skips the SiLU at the start of self.time_proj — call "
        "self.time_proj(emb) as a whole": b.skip(x) + second(h1 + b.time_proj[-1](emb)[
            :, :, None, None]),
        "the skip connection is missing — return self.skip(x) + h": right,
        "GroupNorm and SiLU are in the wrong order — normalise first: "
        "conv(SiLU(GroupNorm(x)))": b.skip(x) + swapped,
        "SiLU is missing after both GroupNorms — conv(SiLU(GroupNorm(x)))":
            b.skip(x) + b.conv2(b.norm2(b.conv1(b.norm1(x)) + temb)),
        "SiLU is missing after norm1 — conv1(SiLU(norm1(x)))":
            b.skip(x) + second(b.conv1(b.norm1(x)) + temb),
        "SiLU is missing after norm2 — conv2(SiLU(norm2(h)))":
            b.skip(x) + b.conv2(b.norm2(h1 + temb)),
    }
    if b.conv1.in_channels == b.conv1.out_channels:  # only runs when the channels agree
        variants.update({
            "the skip connection adds the block's input — self.skip(x) + h, not h + h "
            "(self.skip applied to h)": 2 * right,
            "the time embedding is added to x before the first conv — add it to conv1's "
            "output": b.skip(x) + second(b.conv1(act(b.norm1(x + temb)))),
            "norm1 is used twice — the second normalisation is self.norm2":
                b.skip(x) + b.conv2(act(b.norm1(h1 + temb))),
        })
    return variants


_RES_BLOCK_STEPS = [
    ("norm1", "it gets the block's input x"),
    ("conv1", "conv1 gets SiLU(norm1(x))"),
    ("time_proj", "it gets emb as it is (it starts with its own SiLU)"),
    ("norm2", "h = conv1(SiLU(norm1(x))) + self.time_proj(emb)[:, :, None, None]"),
    ("conv2", "conv2 gets dropout(SiLU(norm2(h)))"),
]
_RES_BLOCK_PARTS = ["norm1", "conv1", "time_proj", "norm2", "conv2", "skip"]


def _res_block_crash(trace: _Trace, in_ch: int, out_ch: int) -> str | None:
    """Name the cause of a crash inside the learner's ResBlock.forward, if it is a usual one."""
    failed = trace.failed()
    if "skip" in failed:
        return ("self.skip takes the block's input x (in_ch channels), not h: "
                "return self.skip(x) + h")
    for name, should in _RES_BLOCK_STEPS:
        if name in failed:
            return f"self.{name} cannot take what it was given: {should}"
    if trace.finished("conv2") and in_ch != out_ch:
        return ("when in_ch != out_ch, x must go through self.skip (a 1x1 conv) so its "
                "channels match h: self.skip(x) + h")
    if trace.finished("conv1") and not trace.started("norm2"):
        if not trace.started("time_proj"):
            return ("project the time embedding first: self.time_proj(emb) turns "
                    "(B, time_dim) into (B, out_ch)")
        return ("the time embedding (B, out_ch) must become (B, out_ch, 1, 1) before it is "
                "added to h (B, out_ch, H, W): self.time_proj(emb)[:, :, None, None]")
    return None


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
        with torch.no_grad(), _Trace(ref, _RES_BLOCK_PARTS) as ref_trace:
            expected = ref(x, emb)                                # the reference, before yours
        with torch.no_grad():
            wrong = _res_block_variants(ref, x, emb)
        with _Trace(mine, _RES_BLOCK_PARTS) as trace:
            out = _run(mine, x.clone(), emb.clone(), what=what, names=("x", "emb"),
                       explain=lambda err: _res_block_crash(trace, in_ch, out_ch))
        out = expect_tensor(out, shape=(B, out_ch, 6, 5), what=f"{what}'s output",
                            shape_hint="the block maps (B, in_ch, H, W) to (B, out_ch, H, W)")
        compare(out, expected, wrong, what=f"{what}'s output", atol=1e-4, rtol=1e-3,
                term_hint=_first_difference(trace, ref_trace, _RES_BLOCK_STEPS,
                                            "the steps inside match: return self.skip(x) + h, "
                                            "h being conv2's output"))
    _probe_module(mine, x, emb, what=what)
    return "norm -> SiLU -> conv, time added per channel, zero-init conv, skip (1x1 when needed)"


# -- SelfAttention --


def _attention_variants(a: nn.Module, x: Tensor) -> dict[str, Tensor]:
    B, C, H, W = x.shape
    heads, N = a.heads, H * W
    d = C // heads
    tokens = a.norm(x).flatten(2).transpose(1, 2)                 # (B, N, C)
    q, k, v = a.qkv(tokens).chunk(3, dim=-1)                     # (B, N, C)

    def split(z):
        return z.view(B, N, heads, d).transpose(1, 2)            # (B, heads, N, d)

    def attend(q, k, v, *, scale=math.sqrt(d), dim=-1):
        return (q @ k.transpose(-1, -2) / scale).softmax(dim=dim) @ v  # (B, heads, N, d)

    def merge(o):
        return o.transpose(1, 2).reshape(B, N, C)

    def finish(out, *, residual=x, proj=True):                   # (B, N, C) -> (B, C, H, W)
        out = (a.proj(out) if proj else out).transpose(1, 2).reshape(B, C, H, W)
        return out if residual is None else residual + out

    def from_tokens(tokens):                                     # the rest done right
        q, k, v = a.qkv(tokens).chunk(3, dim=-1)
        return finish(merge(attend(split(q), split(k), split(v))))

    right = attend(split(q), split(k), split(v))
    wrong_split = attend(*(z.reshape(B, heads, N, d) for z in (q, k, v)))
    whole = [z[:, None] for z in (q, k, v)]                      # (B, 1, N, C): one head
    return {
        "the scores are not scaled — divide q kᵀ by sqrt(d), d = C // heads":
            finish(merge(attend(split(q), split(k), split(v), scale=1.0))),
        "the scores are divided by d — divide by sqrt(d), d = C // heads":
            finish(merge(attend(split(q), split(k), split(v), scale=d))),
        "the scores are divided by sqrt(C) — d is the width of one head: sqrt(d), "
        "d = C // heads": finish(merge(attend(split(q), split(k), split(v), scale=math.sqrt(C)))),
        "softmax runs over the wrong axis — normalise over the keys (the last axis, dim=-1)":
            finish(merge(attend(split(q), split(k), split(v), dim=-2))),
        "q and k are swapped — the scores are q kᵀ (queries on the rows), softmax over the "
        "keys": finish(merge(attend(split(k), split(q), split(v)))),
        "the residual is missing — return x + the attention output":
            finish(merge(right), residual=None),
        "the residual adds norm(x) — add the block's input x itself":
            finish(merge(right), residual=a.norm(x)),
        "the output projection self.proj is missing — apply it to the merged heads (B, N, C)":
            finish(merge(right), proj=False),
        "GroupNorm is missing — the tokens come from self.norm(x)":
            from_tokens(x.flatten(2).transpose(1, 2)),
        "the tokens are made wrongly — (B, C, H, W) -> flatten(2).transpose(1, 2) gives "
        "(B, H*W, C); reshape(B, H*W, C) mixes channels and pixels":
            from_tokens(a.norm(x).reshape(B, N, C)),
        "the heads are not split — split q, k and v into heads, (B, N, C) -> "
        "view(B, N, heads, d).transpose(1, 2), and each head attends on its own":
            finish(attend(*whole, scale=math.sqrt(C))[:, 0]),
        "the heads are not split (q, k and v are used whole) — view(B, N, heads, d)"
        ".transpose(1, 2) first, and each head attends on its own":
            finish(attend(*whole)[:, 0]),
        "the heads are split wrongly — (B, N, C) -> view(B, N, heads, d).transpose(1, 2), "
        "not reshape(B, heads, N, d)": finish(wrong_split.reshape(B, N, C)),
        "the heads are split wrongly — (B, N, C) -> view(B, N, heads, d).transpose(1, 2), not "
        "reshape(B, heads, N, d) (the merge back is right)": finish(merge(wrong_split)),
        "the heads are merged wrongly — (B, heads, N, d) -> transpose(1, 2).reshape(B, N, C)":
            finish(right.reshape(B, N, C)),
        "the tokens go back to an image wrongly — (B, N, C) -> transpose(1, 2) before "
        "reshape(B, C, H, W)": x + a.proj(merge(right)).reshape(B, C, H, W),
    }


_ATTENTION_STEPS = [
    ("norm", "it gets the block's input x"),
    ("qkv", "it gets the tokens self.norm(x).flatten(2).transpose(1, 2), (B, H*W, C)"),
    ("proj", "it gets softmax(q kᵀ / sqrt(d)) v with the heads merged back: "
             "(B, heads, N, d) -> .transpose(1, 2).reshape(B, N, C)"),
]


def _attention_crash(trace: _Trace) -> str | None:
    failed = trace.failed()
    for name, should in _ATTENTION_STEPS:
        if name in failed:
            return f"self.{name} cannot take what it was given: {should}"
    if trace.finished("proj"):
        return ("turn the tokens back into an image: (B, N, C) -> .transpose(1, 2)"
                ".reshape(B, C, H, W), then add x")
    if trace.finished("qkv"):
        return ("q, k, v = self.qkv(tokens).chunk(3, dim=-1) are (B, N, C); split each into "
                "heads with .view(B, N, heads, d).transpose(1, 2), d = C // heads")
    return None


@exercise_check("Exercise 3 · Self-attention: every pixel looks at every other")
def check_self_attention(cls) -> str:
    B, C = 2, 16
    # heads = 2 first: with C = 16, d = 8, so sqrt(d), d and sqrt(C) are three numbers
    for heads, (H, W) in [(2, (5, 4)), (4, (4, 6)), (1, (3, 3))]:
        ref = _scramble(du.SelfAttention(C, heads=heads, groups=4), seed=heads)
        mine = _learner_copy(cls, ref, C, heads=heads, groups=4)
        x = torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(H * W))
        what = f"SelfAttention({C}, heads={heads}) on a {H}x{W} map"
        parts = [name for name, _ in _ATTENTION_STEPS]
        with torch.no_grad(), _Trace(ref, parts) as ref_trace:
            expected = ref(x)                                     # the reference, before yours
        with torch.no_grad():
            wrong = _attention_variants(ref, x)
        with _Trace(mine, parts) as trace:
            out = _run(mine, x.clone(), what=what, names=("x",),
                       explain=lambda err: _attention_crash(trace))
        out = expect_tensor(out, shape=(B, C, H, W), what=f"{what}'s output",
                            shape_hint="the output has the input's shape (B, C, H, W): turn "
                                       "the tokens back with .transpose(1, 2).reshape(B, C, H, W)")
        compare(out, expected, wrong, what=f"{what}'s output", atol=1e-4, rtol=1e-3,
                term_hint=_first_difference(trace, ref_trace, _ATTENTION_STEPS,
                                            "the steps inside match up to self.proj: turn its "
                                            "output back into an image with .transpose(1, 2)"
                                            ".reshape(B, C, H, W) and add x"))
    _probe_module(mine, x, what=what)
    return "softmax(q kᵀ / sqrt(d)) v over heads, output projection, residual"


# -- UNet.forward --


def _unet_variants(m: nn.Module, x: Tensor, t: Tensor, kw: dict) -> dict[str, Tensor]:
    def forward(*, middle=True, skip_first=False, mask=True):
        emb = m.embed(t, kw.get("labels"))
        cond = (kw.get("context"), kw.get("context_mask") if mask else None)
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

    variants = {"the middle block is skipped — run self.middle between the down and up paths":
                forward(middle=False),
                "the skip comes first in the concatenation — use torch.cat([h, skip], dim=1)":
                forward(skip_first=True)}
    if kw.get("context_mask") is not None:
        variants["context_mask is not passed on — every level takes "
                 "level(h, emb, context, context_mask)"] = forward(mask=False)
    return variants


def _unet_parts(model: nn.Module) -> list[str]:
    n = len(model.down)
    return (["in_conv"] + [f"{kind}.{i}" for i in range(n) for kind in ("down", "downsample")]
            + ["middle"] + [f"{kind}.{i}" for i in range(n) for kind in ("up", "upsample")]
            + ["out"])


def _unet_steps(model: nn.Module) -> list[tuple[str, str]]:
    n = len(model.down)
    return ([("in_conv", "it gets x"), ("down.0", "the first down level gets self.in_conv(x)")]
            + [(f"down.{i}", f"down level {i} gets the previous level's output, downsampled")
               for i in range(1, n)]
            + [("middle", "it gets the last down level's output")]
            + [(f"up.{i}", f"up level {i} gets torch.cat([h, skips.pop()], dim=1): h from the "
                           f"level before (upsampled), the skip kept by down level {n - 1 - i}")
               for i in range(n)]
            + [("out", "it gets the last up level's output")])


def _unet_level_inputs(trace: _Trace, ref_trace: _Trace, model: nn.Module, kw: dict, *,
                       what: str) -> None:
    """Fail when a level got the wrong time embedding, context or mask (its other inputs)."""
    levels = [f"down.{i}" for i in range(len(model.down))] + ["middle"] + [
        f"up.{i}" for i in range(len(model.up))]
    for name in levels:
        mine, ref = trace.level_inputs(name), ref_trace.level_inputs(name)
        if mine is None or ref is None:
            continue
        if not isinstance(mine["emb"], Tensor) or not close(mine["emb"], ref["emb"],
                                                            atol=1e-4, rtol=1e-3):
            fail(f"{what}: self.{name} got another time embedding than self.embed(t, labels) "
                 "— compute emb = self.embed(t, labels) once and pass it to every level")
        if kw.get("context") is not None and mine["context"] is None:
            fail(f"{what}: self.{name} got no context — pass it to every level: "
                 "level(h, emb, context, context_mask)")


def _unet_crash(trace: _Trace, model: nn.Module, x: Tensor, err: Exception) -> str | None:
    """Name the cause of a crash inside the learner's UNet.forward, if it is a usual one."""
    c, B, n = model.config, x.shape[0], len(model.up)
    first = trace.level_inputs("down.0")
    if (first is not None and not trace.started("in_conv") and isinstance(first["h"], Tensor)
            and first["h"].shape[1] == x.shape[1]):
        return "start with h = self.in_conv(x): the first level expects its channels"
    for name in [f"down.{i}" for i in range(n)] + ["middle"] + [f"up.{i}" for i in range(n)]:
        inputs = trace.level_inputs(name)
        if inputs is None:
            continue
        emb = inputs["emb"]
        if emb is None:
            return "pass the time embedding to every level: level(h, emb, context, context_mask)"
        if isinstance(emb, Tensor) and tuple(emb.shape) == (B, c.base_channels):
            return ("the levels get self.embed(t, labels): it runs the sinusoidal embedding "
                    "through the time MLP (and adds the label's embedding)")
        if c.context_dim is not None and inputs["context"] is None:
            return "pass the context to every level: level(h, emb, context, context_mask)"
    for i in range(n):
        inputs = trace.level_inputs(f"up.{i}")
        if inputs is None or not isinstance(inputs["h"], Tensor):
            continue
        level, h = model.up[i], inputs["h"]
        if h.shape[0] != B:
            return ("the skip was concatenated along dim=0 (the batch) — concatenate the "
                    "channels: torch.cat([h, skip], dim=1)")
        if h.shape[1] == level.in_channels - level.skip_channels:
            ref_size = trace.first_input("middle").shape[2:] if i == 0 else None
            if ref_size is not None and tuple(h.shape[2:]) != tuple(ref_size):
                axis = 2 if h.shape[2] != ref_size[0] else 3
                return (f"the skip was concatenated along dim={axis} (a spatial axis) — "
                        "concatenate the channels: torch.cat([h, skip], dim=1)")
            return ("the up level got h without its skip — h = torch.cat([h, skips.pop()], "
                    "dim=1) before each up level")
        if h.shape[1] != level.in_channels:
            return (f"up level {i} expects {level.in_channels} channels: h "
                    f"({level.in_channels - level.skip_channels}) and the skip of down level "
                    f"{n - 1 - i} ({level.skip_channels}); it got {h.shape[1]} — keep each "
                    "skip right after its down level: h = level(h, ...), then skips.append(h)")
    if not isinstance(err, RuntimeError) or "Sizes of tensors must match" not in str(err):
        return None
    # torch.cat met a skip of another resolution: where did the up path stop?
    if not any(trace.started(f"downsample.{i}") for i in range(n - 1)):
        return "downsample after each down level: h = down(h) (Identity after the last)"
    for i in range(n):
        up, upsample = f"up.{i}", f"upsample.{i}"
        if trace.started(upsample) and not trace.started(up):
            return ("upsample after each up level, not before it: h = up(level(h, ...)); the "
                    "deepest level works at the middle's resolution")
        if trace.finished(up) and not trace.started(upsample) and i < n - 1:
            return ("upsample after each up level: h = up(h), so that h reaches the next "
                    "skip's resolution")
    if trace.finished("middle") and not trace.started("up.0"):
        return ("the deepest up level got the skip of the top level — take the skips back "
                "last in, first out: skips.pop(), not skips.pop(0)")
    return ("an up level met a skip of another resolution: keep each skip right after its "
            "down level, before downsampling (skips.append(h), then h = down(h)), and take "
            "each one back once, with skips.pop()")


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
    probe = None  # the case without labels and context (their checks need values)
    for config, x, t, kw in _unet_cases():
        torch.manual_seed(0)
        ref = _scramble(du.UNet(config), seed=1)
        mine = _learner_copy(cls, ref, config)
        what = "your UNet's forward" + (" with labels and a context" if kw else "")
        parts = _unet_parts(ref)
        with torch.no_grad(), _Trace(ref, parts) as ref_trace:
            expected = ref(x, t, **kw)                            # the reference, before yours
        with torch.no_grad():
            wrong = _unet_variants(ref, x, t, kw)
        inputs = {k: v.clone() for k, v in kw.items()}
        with _Trace(mine, parts) as trace:
            out = _run(mine, x.clone(), t.clone(), what=what, names=("x", "t"),
                       explain=lambda err: _unet_crash(trace, mine, x, err), **inputs)
        if isinstance(out, Tensor) and out.dim() == 4 and out.shape[1] == config.base_channels:
            fail(f"{what} returns the last feature map — finish with self.out(h)")
        out = expect_tensor(out, shape=tuple(x.shape), what=f"{what}'s output",
                            shape_hint="the output has x's shape: finish with self.out(h)")
        if not close(out, expected, atol=1e-4, rtol=1e-3):
            _unet_level_inputs(trace, ref_trace, ref, kw, what=what)
        compare(out, expected, wrong, what=f"{what}'s output", atol=1e-4, rtol=1e-3,
                item_names=[f"t = {v}" for v in t.tolist()],
                term_hint=_first_difference(trace, ref_trace, _unet_steps(ref),
                                            "every level got the right input: finish with "
                                            "self.out(h)"))
        probe = probe or (mine, x, t, what)
    _probe_module(*probe[:3], what=probe[3])
    return "down path with skips, middle, up path concatenating skips last-in first-out"
