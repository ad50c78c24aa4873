"""The course's quality measure on three sets of images: samples of the shipped DDPM model,
real shapes images (the ceiling) and pure noise (the floor).

    python benchmarks/bench_quality.py [--num-samples 256] [--steps 250] [--threads 2]

The recognised fraction is the share of images whose shape the shipped attribute classifier
names with probability >= 0.9 (`du.recognised_fraction`).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import diffusion_utilities as du  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-samples", type=int, default=256)
    parser.add_argument("--steps", type=int, default=None,
                        help="DDPM steps (respaced); default: what the manifest's figure used")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = du.get_device()
    classifier = du.load_classifier(device=device)
    rows = []

    n = args.num_samples
    real = du.make_shapes(n, seed=30_000 + args.seed)
    real_images = du.from_uint8(real.images)
    rows.append(("real shapes images", n, du.recognised_fraction(real_images, classifier), 0.0))
    noise = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(args.seed))
    rows.append(("pure noise (clamped)", n, du.recognised_fraction(noise.clamp(-1, 1), classifier),
                 0.0))

    manifest = du.CheckpointManifest.load()
    if "ddpm_shapes" in manifest.entries:
        entry = manifest.entry("ddpm_shapes")
        steps = args.steps or entry["quality"].get("num_steps", 250)
        model, schedule = du.load_diffusion_model("ddpm_shapes", device=device)
        start = time.time()
        samples = du.sample_images(model, n, schedule, num_steps=steps, batch_size=64,
                                   generator=torch.Generator(device).manual_seed(args.seed),
                                   device=device)
        wall = time.time() - start
        rows.append((f"DDPM samples ({steps} steps)", n,
                     du.recognised_fraction(samples, classifier), wall))
        print(f"manifest figure: {entry['quality']['recognised_fraction']:.3f} "
              f"({entry['quality']['sampler']})")
    else:
        print("no ddpm_shapes checkpoint in data/manifest.json: `python -m tools.train ddpm`")

    print(f"\n{'images':<28}{'N':>6}{'recognised':>12}{'time (s)':>10}   device: {device}")
    for name, count, fraction, wall in rows:
        print(f"{name:<28}{count:>6}{fraction:>12.3f}{wall:>10.1f}")


if __name__ == "__main__":
    main()
