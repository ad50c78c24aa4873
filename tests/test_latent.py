"""Lesson 07's library section: the VAE (against diffusers' AutoencoderKL, whose parameter
names it shares), its latent shapes and input checks, the reparameterisation, the KL term and
the loss (against torch.distributions and hand computations in float64), PSNR, the latent
scale, encoding and decoding latents, and sampling in the latent space."""
import dataclasses

import pytest
import torch
from torch.distributions import Normal, kl_divergence

import diffusion_utilities as du

F64 = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")

# small enough to run in milliseconds: two levels, 16 x 16 images -> 8 x 8 latents
TINY = dict(block_channels=(8, 16), groups=4, latent_channels=4, image_size=16)


def tiny_vae(seed=0, **overrides) -> du.VAE:
    """A tiny VAE whose every parameter (GroupNorm's affine ones included) is moved off its
    initial value, so that a comparison exercises all of them."""
    torch.manual_seed(seed)
    vae = du.VAE(du.VAEConfig(**{**TINY, **overrides})).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return vae


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


def images(n, size=16, seed=0):
    return torch.rand(n, 3, size, size, generator=generator(seed)) * 2 - 1


# ── the VAE against diffusers' AutoencoderKL ──


def autoencoder_kl(config: du.VAEConfig):
    """diffusers' AutoencoderKL with the structure ``config`` describes."""
    diffusers = pytest.importorskip(
        "diffusers", reason="diffusers is a development dependency (pip install -r "
                            "requirements-dev.txt); without it the comparison with it is skipped")
    levels = len(config.block_channels)
    return diffusers.AutoencoderKL(
        in_channels=config.in_channels, out_channels=config.in_channels,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=config.block_channels, layers_per_block=config.layers_per_block,
        latent_channels=config.latent_channels, norm_num_groups=config.groups,
        sample_size=config.image_size).eval()


@pytest.mark.parametrize("overrides", [
    {},                                                           # two levels, one block each
    dict(block_channels=(8, 16, 16), groups=8, latent_channels=3, layers_per_block=2),
], ids=["two-levels", "three-levels-two-blocks"])
def test_the_vae_is_diffusers_autoencoder_kl(overrides):
    ours = tiny_vae(**overrides)
    theirs = autoencoder_kl(ours.config)
    theirs.load_state_dict(ours.state_dict(), strict=True)   # the same parameter names
    x = images(3)
    z = torch.randn(3, *ours.config.latent_shape, generator=generator(1))
    with torch.no_grad():
        posterior, their_posterior = ours.encode(x), theirs.encode(x).latent_dist
        decoded, their_decoded = ours.decode(z), theirs.decode(z).sample
    assert posterior.mean.shape == (3, *ours.config.latent_shape)
    for name, a, b in (("mean", posterior.mean, their_posterior.mean),
                       ("logvar", posterior.logvar, their_posterior.logvar),
                       ("decode", decoded, their_decoded)):
        difference = (a - b).abs().max().item()
        print(f"{name}: largest difference {difference:.3g}")
        assert difference <= 1e-5, f"{name}: largest difference {difference:.3g}"
    torch.testing.assert_close(posterior.std, their_posterior.std, rtol=1e-5, atol=1e-5)


# ── shapes and input checks ──


@pytest.mark.parametrize("config, factor, latent_shape", [
    (du.VAEConfig(), 4, (4, 8, 8)),
    (du.VAEConfig(block_channels=(32, 64)), 2, (4, 16, 16)),
    (du.VAEConfig(block_channels=(8, 8, 8, 8), latent_channels=8), 8, (8, 4, 4)),
    (du.VAEConfig(block_channels=(8,), latent_channels=2, image_size=16), 1, (2, 16, 16)),
    (du.VAEConfig(block_channels=(8, 8, 8), image_size=64, latent_channels=3), 4, (3, 16, 16)),
])
def test_the_latent_shape_follows_the_levels(config, factor, latent_shape):
    assert config.downsample_factor == factor and config.latent_shape == latent_shape
    assert config.latent_size == latent_shape[1]


@pytest.mark.parametrize("overrides", [{}, dict(block_channels=(8, 8, 8), groups=8),
                                       dict(block_channels=(8,), groups=4, latent_channels=2)])
def test_encode_and_decode_give_the_configs_shapes(overrides):
    vae = tiny_vae(**overrides)
    c = vae.config
    x = images(2)
    with torch.no_grad():
        reconstruction, posterior = vae(x, generator=generator())
        assert posterior.mean.shape == posterior.logvar.shape == (2, *c.latent_shape)
        assert reconstruction.shape == x.shape
        assert vae.decode(posterior.mode()).shape == x.shape
        # a fully convolutional VAE takes any size its levels divide
        assert vae.encode(images(1, size=2 * c.image_size)).mean.shape[-1] == 2 * c.latent_size


