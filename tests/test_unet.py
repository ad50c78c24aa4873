"""Lesson 02's library section: the UNet and its blocks (the library's or others with the same
signatures), input validation, the fast path that fast_setup measures."""
import contextlib
import copy
import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

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


# -- the UNet built from other blocks (lesson 02 builds it from the learner's) --


class LoopResBlock(nn.Module):
    """du.ResBlock's layers under the same names, its forward written in another order."""

    def __init__(self, in_ch, out_ch, time_dim, *, groups=8, dropout=0.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_proj = nn.Sequential(nn.SiLU(), nn.Linear(time_dim, out_ch))
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x, emb):
        skip = self.skip(x)
        time = self.time_proj(emb).unsqueeze(-1).unsqueeze(-1)          # (B, out_ch, 1, 1)
        h = self.conv1(F.silu(self.norm1(x))) + time
        return skip + self.conv2(self.dropout(F.silu(self.norm2(h))))


class EinsumAttention(nn.Module):
    """du.SelfAttention's layers, attention written with einsum and a float64 softmax."""

    def __init__(self, channels, *, heads=4, groups=8):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)

    def forward(self, x):
        B, C, H, W = x.shape
        d = C // self.heads
        tokens = self.norm(x).reshape(B, C, H * W).permute(0, 2, 1)       # (B, N, C)
        q, k, v = self.qkv(tokens).reshape(B, H * W, 3, self.heads, d).unbind(2)
        weights = torch.einsum("bnhd,bmhd->bhnm", q.double(), k.double()) / d ** 0.5
        out = torch.einsum("bhnm,bmhd->bnhd", weights.softmax(-1), v.double())
        out = self.proj(out.reshape(B, H * W, C).to(x.dtype))
        return x + out.permute(0, 2, 1).reshape(B, C, H, W)


def loop_embedding(t, dim, *, max_period=10000):
    """du.sinusoidal_embedding column by column, in float64."""
    half = dim // 2
    freqs = [max_period ** (-i / half) for i in range(half)]
    columns = [torch.sin(t.double() * f) for f in freqs] + [torch.cos(t.double() * f) for f in freqs]
    return torch.stack(columns, dim=1).float()


OTHER_BLOCKS = dict(res_block=LoopResBlock, attention=EinsumAttention, time_embedding=loop_embedding)


def test_unet_from_other_equivalent_blocks_computes_the_same():
    reference = wake_up(small_unet(num_classes=5, context_dim=6))
    other = du.UNet(reference.config, **OTHER_BLOCKS)
    assert list(other.state_dict()) == list(reference.state_dict())   # the same parameter names
    other.load_state_dict(reference.state_dict())
    n_attention = sum(isinstance(m, du.SelfAttention) for m in reference.modules())
    assert sum(isinstance(m, EinsumAttention) for m in other.modules()) == n_attention > 0
    assert not any(isinstance(m, (du.ResBlock, du.SelfAttention)) for m in other.modules())
    x, t = inputs()
    cond = dict(labels=torch.tensor([0, 4, 5]), context=torch.randn(3, 4, 6))
    with torch.no_grad():
        expected, got = reference(x, t, **cond), other(x, t, **cond)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(expected, reference(x, t.flip(0), **cond), atol=1e-3)  # t matters


def test_unet_uses_the_time_embedding_it_is_given():
    reference = wake_up(small_unet())
    shifted = du.UNet(reference.config, time_embedding=lambda t, dim: loop_embedding(t + 1, dim))
    shifted.load_state_dict(reference.state_dict())
    x, t = inputs()
    with torch.no_grad():
        assert torch.allclose(shifted(x, t), reference(x, t + 1), atol=1e-5)


def test_unet_refuses_blocks_that_are_not_callable():
    with pytest.raises(ValueError, match="res_block to be a class or function"):
        du.UNet(du.UNetConfig(**SMALL), res_block="ResBlock")


def test_shipped_checkpoint_loads_into_the_default_unet_as_before():
    manifest = du.CheckpointManifest.load()
    if "ddpm_shapes" not in manifest.entries:
        pytest.skip("data/manifest.json has no entry 'ddpm_shapes'")
    config = du.UNetConfig(**manifest.entries["ddpm_shapes"]["config"])
    state = du.load_checkpoint("ddpm_shapes")
    model = du.UNet(config)
    model.load_state_dict(state)                               # strict: every key, no extra
    other = du.UNet(config, **OTHER_BLOCKS)
    other.load_state_dict(state)
    x, t = inputs(B=2, size=config.image_size)
    with torch.no_grad():
        expected = model(x, t)
        assert torch.allclose(other(x, t), expected, atol=1e-4)
    assert expected.abs().mean() > 0.1                          # trained: not the fresh zero output


