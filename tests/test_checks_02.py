"""Lesson 02's exercise checks: the reference passes, a stub is "not attempted", and the
mistakes learners really make fail with their own hint."""
import math

import pytest
import torch
import torch.nn.functional as F

import diffusion_checks as dc
import diffusion_utilities as du


pytestmark = pytest.mark.usefixtures("one_thread")


# -- sinusoidal_embedding --


def _sinusoid(t, dim, *, max_period=10000, cos_first=False, denom=None, times=True,
              interleave=False, as_float32=False):
    dtype = torch.float32 if as_float32 or not t.is_floating_point() else t.dtype
    half = dim // 2
    i = torch.arange(half, dtype=dtype)
    freqs = max_period ** (-i / (half if denom is None else denom(dim)))
    angles = (t.to(dtype)[:, None] if times else torch.ones(len(t), 1, dtype=dtype)) * freqs
    if interleave:
        return torch.stack([angles.sin(), angles.cos()], dim=-1).reshape(len(t), dim)
    parts = [angles.cos(), angles.sin()] if cos_first else [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1)


def sinusoid_stub(t, dim, *, max_period=10000):
    raise NotImplementedError()


SINUSOID_MISTAKES = {
    "cosines come first": dict(cos_first=True),
    "divides by dim": dict(denom=lambda dim: dim),
    "divides by half - 1": dict(denom=lambda dim: dim // 2 - 1),
    "multiply the frequencies by the timesteps": dict(times=False),
    "interleaved": dict(interleave=True),
    "dtype should follow t": dict(as_float32=True),
}


def test_sinusoidal_reference_passes(capsys):
    assert dc.check_sinusoidal_embedding(du.sinusoidal_embedding) is True
    assert dc.PASSED_MARK in capsys.readouterr().out


def test_sinusoidal_stub_not_attempted(capsys):
    assert dc.check_sinusoidal_embedding(sinusoid_stub) is False
    assert dc.NOT_ATTEMPTED_MARK in capsys.readouterr().out


@pytest.mark.parametrize("hint", list(SINUSOID_MISTAKES))
def test_sinusoidal_mistakes(hint):
    options = SINUSOID_MISTAKES[hint]

    def wrong(t, dim, *, max_period=10000):
        return _sinusoid(t, dim, max_period=max_period, **options)

    with pytest.raises(AssertionError, match=hint):
        dc.check_sinusoidal_embedding(wrong)


def test_sinusoidal_ignoring_max_period_fails():
    def wrong(t, dim, *, max_period=10000):
        return _sinusoid(t, dim)

    with pytest.raises(AssertionError, match="max_period is ignored"):
        dc.check_sinusoidal_embedding(wrong)


def test_sinusoidal_missing_return_fails():
    def wrong(t, dim, *, max_period=10000):
        _sinusoid(t, dim, max_period=max_period)

    with pytest.raises(AssertionError, match="forget the `return`"):
        dc.check_sinusoidal_embedding(wrong)


# -- ResBlock: the learner writes forward; __init__ (hence parameter names) is du's --


class ResBlockStub(du.ResBlock):
    def forward(self, x, emb):
        raise NotImplementedError()


class ResBlockNoTime(du.ResBlock):
    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class ResBlockTimeLate(du.ResBlock):
    def forward(self, x, emb):
        h = self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))
        return self.skip(x) + h + self.time_proj(emb)[:, :, None, None]


class ResBlockNoSkip(du.ResBlock):
    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x))) + self.time_proj(emb)[:, :, None, None]
        return self.conv2(F.silu(self.norm2(h)))


class ResBlockNoProjection(du.ResBlock):
    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x))) + self.time_proj(emb)[:, :, None, None]
        return x + self.conv2(F.silu(self.norm2(h)))


class ResBlockActFirst(du.ResBlock):
    def forward(self, x, emb):
        h = self.conv1(self.norm1(F.silu(x))) + self.time_proj(emb)[:, :, None, None]
        return self.skip(x) + self.conv2(self.norm2(F.silu(h)))


RESBLOCK_MISTAKES = [
    (ResBlockNoTime, "time embedding is never added"),
    (ResBlockTimeLate, "added after the second conv"),
    (ResBlockNoSkip, "skip connection is missing"),
    (ResBlockNoProjection, "must go through self.skip"),
    (ResBlockActFirst, "wrong order"),
]


def test_res_block_reference_passes(capsys):
    assert dc.check_res_block(du.ResBlock) is True
    assert dc.PASSED_MARK in capsys.readouterr().out


def test_res_block_stub_not_attempted(capsys):
    assert dc.check_res_block(ResBlockStub) is False
    assert dc.NOT_ATTEMPTED_MARK in capsys.readouterr().out


@pytest.mark.parametrize("cls, hint", RESBLOCK_MISTAKES,
                         ids=[cls.__name__ for cls, _ in RESBLOCK_MISTAKES])
def test_res_block_mistakes(cls, hint):
    with pytest.raises(AssertionError, match=hint):
        dc.check_res_block(cls)


