"""Lesson 02's library section: the UNet and its blocks, input validation, the fast path."""
import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F

import diffusion_utilities as du


pytestmark = pytest.mark.usefixtures("one_thread")


SMALL = dict(base_channels=16, channel_mults=(1, 2, 2), num_res_blocks=1,
             attention_resolutions=(8,), heads=2, groups=4, image_size=16)


def small_unet(**overrides) -> du.UNet:
    torch.manual_seed(0)
    return du.UNet(du.UNetConfig(**{**SMALL, **overrides}))


def wake_up(module: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Give the zero-initialised layers small random weights, so every branch is active."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if not p.any():
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return module


def inputs(B=3, C=3, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, C, size, size, generator=g), torch.randint(0, 1000, (B,), generator=g)


# -- sinusoidal_embedding --


def test_sinusoidal_embedding_values_and_dtype():
    t = torch.tensor([0, 3])
    emb = du.sinusoidal_embedding(t, 8)
    assert emb.shape == (2, 8) and emb.dtype == torch.float32
    assert torch.equal(emb[0], torch.tensor([0.0] * 4 + [1.0] * 4))       # sin 0, cos 0
    freqs = 10000 ** (-torch.arange(4) / 4)
    assert torch.allclose(emb[1], torch.cat([(3 * freqs).sin(), (3 * freqs).cos()]))
    assert du.sinusoidal_embedding(t.double(), 8).dtype == torch.float64
    assert du.sinusoidal_embedding(t.to(torch.bfloat16), 8).dtype == torch.bfloat16


@pytest.mark.parametrize("t, dim, message", [(torch.zeros(2, 1), 8, "t of shape (B,)"),
                                             (torch.zeros(2), 7, "even dim")])
def test_sinusoidal_embedding_validates(t, dim, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        du.sinusoidal_embedding(t, dim)


# -- blocks --


def test_fresh_res_block_is_identity_and_projects_channels():
    torch.manual_seed(0)
    x, emb = torch.randn(2, 8, 5, 5), torch.randn(2, 12)
    same = du.ResBlock(8, 8, 12, groups=4)
    assert torch.equal(same(x, emb), x)                      # zero conv2 + identity skip
    wider = du.ResBlock(8, 16, 12, groups=4)
    assert torch.allclose(wider(x, emb), wider.skip(x))      # only the 1x1 projection is left
    assert isinstance(wider.skip, torch.nn.Conv2d) and wider.skip.kernel_size == (1, 1)


def test_res_block_uses_time_once_awake():
    torch.manual_seed(0)
    block = wake_up(du.ResBlock(8, 8, 12, groups=4))
    x = torch.randn(2, 8, 5, 5)
    assert not torch.allclose(block(x, torch.zeros(2, 12)), block(x, torch.ones(2, 12)))
    with pytest.raises(ValueError, match=r"emb of shape \(B, 12\).*not t itself"):
        block(x, torch.tensor([1, 2]))


def test_fresh_attention_blocks_are_identity():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 4, 4)
    assert torch.equal(du.SelfAttention(8, heads=2, groups=4)(x), x)
    context = torch.randn(2, 5, 6)
    assert torch.equal(du.CrossAttention(8, 6, heads=2, groups=4)(x, context), x)


def test_cross_attention_ignores_masked_tokens():
    torch.manual_seed(0)
    block = wake_up(du.CrossAttention(8, 6, heads=2, groups=4))
    x, context = torch.randn(2, 8, 4, 4), torch.randn(2, 5, 6)
    mask = torch.tensor([[True, True, False, False, False], [True] * 5])
    changed = context.clone()
    changed[0, 2:] = 100.0                                   # only masked tokens change
    assert torch.allclose(block(x, context, mask), block(x, changed, mask), atol=1e-6)
    assert not torch.allclose(block(x, context), block(x, changed))


def test_explicit_attention_matches_the_library():
    torch.manual_seed(0)
    a = wake_up(du.SelfAttention(8, heads=2, groups=4))
    x = torch.randn(2, 8, 3, 5)
    B, C, H, W = x.shape
    q, k, v = a.qkv(a.norm(x).flatten(2).transpose(1, 2)).chunk(3, dim=-1)
    q, k, v = (z.view(B, H * W, 2, 4).transpose(1, 2) for z in (q, k, v))
    out = ((q @ k.transpose(-1, -2)) / 2.0).softmax(-1) @ v          # sqrt(d) = sqrt(4)
    out = a.proj(out.transpose(1, 2).reshape(B, H * W, C)).transpose(1, 2).reshape(B, C, H, W)
    assert torch.allclose(a(x), x + out, atol=1e-5)


@pytest.mark.parametrize("make, message", [
    (lambda: du.ResBlock(6, 8, 4, groups=4), "divisible by groups=4"),
    (lambda: du.SelfAttention(10, heads=4, groups=2), "divisible by heads=4"),
])
def test_blocks_validate_channels(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_down_and_upsample_shapes():
    x = torch.randn(2, 8, 8, 6)
    assert du.Downsample(8)(x).shape == (2, 8, 4, 3)
    assert du.Upsample(8)(x).shape == (2, 8, 16, 12)


# -- the UNet --


def test_pixel_unet_shape_and_zero_output_when_fresh():
    model = small_unet()
    x, t = inputs()
    out = model(x, t)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(out, torch.zeros_like(x))             # the output conv starts at zero


def test_latent_unet_with_labels_and_context():
    model = wake_up(small_unet(in_channels=4, out_channels=4, num_classes=5, context_dim=6))
    x, t = inputs(C=4, size=8)
    labels = torch.tensor([0, 4, 5])                          # 5 = the "no label" index
    context = torch.randn(3, 7, 6)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[0, 3:] = False
    out = model(x, t, labels=labels, context=context, context_mask=mask)
    assert out.shape == x.shape
    other = model(x, t, labels=torch.tensor([1, 4, 5]), context=context, context_mask=mask)
    assert not torch.allclose(out[0], other[0]) and torch.allclose(out[1:], other[1:], atol=1e-5)
    n_cross = sum(isinstance(m, du.CrossAttention) for m in model.modules())
    assert n_cross == 2 * 1 + 1                               # one per block at 8x8, one middle


def test_unet_levels_and_attention_placement():
    model = small_unet()
    assert [lvl.in_channels for lvl in model.down] == [16, 16, 32]
    assert [lvl.in_channels for lvl in model.up] == [64, 64, 48]   # h + skip channels
    has_attention = [any(isinstance(m, du.SelfAttention) for m in lvl.modules())
                     for lvl in model.down]
    assert has_attention == [False, True, False]              # attention at 8x8 (16 / 2)


@pytest.mark.parametrize("call, message", [
    (lambda m, x, t: m(x[:, :2], t), r"x of shape \(B, 3, H, W\)"),
    (lambda m, x, t: m(x[:, :, :10, :10], t), "divisible by 4"),
    (lambda m, x, t: m(x, t[:2]), r"t of shape \(B,\) = \(3,\)"),
    (lambda m, x, t: m(x, t, labels=torch.tensor([0, 1, 2])), "without num_classes"),
    (lambda m, x, t: m(x, t, context=torch.randn(3, 2, 4)), "without context_dim"),
])
def test_unet_validates_inputs(call, message):
    x, t = inputs()
    with pytest.raises(ValueError, match=message):
        call(small_unet(), x, t)


@pytest.mark.parametrize("kwargs, message", [
    (dict(context=torch.randn(3, 2, 6)), "pass labels"),
    (dict(labels=torch.tensor([0, 1, 6]), context=torch.randn(3, 2, 6)), r"labels in \[0, 5\]"),
    (dict(labels=torch.tensor([0.0, 1.0, 2.0]), context=torch.randn(3, 2, 6)), "integer labels"),
    (dict(labels=torch.tensor([0, 1, 2])), r"context of shape \(3, L, 6\)"),
    (dict(labels=torch.tensor([0, 1, 2]), context=torch.randn(3, 2, 5)), r"\(3, L, 6\)"),
    (dict(labels=torch.tensor([0, 1, 2]), context=torch.randn(3, 2, 6),
          context_mask=torch.ones(3, 2)), "bool context_mask"),
    (dict(labels=torch.tensor([0, 1, 2]), context=torch.randn(3, 2, 6),
          context_mask=torch.tensor([[True, False], [False, False], [True, True]])),
     "at least one"),
])
def test_conditional_unet_validates_inputs(kwargs, message):
    x, t = inputs()
    with pytest.raises(ValueError, match=message):
        small_unet(num_classes=5, context_dim=6)(x, t, **kwargs)


def test_gradients_reach_every_parameter():
    model = wake_up(small_unet(num_classes=5, context_dim=6))
    x, t = inputs()
    out = model(x, t, labels=torch.tensor([0, 1, 5]), context=torch.randn(3, 4, 6))
    F.mse_loss(out, torch.randn_like(out)).backward()
    missing = [name for name, p in model.named_parameters()
               if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == [] and du.count_parameters(model) == sum(p.numel() for p in model.parameters())


def test_unet_is_deterministic():
    x, t = inputs()
    a, b = wake_up(small_unet()), wake_up(small_unet())
    assert torch.equal(a(x, t), b(x, t)) and torch.equal(a(x, t), a(x, t))


# -- the fast path --


def test_fast_setup_leaves_other_machines_alone(monkeypatch):
    monkeypatch.setattr(du.platform, "machine", lambda: "arm64")   # Apple silicon, say
    model = small_unet()
    same, autocast = du.fast_setup(model)
    assert same is model and autocast is contextlib.nullcontext
    assert next(model.parameters()).is_contiguous()


def test_fast_setup_uses_channels_last_float32_on_x86(monkeypatch):
    monkeypatch.setattr(du.platform, "machine", lambda: "x86_64")
    model, autocast = du.fast_setup(small_unet())
    assert autocast is contextlib.nullcontext                        # float32: no bf16 on a CPU
    conv = next(p for p in model.parameters() if p.dim() == 4 and p.shape[1] > 1)
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert not du._bf16_is_fast("cpu")


def test_fast_path_agrees_with_float32_and_trains_alike(monkeypatch):
    monkeypatch.setattr(du.platform, "machine", lambda: "x86_64")
    reference = wake_up(small_unet(num_classes=5, context_dim=6))
    fast, autocast = du.fast_setup(copy.deepcopy(reference))
    x, t = inputs(B=8)
    mask = torch.ones(8, 4, dtype=torch.bool)
    mask[:4, 2:] = False
    cond = dict(labels=torch.arange(8) % 6, context=torch.randn(8, 4, 6), context_mask=mask)
    with torch.no_grad():
        expected = reference(x, t, **cond)
        with autocast():
            got = fast(x, t, **cond)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert ((got - expected).norm() / expected.norm()).item() < 1e-4   # the same function

    def losses(model, ctx, steps=12):
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
        g, out = torch.Generator().manual_seed(0), []
        target = torch.randn(8, 3, 16, 16, generator=g)
        for _ in range(steps):
            with ctx():
                loss = F.mse_loss(model(x, t), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            out.append(loss.item())
        return out

    plain = losses(small_unet(), contextlib.nullcontext)
    quick = losses(du.fast_setup(small_unet())[0], autocast)
    assert plain[-1] < 0.8 * plain[0] and quick[-1] < 0.8 * quick[0]
    assert abs(plain[-1] - quick[-1]) < 0.05 * plain[0]
