"""The quality measure: Fréchet and kernel distances between sets of images, on the attribute
classifier's features. Known answers on Gaussians first, then the shipped classifier on real
shapes images, pure noise and collapsed sets (one image, or a few, repeated)."""
import numpy as np
import pytest
import torch

import diffusion_utilities as du

pytestmark = pytest.mark.usefixtures("one_thread")

N_IMAGES = 256


def gaussian_samples(n, mean, stds, *, seed, rotation=None):
    """n samples (n, d) float64 of N(mean, R diag(stds²) Rᵀ), R the identity unless given."""
    z = torch.randn(n, len(stds), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x = z * torch.as_tensor(stds, dtype=torch.float64)
    if rotation is not None:
        x = x @ rotation.T
    return x + torch.as_tensor(mean, dtype=torch.float64)


def random_rotation(d, *, seed):
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed),
                                       dtype=torch.float64))
    return q


# ── the Fréchet distance between two Gaussians: closed forms ──────────────────────────────

def test_gaussian_frechet_distance_diagonal_covariances():
    mu1, mu2 = torch.tensor([0.0, 1.0, -2.0, 0.5]), torch.tensor([1.0, 1.0, 0.0, -0.5])
    s1, s2 = torch.tensor([1.0, 2.0, 0.5, 3.0]), torch.tensor([2.0, 0.5, 0.5, 1.0])
    expected = float((mu1 - mu2).square().sum() + (s1 - s2).square().sum())   # 6 + 7.25
    got = du.gaussian_frechet_distance(mu1, torch.diag(s1**2), mu2, torch.diag(s2**2))
    assert isinstance(got, float)
    assert got == pytest.approx(expected, rel=1e-12)


def test_gaussian_frechet_distance_one_dimension():
    # (μ₁ − μ₂)² + (σ₁ − σ₂)², numpy arrays accepted as well as tensors
    got = du.gaussian_frechet_distance(np.array([0.3]), np.array([[4.0]]),
                                       np.array([-1.2]), np.array([[0.25]]))
    assert got == pytest.approx(1.5**2 + 1.5**2, rel=1e-12)


def test_gaussian_frechet_distance_commuting_covariances():
    # Σ₁ = Q diag(a) Qᵀ, Σ₂ = Q diag(b) Qᵀ commute: d² = ‖Δμ‖² + Σ (sqrt(a) − sqrt(b))²
    q = random_rotation(5, seed=1)
    a, b = torch.tensor([1.0, 4.0, 9.0, 0.25, 2.0]), torch.tensor([4.0, 1.0, 9.0, 1.0, 0.5])
    mu1, mu2 = torch.zeros(5), torch.full((5,), 0.5)
    cov1, cov2 = q @ torch.diag(a).double() @ q.T, q @ torch.diag(b).double() @ q.T
    expected = 5 * 0.25 + float((a.sqrt() - b.sqrt()).square().sum())
    assert du.gaussian_frechet_distance(mu1, cov1, mu2, cov2) == pytest.approx(expected, rel=1e-10)


def test_gaussian_frechet_distance_general_covariances_and_symmetry():
    # Σ₁ and Σ₂ that do not commute: Tr (Σ₁Σ₂)^{1/2} = Σ sqrt(eigenvalues of Σ₁Σ₂), from numpy
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    cov1, cov2 = a @ a.T + 0.1 * np.eye(6), b @ b.T + 0.1 * np.eye(6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    trace_sqrt = np.sqrt(np.linalg.eigvals(cov1 @ cov2).real).sum()
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2 * trace_sqrt
    got = du.gaussian_frechet_distance(mu1, cov1, mu2, cov2)
    assert got == pytest.approx(expected, rel=1e-9)
    assert du.gaussian_frechet_distance(mu2, cov2, mu1, cov1) == pytest.approx(got, rel=1e-9)


def test_gaussian_frechet_distance_of_a_gaussian_to_itself_is_zero():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(8, 8))
    cov = a @ a.T                                   # rank 8, one eigenvalue may be tiny
    assert du.gaussian_frechet_distance(np.ones(8), cov, np.ones(8), cov) == pytest.approx(0, abs=1e-9)
    singular = np.diag([1.0, 2.0, 0.0])             # a flat direction: sqrt of 0, not of -1e-17
    got = du.gaussian_frechet_distance(np.zeros(3), singular, np.zeros(3), singular)
    assert got == pytest.approx(0, abs=1e-12)


