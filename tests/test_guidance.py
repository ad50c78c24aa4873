"""Lesson 09's library section: the noise-aware classifier, its gradient log p(y | x_t)
(against finite differences and a per-sample loop), the guided noise estimate (the score view
of Bayes' rule), CLIP guidance on the predicted x̂_0 (its form and its first-order effect),
and a guided model that the DDIM sampler runs unchanged. Tiny fresh models keep it fast."""
import math

import pytest
import torch
import torch.nn.functional as F

import diffusion_utilities as du

F64 = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def schedule():
    return du.NoiseSchedule.create("cosine", 1000)


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


def wake_up(module, seed=1):
    """Give the zero-initialised layers small random weights, so every branch is active."""
    g = generator(seed)
    with torch.no_grad():
        for p in module.parameters():
            if not p.any():
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return module


def tiny_classifier(seed=0, **kwargs) -> du.NoisyClassifier:
    torch.manual_seed(seed)
    classifier = du.NoisyClassifier(width=8, **kwargs)
    with torch.no_grad():   # larger heads: clearly different class probabilities
        for head in classifier.heads.values():
            head.weight.mul_(6.0)
    return classifier.eval()


def tiny_unet(**config) -> du.UNet:
    torch.manual_seed(0)
    return wake_up(du.UNet(du.UNetConfig(base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
                                         attention_resolutions=(), groups=4, image_size=16,
                                         **config))).eval()


def tiny_clip() -> du.CLIP:
    torch.manual_seed(0)
    return du.CLIP(du.ClipConfig(image_size=16, patch_size=4, vision_width=16, vision_layers=1,
                                 vision_heads=2, text_width=16, text_layers=1, text_heads=2,
                                 embed_dim=8)).eval()


# ── the noise-aware classifier ──


def test_the_noisy_classifier_has_a_head_per_attribute():
    classifier = tiny_classifier()
    xt, t = torch.randn(3, 3, 32, 32, generator=generator()), torch.tensor([0, 500, 999])
    logits = classifier(xt, t)
    assert list(logits) == list(du.ATTRIBUTES)
    for name, values in zip(du.ATTRIBUTES, du.ATTRIBUTE_VALUES):
        assert logits[name].shape == (3, len(values))
    own = du.NoisyClassifier({"shape": 4, "colour": 2}, width=16)
    assert {k: v.shape for k, v in own(xt, t).items()} == {"shape": (3, 4), "colour": (3, 2)}