def test_an_image_size_the_levels_do_not_divide_is_refused():
    with pytest.raises(ValueError, match="image_size 30 must be divisible by the downsampling "
                                         "factor 4"):
        du.VAE(du.VAEConfig(block_channels=(8, 8, 8), image_size=30))


@pytest.mark.parametrize("shape", [(2, 1, 16, 16), (3, 16, 16), (2, 3, 15, 16), (2, 3, 16, 7)])
def test_encode_refuses_images_of_the_wrong_shape(shape):
    vae = tiny_vae()
    with pytest.raises(ValueError) as err:
        vae.encode(torch.zeros(shape))
    assert "VAE expected images of shape (B, 3, H, W) with H and W divisible by 2, e.g. " \
           f"(B, 3, 16, 16); got {shape}" in str(err.value)


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (4, 8, 8), (2, 8, 8, 8)])
def test_decode_refuses_latents_of_the_wrong_shape(shape):
    vae = tiny_vae()
    with pytest.raises(ValueError) as err:
        vae.decode(torch.zeros(shape))
    assert f"VAE expected latents of shape (B, 4, H, W) with H and W divisible by 1, e.g. " \
           f"(B, 4, 8, 8); got {shape}" in str(err.value)


def test_blocks_refuse_channels_the_groups_do_not_divide():
    with pytest.raises(ValueError, match="VAEResBlock"):
        du.VAE(du.VAEConfig(block_channels=(8, 12), groups=8))


# ── the reparameterisation, the KL term and the loss ──


def gaussian_batch(shape=(3, 4, 5, 5), seed=0, dtype=torch.float32):
    g = generator(seed)
    mean = torch.randn(shape, generator=g, dtype=dtype)
    logvar = torch.randn(shape, generator=g, dtype=dtype) * 2
    eps = torch.randn(shape, generator=g, dtype=dtype)
    return mean, logvar, eps


def test_reparameterize_matches_float64():
    mean, logvar, eps = gaussian_batch()
    expected = mean.double() + (logvar.double() / 2).exp() * eps.double()
    out = du.reparameterize(mean, logvar, eps)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-6)
    # the mean alone at eps = 0, a draw of variance exp(logvar) otherwise
    torch.testing.assert_close(du.reparameterize(mean, logvar, torch.zeros_like(eps)), mean)


def test_reparameterize_lets_the_gradients_through():
    mean, logvar, eps = gaussian_batch(dtype=F64)
    mean.requires_grad_(True)
    logvar.requires_grad_(True)
    d_mean, d_logvar = torch.autograd.grad(du.reparameterize(mean, logvar, eps).sum(),
                                           (mean, logvar))
    torch.testing.assert_close(d_mean, torch.ones_like(mean))               # dz/dmean = 1
    std = (0.5 * logvar.detach()).exp()
    torch.testing.assert_close(d_logvar, 0.5 * std * eps)                   # dz/dlogvar


@pytest.mark.parametrize("fn", [du.reparameterize, du.gaussian_kl])
def test_the_gaussian_functions_refuse_tensors_of_different_shapes(fn):
    mean, logvar, eps = gaussian_batch()
    extra = [eps] if fn is du.reparameterize else []
    with pytest.raises(ValueError) as err:
        fn(mean, logvar[..., 0], *extra)
    message = str(err.value)   # names both tensors and both shapes
    assert "must have the shape of" in message and "mean" in message and "logvar" in message
    assert "(3, 4, 5, 5)" in message and "(3, 4, 5)" in message
    if fn is du.reparameterize:
        with pytest.raises(ValueError) as err:
            fn(mean, logvar, eps[:2])
        assert "eps" in str(err.value) and "(2, 4, 5, 5)" in str(err.value)


def test_gaussian_kl_is_torch_distributions_kl_summed_per_item():
    mean, logvar, _ = gaussian_batch(dtype=F64)
    q = Normal(mean, (0.5 * logvar).exp())
    expected = kl_divergence(q, Normal(torch.zeros_like(mean), torch.ones_like(mean)))
    kl = du.gaussian_kl(mean, logvar)
    assert kl.shape == (3,)
    torch.testing.assert_close(kl, expected.flatten(1).sum(1))
    # float32 inputs give the same up to rounding
    torch.testing.assert_close(du.gaussian_kl(mean.float(), logvar.float()).double(),
                               kl, rtol=1e-5, atol=1e-4)