@pytest.mark.parametrize("args, match", [
    ((np.zeros(3), np.eye(3), np.zeros(2), np.eye(2)), "one width d"),
    ((np.zeros((3, 1)), np.eye(3), np.zeros(3), np.eye(3)), r"means \(d,\)"),
    ((np.zeros(3), np.eye(3)[:2], np.zeros(3), np.eye(3)), r"covariances \(d, d\)"),
    ((np.full(3, np.nan), np.eye(3), np.zeros(3), np.eye(3)), "finite"),
    ((np.zeros(2), np.array([[1.0, 0.5], [0.0, 1.0]]), np.zeros(2), np.eye(2)), "symmetric"),
])
def test_gaussian_frechet_distance_rejects_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        du.gaussian_frechet_distance(*args)


# ── the two distances between sets of feature vectors ─────────────────────────────────────

def test_frechet_distance_of_large_samples_approaches_the_closed_form():
    mu1, mu2, s1, s2 = [0.0, 0.0, 1.0], [1.0, -1.0, 1.0], [1.0, 2.0, 0.5], [0.5, 2.0, 1.5]
    expected = 2.0 + 0.25 + 0.0 + 1.0
    a = gaussian_samples(40_000, mu1, s1, seed=0)
    b = gaussian_samples(40_000, mu2, s2, seed=1)
    assert du.frechet_distance(a, b) == pytest.approx(expected, rel=0.02)
    # rotated the same way, the covariances are no longer diagonal but the distance is unchanged
    q = random_rotation(3, seed=4)
    a_rot = gaussian_samples(40_000, mu1, s1, seed=0, rotation=q)
    b_rot = gaussian_samples(40_000, mu2, s2, seed=1, rotation=q)
    assert du.frechet_distance(a_rot, b_rot) == pytest.approx(expected, rel=0.02)


def test_frechet_distance_is_biased_upwards_at_small_n():
    # two samples of ONE distribution: above 0, and shrinking as the samples grow
    small = du.frechet_distance(gaussian_samples(50, [0] * 8, [1] * 8, seed=0),
                                gaussian_samples(50, [0] * 8, [1] * 8, seed=1))
    large = du.frechet_distance(gaussian_samples(2000, [0] * 8, [1] * 8, seed=0),
                                gaussian_samples(2000, [0] * 8, [1] * 8, seed=1))
    assert small > 5 * large > 0


def test_identical_sets_are_at_distance_zero():
    x = gaussian_samples(300, [1.0, 2.0, 3.0, 4.0], [1.0, 0.5, 2.0, 1.0], seed=0)
    assert du.frechet_distance(x, x.clone()) == pytest.approx(0, abs=1e-9)
    # the unbiased kernel distance of a set to itself is exactly -2/(m-1) (mean k(x_i, x_i)
    # - mean k(x_i, x_j)): below 0 by O(1/m), tiny beside a real difference
    m, d = x.shape
    k = (x @ x.T / d + 1) ** 3
    expected = -2 / (m - 1) * float(k.diagonal().mean() - k.mean())
    assert du.kernel_distance(x, x.clone()) == pytest.approx(expected, rel=1e-9)
    shifted = du.kernel_distance(x, x + 0.5)
    assert abs(expected) < 0.05 * shifted


def test_kernel_distance_matches_the_written_out_double_sum():
    x = gaussian_samples(9, [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], seed=5)
    y = gaussian_samples(9, [0.5, 0.0, -0.5], [1.0, 2.0, 1.0], seed=6)

    def k(u, v):
        return (float(u @ v) / 3 + 1) ** 3

    m = 9
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m**2
    assert du.kernel_distance(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-10)


