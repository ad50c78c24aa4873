"""Guidance from outside the denoiser (lesson 09), measured: the shipped unconditional model
guided towards each shape by the noise-aware classifier and by CLIP, against the scale.

    python benchmarks/bench_guidance.py                            # 128 images per scale
    python benchmarks/bench_guidance.py --threads 1 --n 256 --steps 50
    python benchmarks/bench_guidance.py --classifier-scales 0 3 10 --clip-scales 0 300
    python benchmarks/bench_guidance.py --quick                    # seconds: a smoke test

Each scale samples ``--n`` images with deterministic DDIM (η = 0, "trailing" timesteps,
``--steps`` steps) from ``du.Guided(model, guide)``, all from the same starting noises (one
seed), image i asked for shape i mod 6, so every shape is asked equally often:

1. classifier guidance (Dhariwal & Nichol 2021, eq. 14): ``du.guided_eps`` with the gradient
   ``du.classifier_log_prob_grad`` of the noise-aware classifier ``du.load_noisy_classifier()``;
2. CLIP guidance on the predicted clean image: ``du.clip_guided_eps`` towards the normalised
   mean of each shape's prompt ensemble (``du.zero_shot_class_features(clip, "shape")``).

Each row: the scale s (0: unguided), the target accuracy (the share of images in which the
shipped attribute classifier, which did not guide, reads the asked shape:
``du.attribute_agreement``), the Fréchet and kernel distances of the judge's features to as
many real images with the same shapes (``du.distribution_distances``), the share in which the
guide itself reads the asked shape (the noise-aware classifier at t = 0; CLIP zero-shot), the
standard deviation of the pixels (contrast), the share of saturated pixels (|x| > 0.98), and the
wall time. A row of other real images with the same shapes gives
the floor of the distances at this number of images. No assertions: this prints numbers.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import diffusion_utilities as du  # noqa: E402

CLASSIFIER_SCALES = (0, 1, 3, 10, 30, 100, 300)
CLIP_SCALES = (0, 3, 10, 30, 100, 300)


def real_images_with(values: torch.Tensor, *, seed: int) -> torch.Tensor:
    """Real images whose shape is ``values[i]``, one per value, in that order."""
    data = du.make_shapes(20 * len(values), seed=seed)
    pools = {v: (data.labels[:, 0] == v).nonzero().flatten().tolist() for v in range(len(du.SHAPES))}
    return du.from_uint8(data.images[[pools[v].pop(0) for v in values.tolist()]])


def guided_images(model, schedule, make_guide, targets, args, device) -> torch.Tensor:
    """DDIM images from ``du.Guided(model, make_guide(targets[batch]))``, in batches of
    ``--batch-size``; one generator, so the starting noises depend only on the seed."""
    generator = torch.Generator(device).manual_seed(args.seed)
    out = []
    for start in range(0, len(targets), args.batch_size):
        y = targets[start:start + args.batch_size].to(device)
        out.append(du.ddim_images(du.Guided(model, make_guide(y)), len(y), schedule,
                                  num_steps=args.steps, generator=generator, device=device,
                                  progress=False).cpu())
    return torch.cat(out)


def sweep(title, scales, make_guide_at, guide_reads, model, schedule, judge, targets, reference,
          other_real, args, device) -> None:
    """Print one row per scale; ``guide_reads(images)``: the share of images in which the
    guide itself reads the asked shape."""
    asked = torch.full((len(targets), len(du.ATTRIBUTES)), -1)
    asked[:, 0] = targets
    print(f"== {title}: {len(targets)} images per scale, DDIM {args.steps} steps, seed "
          f"{args.seed}; distances to {len(targets)} real images with the same shapes")
    print(f"{'scale s':>12}{'target acc':>12}{'guide reads':>13}{'Fréchet':>10}{'kernel':>10}"
          f"{'pixel std':>11}{'saturated':>11}{'seconds':>9}")

    def report(name, images, seconds):
        dist = du.distribution_distances(images, reference, judge)
        accuracy = du.attribute_agreement(images, asked, judge)["shape"]
        saturated = (images.abs() > 0.98).float().mean().item()
        timing = f"{seconds:9.1f}" if seconds is not None else f"{'-':>9}"
        print(f"{name:>12}{accuracy:12.3f}{guide_reads(images):13.3f}{dist['frechet']:10.2f}"
              f"{dist['kernel']:10.3f}{images.std().item():11.3f}{saturated:11.3f}{timing}",
              flush=True)

    report("real images", other_real, None)
    for scale in scales:
        start = time.perf_counter()
        images = guided_images(model, schedule, make_guide_at(scale), targets, args, device)
        report(f"{scale:g}", images, time.perf_counter() - start)
    print()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=128, help="images per scale")
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--classifier-scales", type=float, nargs="*",
                        default=list(CLASSIFIER_SCALES), help="classifier guidance scales")
    parser.add_argument("--clip-scales", type=float, nargs="*", default=list(CLIP_SCALES),
                        help="CLIP guidance scales")
    parser.add_argument("--quick", action="store_true",
                        help="a tiny run (6 images, 3 steps, two scales each): a smoke test")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.steps = 6, 3
        args.classifier_scales, args.clip_scales = [0, 10], [0, 30]
    if args.n < 2:
        parser.error(f"argument --n: expected at least 2 images (the distances need two), got {args.n}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = du.get_device()
    model, schedule = du.load_diffusion_model(device=device)
    judge = du.load_classifier(device=device)
    targets = torch.arange(len(du.SHAPES)).repeat(-(-args.n // len(du.SHAPES)))[:args.n]
    reference = real_images_with(targets, seed=du.REFERENCE_SEED)
    other_real = real_images_with(targets, seed=du.REFERENCE_SEED + 2)
    print(f"torch {torch.__version__}, {platform.machine()} {device}, {torch.get_num_threads()} "
          f"threads, load average {os.getloadavg()[0]:.1f}; model ddpm_shapes, schedule "
          f"{du.CheckpointManifest.load().entry('ddpm_shapes')['schedule']}\n")
    start = time.perf_counter()
    if args.classifier_scales:
        noisy = du.load_noisy_classifier(device=device)

        def classifier_guide_at(scale):
            def make_guide(y):
                return lambda eps, xt, t: du.guided_eps(
                    eps, du.classifier_log_prob_grad(noisy, xt, t, y), t, schedule, scale)
            return make_guide

        @torch.no_grad()
        def noisy_reads(images):   # the guide at t = 0
            t0 = torch.zeros(len(images), dtype=torch.long, device=device)
            read = noisy(images.to(device), t0)["shape"].argmax(-1).cpu()
            return (read == targets).float().mean().item()

        sweep("1. classifier guidance (the noise-aware classifier's shape head)",
              args.classifier_scales, classifier_guide_at, noisy_reads, model, schedule, judge,
              targets, reference, other_real, args, device)
    if args.clip_scales:
        clip = du.load_clip(device=device)
        prompts = F.normalize(du.zero_shot_class_features(clip, "shape"), dim=-1)   # (6, P, D)
        shape_text = F.normalize(prompts.mean(1), dim=-1).to(device)                 # (6, D)

        def clip_guide_at(scale):
            def make_guide(y):
                return lambda eps, xt, t: du.clip_guided_eps(clip, eps, xt, t, schedule,
                                                             shape_text[y], scale)
            return make_guide

        def clip_reads(images):    # CLIP zero-shot, against the same shape targets
            scores = du.embed_images(clip, images) @ shape_text.cpu().T
            return (scores.argmax(-1) == targets).float().mean().item()

        sweep("2. CLIP guidance on x̂₀ (each shape's prompt-ensemble mean)", args.clip_scales,
              clip_guide_at, clip_reads, model, schedule, judge, targets, reference, other_real,
              args, device)
    print(f"total {time.perf_counter() - start:.0f} s; load average at the end "
          f"{os.getloadavg()[0]:.1f} (other work on the machine slows every row)")


if __name__ == "__main__":
    main()