def test_gaussian_kl_is_zero_for_the_prior_and_positive_otherwise():
    zeros = torch.zeros(2, 4, 3, 3)
    assert torch.equal(du.gaussian_kl(zeros, zeros), torch.zeros(2))
    mean, logvar, _ = gaussian_batch()
    assert (du.gaussian_kl(mean, logvar) > 0).all()
    # any shape (B, ...): vectors too
    torch.testing.assert_close(du.gaussian_kl(torch.tensor([[1.0, 0.0]]), torch.zeros(1, 2)),
                               torch.tensor([0.5]))


def test_the_diagonal_gaussian_clamps_logvar_and_samples_reproducibly():
    mean = torch.randn(2, 3, 4, 4, generator=generator())
    logvar = torch.full_like(mean, -100.0)
    logvar[:, :, :2] = 100.0
    logvar[0, 0, 3, 3] = 0.5
    posterior = du.DiagonalGaussian.from_moments(torch.cat([mean, logvar], dim=1))
    low, high = du.LOGVAR_RANGE
    assert (low, high) == (-30.0, 20.0)
    assert torch.equal(posterior.mean, mean)
    assert posterior.logvar[:, :, :2].eq(high).all() and posterior.logvar[:, :, 2].eq(low).all()
    assert posterior.logvar[0, 0, 3, 3] == 0.5
    torch.testing.assert_close(posterior.std, (0.5 * posterior.logvar).exp())
    assert torch.equal(posterior.mode(), mean)
    torch.testing.assert_close(posterior.kl(), du.gaussian_kl(mean, posterior.logvar))

    a, b = posterior.sample(generator(5)), posterior.sample(generator(5))
    assert torch.equal(a, b) and not torch.equal(a, posterior.sample(generator(6)))
    eps = torch.randn(mean.shape, generator=generator(5))
    torch.testing.assert_close(a, du.reparameterize(mean, posterior.logvar, eps))


def test_vae_loss_matches_a_hand_computation():
    g = generator(3)
    x = torch.rand(4, 3, 6, 6, generator=g, dtype=F64) * 2 - 1
    reconstruction = x + 0.3 * torch.randn(x.shape, generator=g, dtype=F64)
    mean, logvar, _ = gaussian_batch((4, 2, 3, 3), seed=4, dtype=F64)
    total = 0.0
    for i in range(4):      # one image at a time, every term spelled out
        squared_error = sum(float(v) ** 2 for v in (reconstruction[i] - x[i]).flatten())
        kl = 0.5 * sum(float(m) ** 2 + float(lv.exp()) - 1 - float(lv)
                       for m, lv in zip(mean[i].flatten(), logvar[i].flatten()))
        total += squared_error + 0.01 * kl
    loss = du.vae_loss(reconstruction, x, mean, logvar, kl_weight=0.01)
    assert loss.shape == ()
    assert loss.item() == pytest.approx(total / 4, rel=1e-12)
    no_kl = du.vae_loss(reconstruction, x, mean, logvar, kl_weight=0.0)
    assert no_kl.item() == pytest.approx(float((reconstruction - x).pow(2).sum()) / 4, rel=1e-12)


def test_vae_loss_needs_the_weight_by_name_and_matching_images():
    x = torch.zeros(2, 3, 4, 4)
    mean = logvar = torch.zeros(2, 4, 2, 2)
    with pytest.raises(TypeError):
        du.vae_loss(x, x, mean, logvar, 0.1)
    with pytest.raises(ValueError, match="reconstruction must have the shape of x"):
        du.vae_loss(x[:, :1], x, mean, logvar, kl_weight=0.1)


# ── PSNR and the latent scale ──


def test_psnr_of_known_errors():
    reference = torch.rand(3, 3, 8, 8, generator=generator()) * 1.6 - 0.8
    assert (du.psnr(reference, reference) > 100).all()          # identical: "infinite"
    offsets = torch.tensor([0.2, 0.02, 1.0]).view(3, 1, 1, 1)
    values = du.psnr(reference + offsets, reference)
    assert values.shape == (3,) and values.dtype == torch.float32
    # 10 log10(2² / MSE): MSE 0.04 -> 20 dB, 4e-4 -> 40 dB, 1 -> 10 log10(4)
    torch.testing.assert_close(values, torch.tensor([20.0, 40.0, 6.0206]), rtol=0, atol=1e-3)
    # the sign of the error does not matter
    torch.testing.assert_close(du.psnr(reference - 0.2, reference), torch.full((3,), 20.0),
                               rtol=0, atol=1e-3)
    with pytest.raises(ValueError, match="images must have the shape of reference"):
        du.psnr(reference[:2], reference)