def test_kernel_distance_is_unbiased_and_grows_with_the_shift():
    d, m, repeats = 8, 200, 30
    null = torch.tensor([du.kernel_distance(gaussian_samples(m, [0] * d, [1] * d, seed=2 * r),
                                            gaussian_samples(m, [0] * d, [1] * d, seed=2 * r + 1))
                         for r in range(repeats)])
    standard_error = float(null.std()) / repeats**0.5
    assert abs(float(null.mean())) < 3 * standard_error      # 0 on average: unbiased
    assert (null < 0).any()                                   # so single estimates can be < 0
    shifted = [du.kernel_distance(gaussian_samples(m, [0] * d, [1] * d, seed=100),
                                  gaussian_samples(m, [shift] * d, [1] * d, seed=101))
               for shift in (0.25, 0.5, 1.0)]
    assert shifted[0] > 5 * float(null.std())                # clearly above the noise
    assert shifted[0] < shifted[1] < shifted[2]


def test_kernel_distance_on_subsets_is_deterministic_and_still_unbiased():
    a = gaussian_samples(600, [0] * 4, [1] * 4, seed=7)
    b = gaussian_samples(300, [0] * 4, [1] * 4, seed=8)
    first = du.kernel_distance(a, b, subsets=20, subset_size=150)
    assert du.kernel_distance(a, b, subsets=20, subset_size=150) == first
    far = du.kernel_distance(a, b + 1.0, subsets=20, subset_size=150)
    assert abs(first) < 0.02 * far


def test_both_distances_are_symmetric():
    a = gaussian_samples(400, [0.0, 1.0, 2.0], [1.0, 1.0, 3.0], seed=9)
    b = gaussian_samples(400, [0.5, 1.0, 1.0], [2.0, 0.5, 1.0], seed=10,
                         rotation=random_rotation(3, seed=11))
    assert du.frechet_distance(a, b) == pytest.approx(du.frechet_distance(b, a), rel=1e-9)
    assert du.kernel_distance(a, b) == pytest.approx(du.kernel_distance(b, a), rel=1e-9)


@pytest.mark.parametrize("distance", [du.frechet_distance, du.kernel_distance])
@pytest.mark.parametrize("a, b, match", [
    (torch.zeros(10, 4), torch.zeros(10, 5), "same width F"),
    (torch.zeros(1, 4), torch.zeros(10, 4), "at least 2 feature vectors"),
    (torch.zeros(10, 4, 1), torch.zeros(10, 4), r"2-D \(N, F\)"),
    (torch.zeros(10), torch.zeros(10, 1), r"2-D \(N, F\)"),
    (torch.zeros(10, 4), torch.full((10, 4), float("nan")), "NaN"),
])
def test_distances_reject_bad_feature_sets(distance, a, b, match):
    with pytest.raises(ValueError, match=match):
        distance(a, b)


def test_kernel_distance_rejects_bad_subsets():
    x = torch.zeros(10, 4)
    with pytest.raises(ValueError, match="subset_size"):
        du.kernel_distance(x, x, subset_size=1)
    with pytest.raises(ValueError, match="subsets"):
        du.kernel_distance(x, x, subsets=0)


# ── on images, through the shipped classifier ─────────────────────────────────────────────

@pytest.fixture(scope="module")
def classifier():
    torch.set_num_threads(1)
    return du.load_classifier()