# -- the fast path: fast_setup measures the candidate modes and keeps the fastest --


@pytest.fixture
def fresh_fast_setup(monkeypatch, tmp_path):
    """No earlier measurement: an empty cache file in tmp_path and none in this process."""
    monkeypatch.setattr(du, "FAST_SETUP_CACHE", tmp_path / "fast_setup.json")
    monkeypatch.setattr(du, "_FAST_MEASURED", {})
    monkeypatch.setattr(du, "_FAST_ON_DEVICE", {})
    return tmp_path / "fast_setup.json"


def planted_timings(monkeypatch, seconds):
    """Make every measurement report ``seconds``; returns the list of calls made."""
    calls = []

    def fake(model, modes, args, kwargs, *, budget_s, rounds=3):
        calls.append(tuple(modes))
        return {mode: seconds[mode] for mode in modes if mode in seconds}

    monkeypatch.setattr(du, "_time_modes", fake)
    return calls


def is_channels_last(model):
    conv = next(p for p in model.parameters() if p.dim() == 4 and p.shape[1] > 1)
    return conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()


def test_fast_setup_without_measuring_does_nothing(fresh_fast_setup):
    model = small_unet()
    before = copy.deepcopy(model.state_dict())
    same, autocast = du.fast_setup(model, measure=False)
    assert same is model and autocast is contextlib.nullcontext
    assert all(p.is_contiguous() for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert model.fast_choice.mode == "float32" and model.fast_choice.source == "off"
    assert not fresh_fast_setup.exists()
    assert not du._bf16_is_fast("cpu") and not du._bf16_is_fast("cpu", model)


def test_fast_setup_measures_every_mode_and_keeps_a_candidate(fresh_fast_setup):
    model = small_unet()
    rng = torch.random.get_rng_state()
    fast, autocast = du.fast_setup(model, budget_s=10.0)     # time enough on a busy machine
    choice = fast.fast_choice
    assert fast is model and choice.source == "measured" and choice.batch == 4
    assert choice.mode in du.FAST_MODES and set(choice.seconds) == set(du.FAST_MODES)
    assert all(s > 0 for s in choice.seconds.values()) and choice.measure_s > 0
    fastest = min(choice.seconds, key=choice.seconds.get)
    if choice.mode == "float32":   # kept unless another mode is 5% faster
        assert choice.seconds[fastest] > 0.95 * choice.seconds["float32"]
    else:
        assert choice.mode == fastest and choice.seconds[fastest] <= 0.95 * choice.seconds["float32"]
    assert is_channels_last(fast) == choice.channels_last
    assert (autocast is not contextlib.nullcontext) == choice.bf16 == du._bf16_is_fast("cpu")
    assert torch.equal(rng, torch.random.get_rng_state())     # measuring drew no random numbers
    assert model.training and all(p.grad is None for p in model.parameters())
    assert "float32" in choice.describe()


@pytest.mark.parametrize("seconds, expected", [
    ({"float32": 1.0, "float32_channels_last": 0.97, "bfloat16": 0.98,
      "bfloat16_channels_last": 1.4}, "float32"),                      # within 5%: kept
    ({"float32": 1.0, "float32_channels_last": 0.9, "bfloat16": 0.64,
      "bfloat16_channels_last": 0.7}, "bfloat16"),                    # 1.57x: bfloat16
    ({"float32": 1.0, "float32_channels_last": 0.93, "bfloat16": 1.54,
      "bfloat16_channels_last": 1.6}, "float32_channels_last"),        # bf16 0.65x: never
])
def test_fast_setup_keeps_float32_unless_another_mode_is_clearly_faster(
        fresh_fast_setup, monkeypatch, seconds, expected):
    planted_timings(monkeypatch, seconds)
    model, autocast = du.fast_setup(small_unet())
    assert model.fast_choice.mode == expected
    assert is_channels_last(model) == expected.endswith("channels_last")
    assert (autocast is not contextlib.nullcontext) == expected.startswith("bfloat16")
    assert du._bf16_is_fast("cpu") == expected.startswith("bfloat16")   # train's default


def test_bf16_default_follows_the_models_own_choice(fresh_fast_setup, monkeypatch):
    assert not du._bf16_is_fast("cpu")                          # nothing measured: CUDA only
    planted_timings(monkeypatch, {"float32": 1.0, "float32_channels_last": 1.0,
                                  "bfloat16": 0.5, "bfloat16_channels_last": 0.6})
    quick, _ = du.fast_setup(small_unet())
    plain, _ = du.fast_setup(small_unet(base_channels=8), measure=False)
    assert du._bf16_is_fast("cpu", quick) and not du._bf16_is_fast("cpu", plain)
    assert du._bf16_is_fast("cpu") and du._bf16_is_fast("cpu", torch.nn.Linear(2, 2))


def test_fast_setup_uses_its_cache_the_second_time(fresh_fast_setup, monkeypatch):
    calls = planted_timings(monkeypatch, {"float32": 1.0, "float32_channels_last": 0.8,
                                          "bfloat16": 0.9, "bfloat16_channels_last": 0.85})
    first, _ = du.fast_setup(small_unet())
    assert first.fast_choice.source == "measured" and len(calls) == 1
    record = json.loads(fresh_fast_setup.read_text())
    assert [entry["mode"] for entry in record.values()] == ["float32_channels_last"]
    second, _ = du.fast_setup(small_unet())                     # the same layers: no measuring
    assert second.fast_choice.source == "cached" and len(calls) == 1
    assert second.fast_choice.mode == "float32_channels_last" and is_channels_last(second)
    monkeypatch.setattr(du, "_FAST_MEASURED", {})               # a new process: the file
    assert du.fast_setup(small_unet())[0].fast_choice.source == "cached" and len(calls) == 1
    assert du.fast_setup(small_unet(), cache=False)[0].fast_choice.source == "measured"
    du.fast_setup(small_unet(num_res_blocks=2))                 # other layers: measured
    assert len(calls) == 3 and len(json.loads(fresh_fast_setup.read_text())) == 2


def test_fast_setup_survives_a_broken_cache_file(fresh_fast_setup, monkeypatch):
    planted_timings(monkeypatch, {"float32": 1.0, "float32_channels_last": 1.0,
                                  "bfloat16": 1.0, "bfloat16_channels_last": 1.0})
    fresh_fast_setup.write_text("{ not json")
    model, _ = du.fast_setup(small_unet())
    assert model.fast_choice.source == "measured" and model.fast_choice.mode == "float32"
    assert len(json.loads(fresh_fast_setup.read_text())) == 1     # written afresh


def test_fast_setup_measurement_is_bounded(fresh_fast_setup, monkeypatch):
    clock, passes = SimpleNamespace(now=0.0), []
    monkeypatch.setattr(du, "time", SimpleNamespace(perf_counter=lambda: clock.now))

    def passes_taking(seconds):                  # each timed pass moves the clock on
        def fake(net, bf16, args, kwargs):
            passes.append(bf16)
            clock.now += seconds
            return seconds
        return fake

    monkeypatch.setattr(du, "_pass_seconds", passes_taking(0.03))
    model, _ = du.fast_setup(small_unet(), budget_s=0.2)   # past 0.2 s after a timed round
    assert len(passes) == 2 * len(du.FAST_MODES)            # warm-up + one timed round
    assert set(model.fast_choice.seconds) == set(du.FAST_MODES)
    assert model.fast_choice.measure_s == pytest.approx(0.24)
    passes.clear()
    du.fast_setup(small_unet(), cache=False, budget_s=60.0)  # at most three timed rounds
    assert len(passes) == 4 * len(du.FAST_MODES)
    passes.clear()
    monkeypatch.setattr(du, "_pass_seconds", passes_taking(0.2))  # busy: stop after 3 x 0.1 s
    busy, autocast = du.fast_setup(small_unet(), cache=False, budget_s=0.1)
    assert len(passes) == 2                                 # two warm-up passes, none timed
    assert busy.fast_choice.mode == "float32" and busy.fast_choice.source == "default"
    assert autocast is contextlib.nullcontext and busy.fast_choice.seconds == {}


def test_a_measurement_spoilt_by_a_busy_machine_is_not_kept_for_later(fresh_fast_setup,
                                                                       monkeypatch):
    clock = SimpleNamespace(now=0.0)
    monkeypatch.setattr(du, "time", SimpleNamespace(perf_counter=lambda: clock.now))

    def slow(net, bf16, args, kwargs):            # too slow to time every mode in 3 x 0.5 s
        clock.now += 0.25 if bf16 else 0.3
        return 0.25 if bf16 else 0.3

    monkeypatch.setattr(du, "_pass_seconds", slow)
    model, _ = du.fast_setup(small_unet(), budget_s=0.5)
    assert model.fast_choice.source == "measured"       # used in this process ...
    assert 0 < len(model.fast_choice.seconds) < len(du.FAST_MODES)
    assert not fresh_fast_setup.exists()                # ... but not written for later ones


def test_fast_setup_forced_mode_and_models_it_cannot_feed(fresh_fast_setup, monkeypatch):
    calls = planted_timings(monkeypatch, {"float32": 1.0, "bfloat16": 0.5})
    model, autocast = du.fast_setup(small_unet(), mode="bfloat16_channels_last")
    assert model.fast_choice.source == "forced" and is_channels_last(model)
    assert autocast is not contextlib.nullcontext and calls == []
    with pytest.raises(ValueError, match="mode must be one of"):
        du.fast_setup(small_unet(), mode="float16")
    conv = torch.nn.Conv2d(3, 3, 3)                             # not a UNet, no inputs given
    same, autocast = du.fast_setup(conv)
    assert same.fast_choice.source == "default" and autocast is contextlib.nullcontext
    assert calls == []
    measured, _ = du.fast_setup(torch.nn.Conv2d(3, 3, 3), inputs=(torch.randn(2, 3, 8, 8),))
    assert measured.fast_choice.source == "measured" and measured.fast_choice.mode == "bfloat16"


@pytest.mark.parametrize("mode", ["float32", "float32_channels_last", "bfloat16",
                                  "bfloat16_channels_last"])
def test_every_fast_mode_computes_the_same_function(fresh_fast_setup, mode):
    reference = wake_up(small_unet(num_classes=5, context_dim=6))
    fast, autocast = du.fast_setup(copy.deepcopy(reference), mode=mode)
    x, t = inputs(B=8)
    mask = torch.ones(8, 4, dtype=torch.bool)
    mask[:4, 2:] = False
    cond = dict(labels=torch.arange(8) % 6, context=torch.randn(8, 4, 6), context_mask=mask)
    with torch.no_grad():
        expected = reference(x, t, **cond)
        with autocast():
            got = fast(x, t, **cond)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    tolerance = 3e-2 if mode.startswith("bfloat16") else 1e-4    # bfloat16 keeps 8 bits
    assert ((got - expected).norm() / expected.norm()).item() < tolerance


def test_fast_path_trains_alike(fresh_fast_setup):
    x, t = inputs(B=8)

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
    quick = losses(*du.fast_setup(small_unet(), mode="bfloat16_channels_last"))
    assert plain[-1] < 0.8 * plain[0] and quick[-1] < 0.8 * quick[0]
    assert abs(plain[-1] - quick[-1]) < 0.05 * plain[0]


def test_caption_unet_takes_clip_text_encoder_frozen():
    """Lesson 04's word-level text model can be swapped for lesson 06's CLIP text encoder:
    the UNet reads its token embeddings, and the encoder stays frozen in training mode."""
    torch.manual_seed(0)
    clip = du.CLIP(du.ClipConfig(vision_width=16, text_width=16, embed_dim=16,
                                 vision_layers=1, text_layers=1))
    config = du.UNetConfig(base_channels=16, channel_mults=(1, 2), attention_resolutions=(16,),
                           context_dim=16, num_res_blocks=1, image_size=16)
    model = du.CaptionUNet(config, text_encoder=clip.text)
    model.train()
    assert not model.text.training and not any(p.requires_grad for p in model.text.parameters())
    ids, mask = du.CaptionTokenizer().encode(["a red star", "a blue circle"])
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 500])
    out = model(x, t, ids=ids, mask=mask)
    assert out.shape == x.shape
    out.square().mean().backward()
    assert all(p.grad is None for p in model.text.parameters())
    with pytest.raises(ValueError, match="either vocab_size"):
        du.CaptionUNet(config, 40, text_encoder=clip.text)