def test_the_noisy_classifier_reads_the_timestep_and_treats_samples_apart():
    classifier = tiny_classifier()
    xt = torch.randn(1, 3, 32, 32, generator=generator()).expand(3, -1, -1, -1)
    logits = classifier(xt, torch.tensor([0, 500, 999]))["shape"]
    assert (logits[0] - logits[1]).abs().max() > 1e-3 and (logits[1] - logits[2]).abs().max() > 1e-3
    # a batch gives each sample what it gets alone (no batch statistics)
    xs = torch.randn(4, 3, 32, 32, generator=generator(1))
    ts = torch.tensor([3, 70, 400, 998])
    together = classifier(xs, ts)["colour"]
    alone = torch.cat([classifier(xs[i:i + 1], ts[i:i + 1])["colour"] for i in range(4)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


def test_a_saved_noisy_classifier_loads_back_in_eval_mode(tmp_path):
    classifier = tiny_classifier()
    du.save_checkpoint("noisy_classifier", classifier.state_dict(), command="test",
                       data_dir=tmp_path,
                       config={"num_classes": classifier.num_classes, "width": 8})
    loaded = du.load_noisy_classifier(data_dir=tmp_path)
    assert not loaded.training and loaded.num_classes == classifier.num_classes
    xt, t = torch.randn(2, 3, 32, 32, generator=generator()), torch.tensor([1, 900])
    torch.testing.assert_close(loaded(xt, t)["shape"], classifier(xt, t)["shape"])


# ── the classifier's pull: ∇ log p(y | x_t) ──


@torch.no_grad()
def summed_log_prob(classifier, xt, t, y, attribute):
    return float(classifier(xt, t)[attribute].log_softmax(-1)[torch.arange(len(y)), y].sum())


@pytest.mark.parametrize("attribute", ["shape", "colour"])
def test_the_log_prob_gradient_is_a_finite_difference_of_the_summed_log_probability(attribute):
    classifier = tiny_classifier().double()
    xt = torch.randn(2, 3, 16, 16, generator=generator(), dtype=F64)
    t, y = torch.tensor([10, 700]), torch.tensor([4, 1])
    grad = du.classifier_log_prob_grad(classifier, xt, t, y, attribute=attribute)
    assert grad.shape == xt.shape and grad.dtype == F64
    g, h = generator(2), 1e-5
    for _ in range(8):
        index = tuple(int(torch.randint(0, n, (1,), generator=g)) for n in xt.shape)
        plus, minus = xt.clone(), xt.clone()
        plus[index] += h
        minus[index] -= h
        numeric = (summed_log_prob(classifier, plus, t, y, attribute)
                   - summed_log_prob(classifier, minus, t, y, attribute)) / (2 * h)
        assert grad[index].item() == pytest.approx(numeric, rel=1e-5, abs=1e-8)


def test_the_log_prob_gradient_is_each_samples_own():
    classifier = tiny_classifier()
    xt = torch.randn(4, 3, 32, 32, generator=generator())
    t, y = torch.tensor([0, 250, 600, 999]), torch.tensor([0, 5, 2, 3])
    grad = du.classifier_log_prob_grad(classifier, xt, t, y)      # the default: "shape"
    for i in range(4):
        x = xt[i:i + 1].clone().requires_grad_(True)
        log_p = classifier(x, t[i:i + 1])["shape"].log_softmax(-1)[0, y[i]]
        alone, = torch.autograd.grad(log_p, x)
        torch.testing.assert_close(grad[i:i + 1], alone, rtol=1e-4, atol=1e-6)


def test_the_log_prob_gradient_of_a_float64_classifier_is_float64_throughout():
    classifier = tiny_classifier().double()
    xt = torch.randn(3, 3, 16, 16, generator=generator(), dtype=F64)
    t, y = torch.tensor([0, 450, 999]), torch.tensor([1, 3, 5])
    grad = du.classifier_log_prob_grad(classifier, xt, t, y, attribute="colour")
    x = xt.clone().requires_grad_(True)
    log_p = classifier(x, t)["colour"].log_softmax(-1)[torch.arange(3), y].sum()
    expected, = torch.autograd.grad(log_p, x)
    assert grad.dtype == F64
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-14)


def test_the_log_prob_gradient_works_inside_no_grad_and_leaves_no_trace():
    classifier = tiny_classifier()
    xt = torch.randn(2, 3, 32, 32, generator=generator())
    before = xt.clone()
    t, y = torch.tensor([5, 500]), torch.tensor([1, 2])
    with torch.no_grad():
        grad = du.classifier_log_prob_grad(classifier, xt, t, y)
    assert grad.abs().max() > 0 and not grad.requires_grad
    assert torch.equal(xt, before) and not xt.requires_grad and xt.grad is None
    assert all(p.grad is None for p in classifier.parameters())
    with pytest.raises(ValueError, match="attribute must be one of .*got 'texture'"):
        du.classifier_log_prob_grad(classifier, xt, t, y, attribute="texture")


def test_the_log_prob_gradient_raises_the_log_probability():
    """A small step along the gradient raises every sample's log p(y | x_t) by about
    step · |∇|² (first order)."""
    classifier = tiny_classifier().double()
    xt = torch.randn(3, 3, 16, 16, generator=generator(), dtype=F64)
    t, y = torch.tensor([0, 300, 900]), torch.tensor([2, 2, 4])
    grad = du.classifier_log_prob_grad(classifier, xt, t, y)
    step = 1e-4 / grad.square().sum(dim=(1, 2, 3)).max()
    for i in range(3):
        before = summed_log_prob(classifier, xt[i:i + 1], t[i:i + 1], y[i:i + 1], "shape")
        after = summed_log_prob(classifier, xt[i:i + 1] + step * grad[i:i + 1], t[i:i + 1],
                                y[i:i + 1], "shape")
        assert after - before == pytest.approx(float(step * grad[i].square().sum()), rel=0.01)


# ── the guided noise estimate ──


def test_guided_eps_is_eps_minus_s_sqrt_one_minus_alpha_bar_times_the_gradient(schedule):
    # ᾱ_t again, in float64 from the betas (1 - ᾱ_t near t = 0 needs it)
    alpha_bars = du.alpha_bars_from_betas(du.make_beta_schedule("cosine", 1000).double())
    g = generator()
    t = torch.tensor([0, 1, 400, 998, 999])
    eps = torch.randn(5, 3, 4, 6, generator=g, dtype=F64)
    grad = torch.randn(5, 3, 4, 6, generator=g, dtype=F64)
    out = du.guided_eps(eps, grad, t, schedule, 2.5)
    assert out.shape == eps.shape
    for i, step in enumerate(t.tolist()):
        factor = math.sqrt(1 - float(alpha_bars[step]))
        torch.testing.assert_close(out[i], eps[i] - 2.5 * factor * grad[i], rtol=1e-6, atol=1e-6)


def test_guided_eps_adds_the_scaled_gradient_to_the_score(schedule):
    """Bayes' rule: ∇ log p(x_t | y) = ∇ log p(x_t) + s ∇ log p(y | x_t)."""
    g = generator(1)
    t = torch.tensor([3, 250, 990])
    eps = torch.randn(3, 3, 8, 8, generator=g, dtype=F64)
    grad = torch.randn(3, 3, 8, 8, generator=g, dtype=F64)
    for scale in (0.5, 3.0):
        guided = du.score_from_eps(du.guided_eps(eps, grad, t, schedule, scale), t, schedule)
        torch.testing.assert_close(guided, du.score_from_eps(eps, t, schedule) + scale * grad,
                                   rtol=1e-6, atol=1e-6)


def test_guided_eps_with_scale_0_is_the_models_and_refuses_another_shape(schedule):
    eps = torch.randn(2, 3, 8, 8, generator=generator())
    grad = torch.randn(2, 3, 8, 8, generator=generator(1))
    assert torch.equal(du.guided_eps(eps, grad, torch.tensor([0, 999]), schedule, 0.0), eps)
    with pytest.raises(ValueError, match=r"grad_log_prob must have the shape of model_eps"):
        du.guided_eps(eps, grad[:, :1], torch.tensor([0, 999]), schedule, 1.0)


# ── CLIP guidance on x̂_0 ──


@pytest.fixture(scope="module")
def clip():
    return tiny_clip()


@pytest.fixture(scope="module")
def clip_case(schedule):
    """x_t from clean images inside (-1, 1) and a slightly wrong noise prediction."""
    g = generator(3)
    t = torch.tensor([20, 300, 700])
    x0 = (0.3 * torch.randn(3, 3, 16, 16, generator=g)).clamp(-0.5, 0.5)
    eps = torch.randn(3, 3, 16, 16, generator=g)
    xt = du.q_sample(x0, t, eps, schedule)
    model_eps = eps + 0.05 * torch.randn(3, 3, 16, 16, generator=g)
    text = torch.randn(3, 8, generator=g)
    return xt, t, model_eps, text


def similarity_grad(clip, image, text):
    """∇ of the summed cosine similarities of CLIP's image embedding with the text."""
    x = image.detach().clone().requires_grad_(True)
    similarity = F.cosine_similarity(clip.encode_image(x), text.expand(len(x), -1), dim=-1)
    return torch.autograd.grad(similarity.sum(), x)[0], similarity.detach()


def test_clip_guidance_with_scale_0_is_the_models(clip, clip_case, schedule):
    xt, t, model_eps, text = clip_case
    assert torch.equal(du.clip_guided_eps(clip, model_eps, xt, t, schedule, text, 0.0), model_eps)


def test_clip_guidance_is_the_eps_of_the_stepped_clean_image(clip, clip_case, schedule):
    """ε̂ = du.eps_from_x0(x_t, t, x̂_0 + s g), g the gradient at the clipped x̂_0."""
    xt, t, model_eps, text = clip_case
    x0_hat = du.predict_x0(xt, t, model_eps, schedule)
    x0_hat[0, 0, 0, 0] = 1.7                    # one value outside the pixel range
    model_eps = du.eps_from_x0(xt, t, x0_hat, schedule)
    g, _ = similarity_grad(clip, x0_hat.clamp(-1, 1), text)
    for scale in (1.0, 40.0):
        out = du.clip_guided_eps(clip, model_eps, xt, t, schedule, text, scale)
        expected = du.eps_from_x0(xt, t, x0_hat + scale * g, schedule)
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_clip_guidance_treats_one_caption_for_all_and_each_sample_apart(clip, clip_case, schedule):
    xt, t, model_eps, text = clip_case
    shared = du.clip_guided_eps(clip, model_eps, xt, t, schedule, text[0], 10.0)
    torch.testing.assert_close(
        shared, du.clip_guided_eps(clip, model_eps, xt, t, schedule, text[0].expand(3, -1), 10.0))
    each = du.clip_guided_eps(clip, model_eps, xt, t, schedule, text, 10.0)
    for i in range(3):
        alone = du.clip_guided_eps(clip, model_eps[i:i + 1], xt[i:i + 1], t[i:i + 1], schedule,
                                   text[i:i + 1], 10.0)
        torch.testing.assert_close(each[i:i + 1], alone, rtol=1e-4, atol=1e-5)


def test_a_small_clip_guided_step_raises_the_similarity_of_x0(clip, clip_case, schedule):
    """x̂_0' = predict_x0(ε̂) = x̂_0 + s g, so the similarity rises by about s |g|²."""
    xt, t, model_eps, text = clip_case
    x0_hat = du.predict_x0(xt, t, model_eps, schedule)
    assert x0_hat.abs().max() < 1                 # no clipping in the way
    g, before = similarity_grad(clip, x0_hat, text)
    scale = float(1e-3 / g.square().sum(dim=(1, 2, 3)).max())
    guided = du.clip_guided_eps(clip, model_eps, xt, t, schedule, text, scale)
    stepped = du.predict_x0(xt, t, guided, schedule)
    _, after = similarity_grad(clip, stepped, text)
    gain = after - before
    expected = scale * g.square().sum(dim=(1, 2, 3))
    assert (gain > 0).all()
    torch.testing.assert_close(gain, expected, rtol=0.2, atol=1e-5)


def test_clip_guidance_follows_a_float64_clip(clip, clip_case, schedule):
    xt, t, model_eps, text = (v.double() if v.is_floating_point() else v for v in clip_case)
    clip64 = tiny_clip().double()
    out = du.clip_guided_eps(clip64, model_eps, xt, t, schedule, text, 30.0)
    assert out.dtype == F64
    x0_hat = du.predict_x0(xt, t, model_eps, schedule)
    g, _ = similarity_grad(clip64, x0_hat.clamp(-1, 1), text)
    torch.testing.assert_close(out, du.eps_from_x0(xt, t, x0_hat + 30.0 * g, schedule),
                               rtol=1e-6, atol=1e-6)


def test_clip_guidance_works_inside_no_grad_and_leaves_no_trace(clip, clip_case, schedule):
    xt, t, model_eps, text = clip_case
    copies = xt.clone(), model_eps.clone(), text.clone()
    with torch.no_grad():
        out = du.clip_guided_eps(clip, model_eps, xt, t, schedule, text, 20.0)
    assert not out.requires_grad and (out - model_eps).abs().max() > 0
    for tensor, copy in zip((xt, model_eps, text), copies):
        assert torch.equal(tensor, copy) and not tensor.requires_grad
    assert all(p.grad is None for p in clip.parameters())
    with pytest.raises(ValueError, match="model_eps must have the shape of xt"):
        du.clip_guided_eps(clip, model_eps[:2], xt, t, schedule, text, 1.0)


# ── a guided model, sampled with DDIM ──


def test_guided_runs_in_ddim_sample_and_a_guide_that_returns_eps_changes_nothing(schedule):
    model = tiny_unet()
    x_T = torch.randn(2, 3, 16, 16, generator=generator())
    seen = []

    def unchanged(model_eps, xt, t):
        seen.append((tuple(model_eps.shape), tuple(xt.shape), t.tolist()))
        return model_eps
    guided = du.Guided(model, unchanged)
    assert guided.config is model.config
    for plain in du.ddim_sample(model, None, schedule, num_steps=4, x_T=x_T, autocast=False,
                                progress=False):
        pass
    for steered in du.ddim_sample(guided, None, schedule, num_steps=4, x_T=x_T, progress=False):
        pass
    assert torch.equal(steered, plain)
    timesteps = du.ddim_timesteps(schedule.T, 4).tolist()
    assert seen == [((2, 3, 16, 16), (2, 3, 16, 16), [s, s]) for s in timesteps]


def test_guided_runs_a_network_in_eval_mode_as_ddim_sample_does(schedule):
    model = tiny_unet(dropout=0.5).train()
    x_T = torch.randn(1, 3, 16, 16, generator=generator())
    guided = du.Guided(model, lambda e, x, t: e)
    runs = [list(du.ddim_sample(guided, None, schedule, num_steps=3, x_T=x_T, progress=False))[-1]
            for _ in range(2)]
    assert torch.equal(runs[0], runs[1])     # no dropout: the same x_T gives the same sample
    assert model.training                    # and the model's own mode is restored


def test_guided_asks_the_guide_with_the_models_eps(schedule):
    model = tiny_unet()
    xt, t = torch.randn(2, 3, 16, 16, generator=generator()), torch.tensor([10, 600])
    guided = du.Guided(model, lambda e, x, s: e + x)
    with torch.no_grad():
        expected = model(xt, t) + xt
    torch.testing.assert_close(guided(xt, t), expected)


def test_classifier_guided_ddim_end_to_end(schedule):
    model, classifier = tiny_unet(), tiny_classifier()
    y = torch.tensor([4, 1])

    def guide(model_eps, xt, t):
        grad = du.classifier_log_prob_grad(classifier, xt, t, y)
        return du.guided_eps(model_eps, grad, t, schedule, 3.0)
    guided = du.ddim_images(du.Guided(model, guide), 2, schedule, num_steps=3,
                            generator=generator(5), progress=False)
    plain = du.ddim_images(model, 2, schedule, num_steps=3, generator=generator(5),
                           autocast=False, progress=False)
    assert guided.shape == (2, 3, 16, 16) and torch.isfinite(guided).all()
    assert guided.abs().max() <= 1
    assert (guided - plain).abs().max() > 1e-3     # the guide changed the samples


def test_clip_guided_ddim_end_to_end(clip, schedule):
    model = tiny_unet()
    text = du.embed_captions(clip, ["a red star"])[0]

    def guide(model_eps, xt, t):
        return du.clip_guided_eps(clip, model_eps, xt, t, schedule, text, 50.0)
    images = du.ddim_images(du.Guided(model, guide), 2, schedule, num_steps=3,
                            generator=generator(6), progress=False)
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
