"""Tests of lesson 02's exercise checks: the reference passes, a stub is "not attempted", right
versions written in other forms pass, and each planted mistake (the ones learners make, an
input changed in place, a tensor made on the CPU, a NaN) fails with a hint that names it."""
import math

import pytest
import torch
import torch.nn.functional as F

import diffusion_checks as dc
import diffusion_utilities as du

from check_helpers import DEVICE, GENERIC, IN_PLACE, NAN, cases  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


# -- sinusoidal_embedding --


def _sinusoid(t, dim, *, max_period=10000, cos_first=False, denom=None, times=True,
              interleave=False, as_float32=False, exponent_sign=-1, first_i=0, factor=1.0,
              log=math.log, shift=0):
    dtype = torch.float32 if as_float32 or not t.is_floating_point() else t.dtype
    half = dim // 2
    i = torch.arange(first_i, first_i + half, device=t.device, dtype=dtype)
    freqs = torch.exp(exponent_sign * log(max_period) * i / (half if denom is None else denom(dim)))
    angles = factor * ((t.to(dtype)[:, None] + shift) if times else torch.ones(
        len(t), 1, dtype=dtype, device=t.device)) * freqs
    if interleave:
        return torch.stack([angles.sin(), angles.cos()], dim=-1).reshape(len(t), dim)
    parts = [angles.cos(), angles.sin()] if cos_first else [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1)


def sinusoid_with(**options):
    def sinusoidal_embedding(t, dim, *, max_period=10000):
        return _sinusoid(t, dim, max_period=max_period, **options)
    return sinusoidal_embedding


def sinusoid_stub(t, dim, *, max_period=10000):
    raise NotImplementedError()


def sinusoid_math_log(t, dim, *, max_period=10000):
    half = dim // 2
    dtype = t.dtype if t.is_floating_point() else torch.float32
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    angles = t[:, None].to(dtype) * freqs[None].to(dtype)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


def sinusoid_stack_flatten_float64(t, dim, *, max_period=10000):
    half = dim // 2
    i = torch.arange(half, device=t.device, dtype=torch.float64)
    angles = t.double()[:, None] / max_period ** (2 * i / dim)     # ω_i = 1 / max_period^(i/half)
    emb = torch.stack([angles.sin(), angles.cos()], dim=1).flatten(1)  # (B, 2, half) -> (B, dim)
    return emb.to(t.dtype if t.is_floating_point() else torch.float32)


