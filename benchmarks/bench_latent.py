"""Latent against pixel diffusion (lesson 07), measured: the shipped pixel model and the
shipped latent model side by side, for size, speed and quality.

    python benchmarks/bench_latent.py                          # 256 images, 50 steps, all threads
    python benchmarks/bench_latent.py --threads 1 --n 512 --batch-size 128
    python benchmarks/bench_latent.py --data-dir /path/to/checkpoints   # another vae + latent_unet
    python benchmarks/bench_latent.py --quick                  # seconds: a smoke test

The pixel model is ``ddpm_shapes`` (``du.load_diffusion_model()``), a UNet on 3x32x32 images.
The latent model is ``latent_unet`` on the 4x8x8 latents of the shipped VAE (``du.load_vae()``,
scale factor ``du.vae_scale()``), sampled by ``du.LatentDiffusion(...).images``, which decodes.
The pixel model, the attribute classifier (the judge) and the real images always come from
data/; ``--data-dir`` says where the ``vae`` and ``latent_unet`` checkpoints are.

One row per model:

- parameters of the UNet (and of the VAE, for the latent model) and the numbers per image the
  UNet denoises;
- training step: ``du.train_step`` (forward + backward + gradient clipping + AdamW step) on a
  batch of ``--batch-size``, the median of a few timed steps after a warm-up; the latent
  model's batch is already encoded (as its training run encodes the data set once);
- sampling: ``--n`` images by deterministic DDIM (η = 0, "trailing" timesteps, ``--steps``
  steps) in batches of ``--batch-size``, one seed; the latent model's time includes decoding
  the latents, and the decode alone is timed too (``du.decode_latents`` of ``--n`` latents);
- quality of those images: the recognised fraction (``du.recognised_fraction``: the
  classifier names the shape with probability >= 0.9) and the Fréchet and kernel distances of
  the classifier's features to ``--n`` real images (``du.distribution_distances`` against
  ``du.reference_images``). A row of other real images gives the floor of the distances at
  this number of images.

Everything runs in float32 (no bfloat16 autocast, no channels_last), so the two models are
compared like for like. No assertions: this prints numbers.
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import diffusion_utilities as du  # noqa: E402

WARMUP_STEPS, TIMED_STEPS = 2, 5    # training steps: untimed, then timed (median kept)
COLUMNS = ("model", "UNet params", "VAE params", "UNet input", "numbers/image", "train step ms",
           "sample s", "decode s", "img/s", "recognised", "Fréchet", "kernel")
FORMATS = {"UNet params": "{:,.0f}", "VAE params": "{:,.0f}", "numbers/image": "{:,.0f}",
           "train step ms": "{:.0f}", "sample s": "{:.2f}", "decode s": "{:.3f}",
           "img/s": "{:.1f}", "recognised": "{:.3f}", "Fréchet": "{:.2f}", "kernel": "{:.4f}"}


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    """``(result, seconds)`` of ``fn()``."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start


def train_step_seconds(unet, schedule, x0: torch.Tensor, args, device) -> float:
    """The median time of one ``du.train_step`` on ``x0`` (a copy of ``unet`` is trained, so the
    shipped weights stay as they are), after ``args.warmup_steps`` untimed steps."""
    model = copy.deepcopy(unet).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x0 = x0.to(device)
    step = lambda: du.train_step(model, optimizer, x0, schedule, autocast=False)  # noqa: E731
    for _ in range(args.warmup_steps):
        step()
    return statistics.median(timed(step, device)[1] for _ in range(args.timed_steps))


def measure(name, unet, schedule, x0, sample, args, device, classifier, reference) -> dict:
    """One row: ``sample(n, steps)`` -> ``(images, decode seconds or None)``, timed after an
    untimed warm-up of two images and one step."""
    train_s = train_step_seconds(unet, schedule, x0, args, device)
    sample(2, 1)
    (images, decode_s), sample_s = timed(lambda: sample(args.n, args.steps), device)
    distances = du.distribution_distances(images, reference, classifier)
    return {"model": name, "UNet params": du.count_parameters(unet), "numbers/image": x0[0].numel(),
            "UNet input": "x".join(map(str, x0.shape[1:])), "train step ms": 1000 * train_s,
            "sample s": sample_s, "decode s": decode_s, "img/s": len(images) / sample_s,
            "recognised": du.recognised_fraction(images, classifier),
            "Fréchet": distances["frechet"], "kernel": distances["kernel"]}