def test_latent_scale_gives_unit_standard_deviation():
    latents = 3.0 * torch.randn(64, 4, 8, 8, generator=generator()) + 1.5
    scale = du.latent_scale(latents)
    assert isinstance(scale, float)
    assert scale == pytest.approx(1 / float(latents.double().std()), rel=1e-12)
    assert float((scale * latents.double()).std()) == pytest.approx(1.0, rel=1e-9)
    assert scale == pytest.approx(1 / 3, rel=0.02)
    with pytest.raises(ValueError, match="latent_scale needs a batch of latents"):
        du.latent_scale(torch.ones(1))


# ── the shipped VAE's loader, encoding and decoding latents ──


def test_a_saved_vae_loads_back_with_its_scale(tmp_path):
    vae = tiny_vae()
    du.save_checkpoint("vae", vae.state_dict(), command="test", data_dir=tmp_path,
                       config=dataclasses.asdict(vae.config), latent_scale=0.75)
    loaded = du.load_vae(data_dir=tmp_path)
    assert not loaded.training and loaded.config == vae.config   # the JSON list back to a tuple
    assert du.vae_scale(data_dir=tmp_path) == 0.75
    x = images(2)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(x).mean, vae.encode(x).mean)


def test_encode_latents_scales_the_mean_or_a_draw_in_batches():
    vae, x = tiny_vae(), images(5)
    with torch.no_grad():
        mean = vae.encode(x).mean
    latents = du.encode_latents(vae, x, 0.5, batch_size=2)
    assert latents.shape == (5, *vae.config.latent_shape)
    torch.testing.assert_close(latents, 0.5 * mean)
    torch.testing.assert_close(du.encode_latents(vae, x, 0.5), latents)   # one batch
    drawn = du.encode_latents(vae, x, 2.0, sample=True, generator=generator(1))
    assert torch.equal(drawn, du.encode_latents(vae, x, 2.0, sample=True, generator=generator(1)))
    with torch.no_grad():
        expected = 2.0 * vae.encode(x).sample(generator(1))
    torch.testing.assert_close(drawn, expected)
    assert not torch.allclose(drawn, 2.0 * mean)


def test_decode_latents_unscales_and_clamps_to_the_pixel_range():
    vae = tiny_vae()
    with torch.no_grad():
        vae.decoder.conv_out.bias.copy_(torch.tensor([3.0, -3.0, 0.0]))  # beyond [-1, 1]
    x = images(5)
    latents = du.encode_latents(vae, x, 0.5, batch_size=2)
    out = du.decode_latents(vae, latents, 0.5, batch_size=2)
    assert out.shape == x.shape
    with torch.no_grad():
        raw = vae.decode(latents / 0.5)
    assert raw.abs().max() > 1 and out.min() >= -1 and out.max() <= 1
    torch.testing.assert_close(out, raw.clamp(-1, 1))
    assert (out[:, 0] == 1).any() and (out[:, 1] == -1).any()


# ── sampling in the latent space ──


def test_ddim_images_without_clip_x0_leaves_the_range_alone():
    schedule = du.NoiseSchedule.create("cosine", 100)

    def x0_is_three(x, t):       # the exact ε of the clean "image" 3 everywhere
        return du.eps_from_x0(x, t, torch.full_like(x, 3.0), schedule)
    unclipped = du.ddim_images(x0_is_three, 2, schedule, num_steps=5, image_shape=(4, 3, 3),
                               clip_x0=False, generator=generator(), progress=False)
    assert unclipped.shape == (2, 4, 3, 3)
    torch.testing.assert_close(unclipped, torch.full((2, 4, 3, 3), 3.0), rtol=0, atol=1e-4)
    clipped = du.ddim_images(x0_is_three, 2, schedule, num_steps=5, image_shape=(4, 3, 3),
                             generator=generator(), progress=False)
    torch.testing.assert_close(clipped, torch.ones(2, 4, 3, 3))


def test_latent_diffusion_samples_latents_and_decodes_them():
    vae = tiny_vae()
    torch.manual_seed(1)
    unet = du.UNet(du.UNetConfig(in_channels=4, out_channels=4, base_channels=8,
                                 channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(4,),
                                 heads=2, groups=4, image_size=8))
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))      # the output conv starts at zero
    schedule = du.NoiseSchedule.create("cosine", 50)
    model = du.LatentDiffusion(unet, vae, 0.8, schedule)
    assert model.latent_shape == (4, 8, 8)
    out = model.images(3, num_steps=3, generator=generator(2), progress=False, batch_size=2)
    assert out.shape == (3, 3, 16, 16) and out.min() >= -1 and out.max() <= 1
    latents = du.ddim_images(unet, 3, schedule, num_steps=3, generator=generator(2),
                             progress=False, batch_size=2, image_shape=(4, 8, 8), clip_x0=False,
                             spacing=du.LATENT_SPACING)
    torch.testing.assert_close(out, du.decode_latents(vae, latents, 0.8))