def sinusoid_outer_loop(t, dim, *, max_period=10000):
    dtype = t.dtype if t.is_floating_point() else torch.float32
    i = torch.arange(dim // 2, dtype=dtype).to(t.device)
    freqs = 1.0 / torch.pow(torch.tensor(float(max_period), dtype=dtype), i / (dim // 2))
    rows = [torch.cat([torch.sin(ti * freqs), torch.cos(ti * freqs)]) for ti in t.to(dtype)]
    return torch.stack(rows)


def sinusoid_cpu_arange(t, dim, *, max_period=10000):
    half = dim // 2
    dtype = t.dtype if t.is_floating_point() else torch.float32
    freqs = max_period ** (-torch.arange(half, dtype=dtype) / half)  # made on the CPU
    angles = t.to(dtype)[:, None] * freqs[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sinusoid_in_place(t, dim, *, max_period=10000):
    t = t.double() if t.is_floating_point() else t.float()  # a float t comes back as itself
    half = dim // 2
    freqs = max_period ** (-torch.arange(half, device=t.device, dtype=t.dtype) / half)
    angles = t.unsqueeze_(1) * freqs                     # unsqueeze_ changes t itself
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sinusoid_reshaped(shape_of):
    def sinusoidal_embedding(t, dim, *, max_period=10000):
        return shape_of(_sinusoid(t, dim, max_period=max_period), dim)
    return sinusoidal_embedding


def sinusoid_nan(t, dim, *, max_period=10000):
    return _sinusoid(t, dim, max_period=max_period).sub(2).sqrt()


SINUSOID_MISTAKES = [
    ("cos_first", sinusoid_with(cos_first=True), "cosines come first"),
    ("divides_by_dim", sinusoid_with(denom=lambda dim: dim), "divides by dim"),
    ("divides_by_half_minus_1", sinusoid_with(denom=lambda dim: dim // 2 - 1),
     "divides by half - 1"),
    ("no_times", sinusoid_with(times=False), "multiply the frequencies by the timesteps"),
    ("interleaved", sinusoid_with(interleave=True), "interleaved"),
    ("float32_for_float64_t", sinusoid_with(as_float32=True), "dtype should follow t"),
    ("fixed_max_period", lambda t, dim, *, max_period=10000: _sinusoid(t, dim),
     "max_period is ignored"),
    ("positive_exponent", sinusoid_with(exponent_sign=1), "the frequencies grow"),
    ("i_from_1", sinusoid_with(first_i=1), "i starts at 1"),
    ("two_pi", sinusoid_with(factor=2 * math.pi), "there is no 2π"),
    ("log10", sinusoid_with(log=math.log10), "log10 where the natural log belongs"),
    ("transposed", sinusoid_reshaped(lambda emb, dim: emb.T), "transposed — one row per timestep"),
    ("cat_dim_0", sinusoid_reshaped(lambda emb, dim: torch.cat(emb.chunk(2, dim=1), dim=0)),
     "stacked along dim=0"),
    ("only_sines", sinusoid_reshaped(lambda emb, dim: emb[:, :dim // 2]),
     "only half the features"),
    ("stacked", sinusoid_reshaped(lambda emb, dim: torch.stack(emb.chunk(2, dim=1), dim=1)),
     "flatten the stacked sines and cosines"),
    ("cpu_arange", sinusoid_cpu_arange, DEVICE),
    ("in_place", sinusoid_in_place, f"input `t` {IN_PLACE}"),
    ("nan", sinusoid_nan, NAN),
    ("t_plus_one", sinusoid_with(shift=1),
     f"{GENERIC} (largest difference 0.956 at item 1 (t = 1)); the largest difference is in "
     "column 4, which holds cos(t ω_0)"),
]
SINUSOID_RIGHT = [("math_log", sinusoid_math_log),
                  ("stack_flatten_float64", sinusoid_stack_flatten_float64),
                  ("outer_loop", sinusoid_outer_loop)]


# -- ResBlock: the learner writes forward; __init__ (hence parameter names) is du's --


class ResBlockStub(du.ResBlock):
    def forward(self, x, emb):
        raise NotImplementedError()


class ResBlockLearner(du.ResBlock):
    """The right forward, with the usual mistakes behind switches."""
    time_at, silu1, silu2, time_silu, skip_of, norm_2, combine = (
        "after_conv1", True, True, False, "x", "norm2", "add")

    def forward(self, x, emb):
        act1 = F.silu if self.silu1 else (lambda z: z)
        act2 = F.silu if self.silu2 else (lambda z: z)
        temb = self.time_proj(emb)[:, :, None, None]
        temb = F.silu(temb) if self.time_silu is True else temb
        if self.time_silu == "skipped":
            temb = self.time_proj[-1](emb)[:, :, None, None]
        if self.time_at == "before_conv1":
            x_in = x + temb
        else:
            x_in = x
        h = self.conv1(act1(self.norm1(x_in)))
        if self.time_at == "after_conv1":
            h = h * temb if self.combine == "multiply" else h + temb
        norm = self.norm2 if self.norm_2 == "norm2" else self.norm1
        h = norm(h)
        if self.time_at == "after_norm2":
            h = h + temb
        h = self.conv2(self.dropout(act2(h)))
        if self.time_at == "after_conv2":
            h = h + temb
        if self.skip_of == "none":
            return h
        return self.skip(h if self.skip_of == "h" else x) + h


def res_block(**options):
    return type("ResBlock", (ResBlockLearner,), options)


class ResBlockActFirst(du.ResBlock):
    def forward(self, x, emb):
        h = self.conv1(self.norm1(F.silu(x))) + self.time_proj(emb)[:, :, None, None]
        return self.skip(x) + self.conv2(self.norm2(F.silu(h)))


class ResBlockNoProjection(du.ResBlock):
    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x))) + self.time_proj(emb)[:, :, None, None]
        return x + self.conv2(F.silu(self.norm2(h)))


class ResBlockTimeLastAxis(du.ResBlock):
    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x))) + self.time_proj(emb)[:, None, None, :]
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class ResBlockNoTimeProj(du.ResBlock):
    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x))) + emb[:, :, None, None]
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class ResBlockInPlace(du.ResBlock):
    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x))) + self.time_proj(emb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        x = self.skip(x)                  # the Identity gives back x itself when in_ch == out_ch
        x += h
        return x


class ResBlockCpuTensor(du.ResBlock):
    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_proj(emb).view(len(emb), -1, 1, 1) + torch.zeros(1, h.shape[1], 1, 1)
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class ResBlockNaN(du.ResBlock):
    def forward(self, x, emb):
        return du.ResBlock.forward(self, x, emb).log()


class ResBlockRelu(du.ResBlock):
    def forward(self, x, emb):
        h = self.conv1(F.relu(self.norm1(x))) + self.time_proj(emb)[:, :, None, None]
        return self.skip(x) + self.conv2(F.relu(self.norm2(h)))


class ResBlockUnsqueeze(du.ResBlock):
    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_proj(emb).unsqueeze(-1).unsqueeze(-1)
        h = self.conv2(F.dropout(F.silu(self.norm2(h)), p=0.0, training=self.training))
        return h + (x if isinstance(self.skip, torch.nn.Identity) else self.skip(x))


class ResBlockFunctional(du.ResBlock):
    def forward(self, x, emb):
        h = F.group_norm(x, self.norm1.num_groups, self.norm1.weight, self.norm1.bias)
        h = self.conv1(h * torch.sigmoid(h))                 # SiLU written out
        t_emb = self.time_proj(emb)
        h = h + t_emb.view(*t_emb.shape, 1, 1)
        h = self.conv2(F.silu(self.norm2(h)))
        return torch.add(h, self.skip(x))


RES_BLOCK_MISTAKES = [
    ("no_time", res_block(time_at="nowhere"), "time embedding is never added"),
    ("time_after_conv2", res_block(time_at="after_conv2"), "added after the second conv"),
    ("no_skip", res_block(skip_of="none"), "skip connection is missing"),
    ("x_without_skip_conv", ResBlockNoProjection, "must go through self.skip"),
    ("act_first", ResBlockActFirst, "wrong order"),
    ("skip_of_h", res_block(skip_of="h"), "not h + h (self.skip applied to h)"),
    ("time_before_conv1", res_block(time_at="before_conv1"), "added to x before the first conv"),
    ("norm1_twice", res_block(norm_2="norm1"), "norm1 is used twice"),
    ("time_after_norm2", res_block(time_at="after_norm2"), "added after norm2"),
    ("time_multiplies", res_block(combine="multiply"), "the time embedding multiplies h"),
    ("time_silu_twice", res_block(time_silu=True), "SiLU is applied to the time embedding twice"),
    ("time_silu_skipped", res_block(time_silu="skipped"), "skips the SiLU at the start of"),
    ("no_silu", res_block(silu1=False, silu2=False), "SiLU is missing after both GroupNorms"),
    ("no_silu_1", res_block(silu1=False), "SiLU is missing after norm1"),
    ("no_silu_2", res_block(silu2=False), "SiLU is missing after norm2"),
    ("time_last_axis", ResBlockTimeLastAxis, "must become (B, out_ch, 1, 1)"),
    ("no_time_proj", ResBlockNoTimeProj, "project the time embedding first"),
    ("in_place", ResBlockInPlace, f"input `x` {IN_PLACE}"),
    ("cpu_tensor", ResBlockCpuTensor, DEVICE),
    ("nan", ResBlockNaN, NAN),
    ("relu", ResBlockRelu,
     f"{GENERIC} (largest difference 0.463 at index (1, 2, 2, 4)); what goes into self.conv1 "
     "differs: conv1 gets SiLU(norm1(x))"),
]
RES_BLOCK_RIGHT = [("switches_off", ResBlockLearner), ("unsqueeze", ResBlockUnsqueeze),
                   ("functional", ResBlockFunctional)]


# -- SelfAttention --


class Attention(du.SelfAttention):
    """softmax(q kᵀ / sqrt(d)) v written out, with the usual mistakes behind switches."""
    scale, softmax_dim, residual, split, merge, tokens, proj_on, norm_on, qk = (
        "sqrt_d", -1, "x", "view", "transpose", "flatten", True, True, "qk")

    def forward(self, x):
        B, C, H, W = x.shape
        N, d = H * W, C // self.heads
        normed = self.norm(x) if self.norm_on else x
        tokens = normed.flatten(2).transpose(1, 2) if self.tokens == "flatten" else (
            normed.reshape(B, N, C))
        q, k, v = self.qkv(tokens).chunk(3, dim=-1)
        heads = self.heads
        if self.split == "view":
            q, k, v = (z.view(B, N, heads, d).transpose(1, 2) for z in (q, k, v))
        elif self.split == "reshape":
            q, k, v = (z.reshape(B, heads, N, d) for z in (q, k, v))
        else:                                                    # one head of width C
            q, k, v = (z[:, None] for z in (q, k, v))
        if self.qk == "kq":
            q, k = k, q
        divide = {"sqrt_d": math.sqrt(d), "none": 1.0, "d": d, "sqrt_C": math.sqrt(C)}[self.scale]
        out = (q @ k.transpose(-1, -2) / divide).softmax(dim=self.softmax_dim) @ v
        if self.merge == "transpose":
            out = out.transpose(1, 2).reshape(B, N, C)           # (B, heads, N, d) -> (B, N, C)
        else:
            out = out.reshape(B, N, C)
        out = self.proj(out) if self.proj_on else out
        out = out.transpose(1, 2).reshape(B, C, H, W)
        return {"x": x + out, "none": out, "normed": self.norm(x) + out}[self.residual]


def attention(**options):
    return type("SelfAttention", (Attention,), options)


class AttentionStub(du.SelfAttention):
    def forward(self, x):
        raise NotImplementedError()


class AttentionSDPA(du.SelfAttention):
    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x).view(B, C, H * W).permute(0, 2, 1)).split(C, dim=2)
        q, k, v = (z.unflatten(-1, (self.heads, C // self.heads)).transpose(1, 2)
                   for z in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        out = self.proj(out.transpose(1, 2).flatten(2))
        return x + out.permute(0, 2, 1).reshape(B, C, H, W)


class AttentionEinsum(du.SelfAttention):
    def forward(self, x):
        B, C, H, W = x.shape
        d = C // self.heads
        tokens = torch.einsum("bchw->bhwc", self.norm(x)).reshape(B, H * W, C)
        q, k, v = (z.reshape(B, H * W, self.heads, d) for z in self.qkv(tokens).chunk(3, -1))
        scale = torch.tensor(d, dtype=x.dtype).rsqrt()       # a 0-dim CPU tensor: fine anywhere
        weights = torch.softmax(torch.einsum("bnhd,bmhd->bhnm", q, k) * scale, dim=-1)
        out = torch.einsum("bhnm,bmhd->bnhd", weights, v).reshape(B, H * W, C)
        return x + self.proj(out).transpose(1, 2).reshape(B, C, H, W)


class AttentionHeadLoop(du.SelfAttention):
    def forward(self, x):
        B, C, H, W = x.shape
        d = C // self.heads
        q, k, v = self.qkv(self.norm(x).flatten(2).transpose(1, 2)).chunk(3, dim=-1)
        outs = []
        for h in range(self.heads):                           # one head at a time
            part = slice(h * d, (h + 1) * d)
            scores = torch.bmm(q[..., part], k[..., part].transpose(1, 2)) / math.sqrt(d)
            outs.append(torch.bmm(scores.softmax(dim=-1), v[..., part]))
        out = self.proj(torch.cat(outs, dim=-1))
        return x + out.transpose(1, 2).reshape(B, C, H, W)


class AttentionInPlace(Attention):
    def forward(self, x):
        out = Attention.forward(self, x) - x
        x += out
        return x


class AttentionCpuMask(Attention):
    def forward(self, x):
        B, C, H, W = x.shape
        N, d = H * W, C // self.heads
        q, k, v = self.qkv(self.norm(x).flatten(2).transpose(1, 2)).chunk(3, dim=-1)
        q, k, v = (z.view(B, N, self.heads, d).transpose(1, 2) for z in (q, k, v))
        bias = torch.zeros(N, N)                              # made on the CPU
        out = ((q @ k.transpose(-1, -2)) / math.sqrt(d) + bias).softmax(dim=-1) @ v
        out = self.proj(out.transpose(1, 2).reshape(B, N, C))
        return x + out.transpose(1, 2).reshape(B, C, H, W)


class AttentionNaN(Attention):
    def forward(self, x):
        return Attention.forward(self, x) * math.nan


class AttentionNoTranspose(Attention):
    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x).flatten(2)).chunk(3, dim=-1)   # (B, C, N): not tokens
        return x + (q @ k.transpose(-1, -2)).softmax(-1) @ v


class AttentionSigmoid(Attention):
    def forward(self, x):
        B, C, H, W = x.shape
        N, d = H * W, C // self.heads
        q, k, v = self.qkv(self.norm(x).flatten(2).transpose(1, 2)).chunk(3, dim=-1)
        q, k, v = (z.view(B, N, self.heads, d).transpose(1, 2) for z in (q, k, v))
        out = torch.sigmoid(q @ k.transpose(-1, -2) / math.sqrt(d)) @ v
        out = self.proj(out.transpose(1, 2).reshape(B, N, C))
        return x + out.transpose(1, 2).reshape(B, C, H, W)


ATTENTION_MISTAKES = [
    ("no_scale", attention(scale="none"), "not scaled"),
    ("softmax_axis", attention(softmax_dim=-2), "wrong axis"),
    ("no_residual", attention(residual="none"), "residual is missing"),
    ("split_reshape", attention(split="reshape", merge="reshape"), "heads are split wrongly"),
    ("split_reshape_merge_transpose", attention(split="reshape"), "heads are split wrongly"),
    ("merge_reshape", attention(merge="reshape"), "heads are merged wrongly"),
    ("scale_d", attention(scale="d"), "divided by d"),
    ("scale_sqrt_C", attention(scale="sqrt_C"), "divided by sqrt(C)"),
    ("k_q_swapped", attention(qk="kq"), "q and k are swapped"),
    ("residual_of_norm", attention(residual="normed"), "the residual adds norm(x)"),
    ("no_proj", attention(proj_on=False), "the output projection self.proj is missing"),
    ("no_norm", attention(norm_on=False), "GroupNorm is missing"),
    ("tokens_reshape", attention(tokens="reshape"), "the tokens are made wrongly"),
    ("one_head_sqrt_C", attention(split="none", scale="sqrt_C"), "the heads are not split"),
    ("one_head_sqrt_d", attention(split="none"), "the heads are not split"),
    ("no_transpose_crash", AttentionNoTranspose, "self.qkv cannot take what it was given"),
    ("in_place", AttentionInPlace, f"input `x` {IN_PLACE}"),
    ("cpu_bias", AttentionCpuMask, DEVICE),
    ("nan", AttentionNaN, NAN),
    ("sigmoid", AttentionSigmoid,
     f"{GENERIC} (largest difference 22.3 at index (1, 12, 3, 3)); what goes into self.proj "
     "differs: it gets softmax(q kᵀ / sqrt(d)) v"),
]
ATTENTION_RIGHT = [("explicit", Attention), ("sdpa", AttentionSDPA), ("einsum", AttentionEinsum),
                   ("head_loop", AttentionHeadLoop)]


# -- UNet.forward --


class UNetVariant(du.UNet):
    """The right forward, with the usual mistakes behind switches."""
    pop, concat, emb_kind, keep_middle, skip_first, cat_dim, in_conv_on, order, mask_on = (
        "last", True, "embed", True, False, 1, True, "level_then_up", True)
    skip_when, downsample_on, context_on, x_in_place = "after_level", True, True, False

    def forward(self, x, t, *, labels=None, context=None, context_mask=None):
        self.check_inputs(x, t, labels, context, context_mask)
        if self.x_in_place:
            x.clamp_(-1, 1)
        emb = {"embed": lambda: self.embed(t, labels), "t": lambda: t,
               "sinusoid": lambda: du.sinusoidal_embedding(t, self.config.base_channels),
               "none": lambda: None,
               "no_label": lambda: self.time_mlp(du.sinusoidal_embedding(
                   t, self.config.base_channels))}[self.emb_kind]()
        cond = (context if self.context_on else None,
                context_mask if self.mask_on and self.context_on else None)
        h, skips = self.in_conv(x) if self.in_conv_on else x, []
        for level, down in zip(self.down, self.downsample):
            h = level(h, emb, *cond)
            if self.skip_when == "after_level":
                skips.append(h)
            h = down(h) if self.downsample_on else h
            if self.skip_when == "after_down":
                skips.append(h)
        if self.keep_middle:
            h = self.middle(h, emb, *cond)
        for level, up in zip(self.up, self.upsample):
            skip = {"last": skips.pop, "first": lambda: skips.pop(0),
                    "peek": lambda: skips[-1]}[self.pop]()
            if self.order == "up_then_level":
                h = up(h)
            if self.concat:
                h = torch.cat([skip, h] if self.skip_first else [h, skip], dim=self.cat_dim)
            h = level(h, emb, *cond)
            if self.order == "level_then_up":
                h = up(h)
        return self.out(h)


def unet(**options):
    return type("MyUNet", (UNetVariant,), options)


class UNetStub(du.UNet):
    def forward(self, x, t, *, labels=None, context=None, context_mask=None):
        raise NotImplementedError()


class UNetReversedSkips(du.UNet):
    """Keeps every skip, then walks them in reverse with zip; keyword arguments to the levels."""
    def forward(self, x, t, *, labels=None, context=None, context_mask=None):
        self.check_inputs(x, t, labels, context, context_mask)
        emb, h, skips = self.embed(t, labels), self.in_conv(x), []
        for level, down in zip(self.down, self.downsample):
            h = level(h, emb=emb, context=context, context_mask=context_mask)
            skips.append(h)
            h = down(h)
        h = self.middle(h, emb, context=context, context_mask=context_mask)
        for level, up, skip in zip(self.up, self.upsample, reversed(skips)):
            h = up(level(torch.cat((h, skip), 1), emb, context=context, context_mask=context_mask))
        return self.out(h)


class UNetFrontStack(du.UNet):
    """A stack kept at the front of the list: insert(0, h) in, pop(0) out — still last in,
    first out."""
    def forward(self, x, t, *, labels=None, context=None, context_mask=None):
        self.check_inputs(x, t, labels, context, context_mask)
        emb = self.embed(t, labels)
        h, skips = self.in_conv(x), []
        for i in range(len(self.down)):
            h = self.down[i](h, emb, context, context_mask)
            skips.insert(0, h)
            h = self.downsample[i](h)
        h = self.middle(h, emb, context, context_mask)
        for i in range(len(self.up)):
            h = self.up[i](torch.cat([h, skips.pop(0)], dim=-3), emb, context, context_mask)
            h = self.upsample[i](h)
        return self.out(h)


class UNetCpuZeros(UNetVariant):
    def forward(self, x, t, **kwargs):
        out = UNetVariant.forward(self, x, t, **kwargs)
        return out + torch.zeros(1, out.shape[1], 1, 1)


class UNetNaN(UNetVariant):
    def forward(self, x, t, **kwargs):
        return UNetVariant.forward(self, x, t, **kwargs) * math.nan


class UNetNoOut(du.UNet):
    def forward(self, x, t, *, labels=None, context=None, context_mask=None):
        emb = self.embed(t, labels)
        h, skips = self.in_conv(x), []
        for level, down in zip(self.down, self.downsample):
            h = level(h, emb, context, context_mask)
            skips.append(h)
            h = down(h)
        h = self.middle(h, emb, context, context_mask)
        for level, up in zip(self.up, self.upsample):
            h = up(level(torch.cat([h, skips.pop()], dim=1), emb, context, context_mask))
        return h


class UNetLongSkip(UNetVariant):
    """Adds the first feature map to the last one (no such thing here)."""
    def forward(self, x, t, *, labels=None, context=None, context_mask=None):
        self.check_inputs(x, t, labels, context, context_mask)
        emb, h0 = self.embed(t, labels), self.in_conv(x)
        h, skips = h0, []
        for level, down in zip(self.down, self.downsample):
            h = level(h, emb, context, context_mask)
            skips.append(h)
            h = down(h)
        h = self.middle(h, emb, context, context_mask)
        for level, up in zip(self.up, self.upsample):
            h = up(level(torch.cat([h, skips.pop()], dim=1), emb, context, context_mask))
        return self.out(h + h0)


UNET_MISTAKES = [
    ("pop_first", unet(pop="first"), "last in, first out: skips.pop(), not skips.pop(0)"),
    ("no_concat", unet(concat=False), "the up level got h without its skip"),
    ("t_for_emb", unet(emb_kind="t"), "not t itself"),
    ("no_middle", unet(keep_middle=False), "middle block is skipped"),
    ("skip_first", unet(skip_first=True), "skip comes first"),
    ("cat_dim_0", unet(cat_dim=0), "concatenated along dim=0 (the batch)"),
    ("cat_dim_2", unet(cat_dim=2), "concatenated along dim=2 (a spatial axis)"),
    ("cat_dim_3", unet(cat_dim=3), "concatenated along dim=3 (a spatial axis)"),
    ("no_in_conv", unet(in_conv_on=False), "start with h = self.in_conv(x)"),
    ("no_emb", unet(emb_kind="none"), "pass the time embedding to every level"),
    ("raw_sinusoid", unet(emb_kind="sinusoid"), "runs the sinusoidal embedding through the time MLP"),
    ("no_labels_in_emb", unet(emb_kind="no_label"),
     "with labels and a context: self.down.0 got another time embedding than self.embed(t, "
     "labels)"),
    ("no_context", unet(context_on=False), "pass the context to every level"),
    ("no_context_mask", unet(mask_on=False), "context_mask is not passed on"),
    ("upsample_first", unet(order="up_then_level"), "upsample after each up level, not before it"),
    ("no_upsample", unet(order="no_upsample"), "upsample after each up level: h = up(h)"),
    ("no_downsample", unet(downsample_on=False), "downsample after each down level"),
    ("skip_after_downsample", unet(skip_when="after_down"), "keep each skip right after its"),
    ("skip_reused", unet(pop="peek"), "take each one back once, with skips.pop()"),
    ("no_out", UNetNoOut, "finish with self.out"),
    ("in_place", unet(x_in_place=True), f"input `x` {IN_PLACE}"),
    ("cpu_zeros", UNetCpuZeros, DEVICE),
    ("nan", UNetNaN, NAN),
    ("long_skip", UNetLongSkip,
     f"{GENERIC} (largest difference 0.464 at item 1 (t = 700)); what goes into self.out "
     "differs: it gets the last up level's output"),
]
UNET_RIGHT = [("reference_like", UNetVariant), ("reversed_skips", UNetReversedSkips),
              ("front_stack", UNetFrontStack)]


# ── the tests ──

CHECKS = {
    "sinusoidal": (dc.check_sinusoidal_embedding, du.sinusoidal_embedding, sinusoid_stub),
    "res_block": (dc.check_res_block, du.ResBlock, ResBlockStub),
    "attention": (dc.check_self_attention, du.SelfAttention, AttentionStub),
    "unet": (dc.check_unet_forward, du.UNet, UNetStub),
}
MISTAKES = {"sinusoidal": SINUSOID_MISTAKES, "res_block": RES_BLOCK_MISTAKES,
            "attention": ATTENTION_MISTAKES, "unet": UNET_MISTAKES}
RIGHT = {"sinusoidal": SINUSOID_RIGHT, "res_block": RES_BLOCK_RIGHT,
         "attention": ATTENTION_RIGHT, "unet": UNET_RIGHT}


@pytest.mark.parametrize("name", CHECKS)
def test_reference_passes(name, capsys):
    check, reference, _ = CHECKS[name]
    assert check(reference) is True
    assert dc.PASSED_MARK in capsys.readouterr().out


@pytest.mark.parametrize("name", CHECKS)
def test_stub_is_not_attempted(name, capsys):
    check, _, stub = CHECKS[name]
    assert check(stub) is False
    assert dc.NOT_ATTEMPTED_MARK in capsys.readouterr().out


def test_exercise_names_match_the_notebook_headings():
    assert [check.exercise for check, _, _ in CHECKS.values()] == [
        "Exercise 1 · Telling the network the time: the sinusoidal embedding",
        "Exercise 2 · The residual block, with the time injected",
        "Exercise 3 · Self-attention: every pixel looks at every other",
        "Exercise 4 · The whole UNet"]


@pytest.mark.parametrize("name, fn", cases(RIGHT, 2))
def test_right_versions_in_other_forms_pass(name, fn, capsys):
    assert CHECKS[name][0](fn) is True
    assert dc.PASSED_MARK in capsys.readouterr().out


@pytest.mark.parametrize("name, fn, hint", cases(MISTAKES, 3))
def test_planted_mistakes_fail_with_their_hint(name, fn, hint):
    with pytest.raises(AssertionError) as err:
        CHECKS[name][0](fn)
    assert hint in str(err.value), str(err.value)
    assert dc.BROADCAST_HINT not in str(err.value)


def test_every_check_has_in_place_device_and_nan_mistakes():
    for name in CHECKS:
        hints = [hint for _, _, hint in MISTAKES[name]]
        assert any(IN_PLACE in hint for hint in hints)
        assert DEVICE in hints
        assert any("NaN" in hint for hint in hints)
        assert len(RIGHT[name]) >= 2


def test_sinusoidal_missing_return_fails():
    def wrong(t, dim, *, max_period=10000):
        _sinusoid(t, dim, max_period=max_period)

    with pytest.raises(AssertionError, match="forget the `return`"):
        dc.check_sinusoidal_embedding(wrong)


def test_res_block_changed_init_fails():
    class Renamed(du.ResBlock):
        def __init__(self, in_ch, out_ch, time_dim, *, groups=8, dropout=0.0):
            super().__init__(in_ch, out_ch, time_dim, groups=groups, dropout=dropout)
            self.extra = torch.nn.Linear(2, 2)

    with pytest.raises(AssertionError, match="keep __init__"):
        dc.check_res_block(Renamed)


@pytest.mark.parametrize("module", [
    lambda: du.ResBlock(8, 16, 12, groups=4), lambda: du.SelfAttention(16, heads=4, groups=4),
    lambda: du.UNet(du.UNetConfig(base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
                                  attention_resolutions=(4,), heads=2, groups=4, image_size=8))],
    ids=["res_block", "attention", "unet"])
def test_the_module_probe_leaves_the_learners_module_where_it_was(module):
    """The probe moves a copy to the other device: the module the notebook holds stays put."""
    m = module().eval()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    args = {du.ResBlock: (torch.zeros(2, 8, 4, 4), torch.zeros(2, 12)),
            du.SelfAttention: (torch.zeros(2, 16, 4, 4),),
            du.UNet: (torch.zeros(2, 3, 8, 8), torch.tensor([1, 2]))}[type(m)]
    dc.lesson02._probe_module(m, *args, what="probe")
    assert all(v.device.type == "cpu" and torch.equal(v, before[k])
               for k, v in m.state_dict().items())