def table(rows: list[dict]) -> str:
    """The rows as a pandas table, each column at a readable precision, "-" where empty."""
    def cell(form):
        return lambda value: "-" if pd.isna(value) else form.format(value)
    frame = pd.DataFrame(rows, columns=COLUMNS).set_index("model")
    return frame.to_string(formatters={c: cell(f) for c, f in FORMATS.items()}, na_rep="-")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=256, help="images sampled per model")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="the training step's batch, and the sampling batch")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None,
                        help="where the vae and latent_unet checkpoints are (default data/); "
                             "ddpm_shapes and the classifier always load from data/")
    parser.add_argument("--quick", action="store_true",
                        help="a tiny run (4 images, 2 steps, one timed training step): "
                             "a smoke test")
    args = parser.parse_args(argv)
    args.warmup_steps, args.timed_steps = WARMUP_STEPS, TIMED_STEPS
    if args.quick:
        args.n, args.steps, args.batch_size = 4, 2, 4
        args.warmup_steps, args.timed_steps = 1, 1
    if args.n < 2:
        parser.error(f"argument --n: expected at least 2 images (the distances need two), "
                     f"got {args.n}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = du.get_device()

    pixel, pixel_schedule = du.load_diffusion_model("ddpm_shapes", device=device)
    latent, latent_schedule = du.load_diffusion_model("latent_unet", data_dir=args.data_dir,
                                                      device=device)
    vae = du.load_vae(data_dir=args.data_dir, device=device)
    scale = du.vae_scale(data_dir=args.data_dir)
    model = du.LatentDiffusion(latent, vae, scale, latent_schedule)
    classifier = du.load_classifier(device=device)
    manifest = du.CheckpointManifest.load(args.data_dir)
    if manifest.entry("latent_unet")["trained_on"]["vae_sha256"] != manifest.entry("vae")["sha256"]:
        print("warning: latent_unet was trained on the latents of another VAE than this one")
    print(f"torch {torch.__version__}, {platform.machine()} {device}, {torch.get_num_threads()} "
          f"threads, load average {os.getloadavg()[0]:.1f}; float32 throughout; vae and "
          f"latent_unet from {manifest.path.parent}, latent scale {scale:.4f}\n")

    start = time.perf_counter()
    reference = du.reference_images(args.n)
    real = du.reference_images(args.batch_size)              # a training batch
    latents = du.encode_latents(vae, real, scale)             # ... encoded once, as in training

    def pixel_images(n, steps):
        return du.ddim_images(pixel, n, pixel_schedule, num_steps=steps,
                              batch_size=args.batch_size, autocast=False, progress=False,
                              generator=torch.Generator(device).manual_seed(args.seed)).cpu(), None

    def latent_images(n, steps):
        images = model.images(n, num_steps=steps, batch_size=args.batch_size,
                              autocast=False, progress=False,   # (passed on to du.ddim_images)
                              generator=torch.Generator(device).manual_seed(args.seed)).cpu()
        noise = torch.randn(n, *model.latent_shape, device=device)
        return images, timed(lambda: du.decode_latents(vae, noise, scale,
                                                       batch_size=args.batch_size), device)[1]

    rows = [measure("pixel (ddpm_shapes)", pixel, pixel_schedule, real, pixel_images, args,
                    device, classifier, reference),
            {**measure("latent (latent_unet + vae)", latent, latent_schedule, latents,
                       latent_images, args, device, classifier, reference),
             "VAE params": du.count_parameters(vae)}]
    other = du.reference_images(args.n, seed=du.REFERENCE_SEED + 1)
    floor = du.distribution_distances(other, reference, classifier)
    rows.append({"model": "real images (another seed)",
                 "recognised": du.recognised_fraction(other, classifier),
                 "Fréchet": floor["frechet"], "kernel": floor["kernel"]})
    print(f"== latent against pixel diffusion: training step on a batch of {args.batch_size} "
          f"(median of {args.timed_steps} after {args.warmup_steps} warm-up);\n   {args.n} images "
          f"by DDIM, {args.steps} steps, η = 0, seed {args.seed}, in batches of "
          f"{args.batch_size} (latent: decode included in sample s, and alone in decode s);\n   "
          f"distances to {args.n} real images (du.reference_images)")
    print(table(rows))
    p, q = rows[0], rows[1]
    print(f"speed-up of latent over pixel: training step "
          f"{p['train step ms'] / q['train step ms']:.1f}x, "
          f"sampling {p['sample s'] / q['sample s']:.1f}x (decode included), "
          f"{p['sample s'] / (q['sample s'] - q['decode s']):.1f}x (without the decode); "
          f"{p['numbers/image'] / q['numbers/image']:.0f}x fewer numbers per image denoised")
    print(f"\ntotal {time.perf_counter() - start:.0f} s; load average at the end "
          f"{os.getloadavg()[0]:.1f} (other work on the machine slows every row)")


if __name__ == "__main__":
    main()