def test_res_block_changed_init_fails():
    class Renamed(du.ResBlock):
        def __init__(self, in_ch, out_ch, time_dim, *, groups=8, dropout=0.0):
            super().__init__(in_ch, out_ch, time_dim, groups=groups, dropout=dropout)
            self.extra = torch.nn.Linear(2, 2)

    with pytest.raises(AssertionError, match="keep __init__"):
        dc.check_res_block(Renamed)


# -- SelfAttention: explicit softmax(q kᵀ / sqrt(d)) v, with planted mistakes --


class Attention(du.SelfAttention):
    scale, softmax_dim, residual, split = True, -1, True, "view"

    def forward(self, x):
        B, C, H, W = x.shape
        N, d = H * W, C // self.heads
        q, k, v = self.qkv(self.norm(x).flatten(2).transpose(1, 2)).chunk(3, dim=-1)
        if self.split == "view":
            q, k, v = (z.view(B, N, self.heads, d).transpose(1, 2) for z in (q, k, v))
        else:
            q, k, v = (z.reshape(B, self.heads, N, d) for z in (q, k, v))
        scores = q @ k.transpose(-1, -2) / (math.sqrt(d) if self.scale else 1.0)
        out = scores.softmax(dim=self.softmax_dim) @ v
        if self.split == "view":
            out = out.transpose(1, 2).reshape(B, N, C)           # (B, heads, N, d) -> (B, N, C)
        else:
            out = out.reshape(B, N, C)
        out = self.proj(out).transpose(1, 2).reshape(B, C, H, W)
        return x + out if self.residual else out


class AttentionStub(du.SelfAttention):
    def forward(self, x):
        raise NotImplementedError()


ATTENTION_MISTAKES = [
    (dict(scale=False), "not scaled"),
    (dict(softmax_dim=-2), "wrong axis"),
    (dict(residual=False), "residual is missing"),
    (dict(split="reshape"), "heads are split wrongly"),
]


def test_attention_reference_and_explicit_version_pass(capsys):
    assert dc.check_self_attention(du.SelfAttention) is True
    assert dc.check_self_attention(Attention) is True
    assert capsys.readouterr().out.count(dc.PASSED_MARK) == 2


def test_attention_stub_not_attempted(capsys):
    assert dc.check_self_attention(AttentionStub) is False
    assert dc.NOT_ATTEMPTED_MARK in capsys.readouterr().out


@pytest.mark.parametrize("options, hint", ATTENTION_MISTAKES,
                         ids=[hint for _, hint in ATTENTION_MISTAKES])
def test_attention_mistakes(options, hint):
    wrong = type("WrongAttention", (Attention,), options)
    with pytest.raises(AssertionError, match=hint):
        dc.check_self_attention(wrong)


# -- UNet.forward --


class UNetVariant(du.UNet):
    pop_first, concat, pass_t, keep_middle, skip_first = False, True, False, True, False

    def forward(self, x, t, *, labels=None, context=None, context_mask=None):
        self.check_inputs(x, t, labels, context, context_mask)
        emb = t if self.pass_t else self.embed(t, labels)
        h, skips = self.in_conv(x), []
        for level, down in zip(self.down, self.downsample):
            h = level(h, emb, context, context_mask)
            skips.append(h)
            h = down(h)
        if self.keep_middle:
            h = self.middle(h, emb, context, context_mask)
        for level, up in zip(self.up, self.upsample):
            skip = skips.pop(0) if self.pop_first else skips.pop()
            if self.concat:
                h = torch.cat([skip, h] if self.skip_first else [h, skip], dim=1)
            h = up(level(h, emb, context, context_mask))
        return self.out(h)


class UNetStub(du.UNet):
    def forward(self, x, t, *, labels=None, context=None, context_mask=None):
        raise NotImplementedError()


UNET_MISTAKES = [
    (dict(pop_first=True), "met a skip of another resolution"),
    (dict(concat=False), "concatenate the skip first"),
    (dict(pass_t=True), "not t itself"),
    (dict(keep_middle=False), "middle block is skipped"),
    (dict(skip_first=True), "skip comes first"),
]


def test_unet_forward_reference_and_variant_pass(capsys):
    assert dc.check_unet_forward(du.UNet) is True
    assert dc.check_unet_forward(UNetVariant) is True
    assert capsys.readouterr().out.count(dc.PASSED_MARK) == 2


def test_unet_forward_stub_not_attempted(capsys):
    assert dc.check_unet_forward(UNetStub) is False
    assert dc.NOT_ATTEMPTED_MARK in capsys.readouterr().out


@pytest.mark.parametrize("options, hint", UNET_MISTAKES, ids=[h for _, h in UNET_MISTAKES])
def test_unet_forward_mistakes(options, hint):
    wrong = type("WrongUNet", (UNetVariant,), options)
    with pytest.raises(AssertionError, match=hint):
        dc.check_unet_forward(wrong)


def test_unet_forward_without_out_fails():
    class NoOut(du.UNet):
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

    with pytest.raises(AssertionError, match="finish with self.out"):
        dc.check_unet_forward(NoOut)