@pytest.fixture(scope="module")
def image_sets(classifier):
    """Real images (two independent sets), pure noise, and two collapsed sets built from real
    images the classifier recognises confidently: one image repeated, four images repeated."""
    real = du.reference_images(N_IMAGES)
    other = du.reference_images(N_IMAGES, seed=du.REFERENCE_SEED + 1)
    noise = torch.randn(N_IMAGES, 3, 32, 32, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    with torch.no_grad():
        confidence = classifier(other[:64])["shape"].softmax(-1).amax(-1)
    best = confidence.argsort(descending=True)
    one = other[best[:1]].repeat(N_IMAGES, 1, 1, 1)
    four = other[best[:4]].repeat(N_IMAGES // 4, 1, 1, 1)
    sets = {"real": real, "other real": other, "noise": noise, "one image": one, "four images": four}
    feats = {name: du.classifier_features(images, classifier) for name, images in sets.items()}
    return sets, feats


def test_reference_images_are_real_unseen_images_in_range():
    images = du.reference_images(6)
    assert images.shape == (6, 3, 32, 32) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1
    assert torch.equal(images, du.reference_images(6))
    assert torch.equal(images, du.from_uint8(du.make_shapes(6, seed=du.REFERENCE_SEED).images))
    training_seed = du.from_uint8(du.make_shapes(6, seed=0).images)
    assert not torch.equal(images, training_seed)
    held_out = du.reference_images(6, split="held_out")
    assert not torch.equal(images, held_out)


def test_classifier_features_are_the_pooled_penultimate_layer(classifier, image_sets):
    sets, feats = image_sets
    f = feats["real"]
    assert f.shape == (N_IMAGES, 64) and f.dtype == torch.float64 and f.device.type == "cpu"
    with torch.no_grad():
        direct = classifier.features(sets["real"][:10])
    torch.testing.assert_close(f[:10], direct.double())
    in_small_batches = du.classifier_features(sets["real"][:10].double(), classifier, batch_size=3)
    torch.testing.assert_close(in_small_batches, f[:10], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("images, match", [
    (torch.zeros(4, 1, 32, 32), r"\(N, 3, H, W\)"),
    (torch.zeros(3, 32, 32), r"\(N, 3, H, W\)"),
    (torch.zeros(0, 3, 32, 32), "at least one image"),
    (torch.zeros(4, 3, 32, 32, dtype=torch.uint8), "from_uint8"),
])
def test_classifier_features_rejects_bad_images(classifier, images, match):
    with pytest.raises(ValueError, match=match):
        du.classifier_features(images, classifier)


def test_real_sets_are_close_and_noise_is_far(image_sets):
    _, feats = image_sets
    fd_real = du.frechet_distance(feats["other real"], feats["real"])
    fd_noise = du.frechet_distance(feats["noise"], feats["real"])
    kd_real = du.kernel_distance(feats["other real"], feats["real"])
    kd_noise = du.kernel_distance(feats["noise"], feats["real"])
    assert 0 < fd_real < 0.05 * fd_noise
    assert abs(kd_real) < 0.02 * kd_noise


def test_a_collapsed_set_is_recognised_yet_far_from_real_data(classifier, image_sets):
    """The course's point: one perfect image repeated passes the per-image test, and the
    distances between sets catch it."""
    sets, feats = image_sets
    fd_real = du.frechet_distance(feats["other real"], feats["real"])
    kd_real = du.kernel_distance(feats["other real"], feats["real"])
    assert du.recognised_fraction(sets["other real"], classifier) < 1.0
    for name in ("one image", "four images"):
        assert du.recognised_fraction(sets[name], classifier) == 1.0, name
        fd = du.frechet_distance(feats[name], feats["real"])
        kd = du.kernel_distance(feats[name], feats["real"])
        assert fd > 10 * fd_real, name
        assert kd > 0.1 * du.kernel_distance(feats["noise"], feats["real"]), name
        assert kd > 20 * abs(kd_real), name
    # fewer distinct images, further away
    assert (du.frechet_distance(feats["one image"], feats["real"])
            > du.frechet_distance(feats["four images"], feats["real"]))


def test_distribution_distances_from_images(classifier, image_sets):
    sets, feats = image_sets
    got = du.distribution_distances(sets["four images"], sets["real"], classifier)
    assert set(got) == {"frechet", "kernel"}
    f, f_ref = feats["four images"], feats["real"]
    assert got["frechet"] == pytest.approx(du.frechet_distance(f, f_ref), rel=1e-6)
    assert got["kernel"] == pytest.approx(du.kernel_distance(f, f_ref), rel=1e-6)
