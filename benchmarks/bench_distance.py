"""The distances between sets of images (`du.frechet_distance`, `du.kernel_distance`, on the
shipped classifier's features) and the recognised fraction, for growing numbers of images N.

    python benchmarks/bench_distance.py [--sizes 100 250 500 1000] [--repeats 3] [--threads 1]

Each set of N images is measured against N real reference images (`du.reference_images`):
  real          another independent set of real images: the floor; what remains is the
                estimator's small-sample error (the Fréchet distance is biased upwards, about
                like 1/N; the kernel distance is unbiased, scattered around 0). Mean ± standard
                deviation over --repeats independent sets.
  noise         Gaussian noise clamped to [-1, 1]: far away, nothing recognised.
  four images   the 4 most confidently recognised of a real set, repeated N/4 times.
  one image     the most confidently recognised real image, repeated N times: recognised
                perfectly, yet far from real data — what the recognised fraction cannot see.
The last column is the time to compute the N images' features.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import diffusion_utilities as du  # noqa: E402


def collapsed_sets(images: torch.Tensor, classifier, n: int) -> dict[str, torch.Tensor]:
    """One and four of the most confidently recognised ``images``, repeated to ``n`` images."""
    with torch.no_grad():
        confidence = classifier(images[:64])["shape"].softmax(-1).amax(-1)
    best = confidence.argsort(descending=True)
    return {"four images": images[best[:4]].repeat(n // 4 + 1, 1, 1, 1)[:n],
            "one image": images[best[:1]].repeat(n, 1, 1, 1)}


def measure(images: torch.Tensor, feats_ref: torch.Tensor,
            classifier) -> tuple[float, float, float, float]:
    """(Fréchet, kernel, recognised fraction, seconds for the features) of ``images``."""
    start = time.perf_counter()
    feats = du.classifier_features(images, classifier)
    seconds = time.perf_counter() - start
    return (du.frechet_distance(feats, feats_ref), du.kernel_distance(feats, feats_ref),
            du.recognised_fraction(images, classifier), seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 250, 500, 1000])
    parser.add_argument("--repeats", type=int, default=3, help="independent real sets per N")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    classifier = du.load_classifier()
    width = du.CheckpointManifest.load().entry("classifier")["config"]["width"]
    print(f"classifier features: {4 * width} dimensions; cpu, {args.threads} thread(s)\n")
    print(f"{'N':>5}  {'set':<12}{'Fréchet':>16}{'kernel':>20}{'recognised':>12}{'features (s)':>14}")
    for n in args.sizes:
        feats_ref = du.classifier_features(du.reference_images(n), classifier)
        rows = [measure(du.reference_images(n, seed=du.REFERENCE_SEED + 1 + r), feats_ref, classifier)
                for r in range(args.repeats)]
        columns = list(zip(*rows))
        spread = [statistics.stdev(c) if len(c) > 1 else 0.0 for c in columns[:2]]
        print(f"{n:>5}  {'real':<12}{statistics.mean(columns[0]):>9.3f} ± {spread[0]:<5.3f}"
              f"{statistics.mean(columns[1]):>12.4f} ± {spread[1]:<6.4f}"
              f"{statistics.mean(columns[2]):>11.3f}{statistics.mean(columns[3]):>14.2f}")
        noise = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(n)).clamp(-1, 1)
        others = {"noise": noise,
                  **collapsed_sets(du.reference_images(n, seed=du.REFERENCE_SEED + 1), classifier, n)}
        for name, images in others.items():
            fd, kd, fraction, seconds = measure(images, feats_ref, classifier)
            print(f"{n:>5}  {name:<12}{fd:>9.3f}{'':>7}{kd:>12.4f}{'':>8}"
                  f"{fraction:>12.3f}{seconds:>14.2f}")
        print()


if __name__ == "__main__":
    main()
