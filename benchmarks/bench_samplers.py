"""DDIM against DDPM on the shipped model (time and quality), and the library's DDIM loop
against diffusers' DDIMScheduler driving the same network (speed, and where the time goes).

    python benchmarks/bench_samplers.py                          # 256 images, all threads
    python benchmarks/bench_samplers.py --threads 1 --n 256 --batch-size 64
    python benchmarks/bench_samplers.py --quick                  # seconds: a smoke test

Part 1, quality for time: the shipped unconditional model (``ddpm_shapes``) samples ``--n``
images with DDPM's 1000 ancestral steps (``du.sample_images``) and with deterministic DDIM
(η = 0, "trailing" timesteps, ``du.ddim_images``) in 10, 20, 50 and 100 steps, all from the
same starting noise (one seed). Each row: wall time, images per second, the share of time
spent in the network, the recognised fraction (``du.recognised_fraction``: the classifier
names the shape with probability >= 0.9) and the Fréchet and kernel distances of the
classifier's features to ``--n`` real images (``du.distribution_distances`` against
``du.reference_images``). A row of other real images gives the floor of those distances at
this number of images. Everything runs in the library's default mode (it says which).

Part 2, the sampler loop: one batch of ``--batch-size`` images, 50 DDIM steps (η = 0,
"trailing", x̂₀ clipped to [-1, 1]), the same network, starting noise, threads and dtype:
``du.ddim_sample`` against a plain diffusers loop (``DDIMScheduler.set_timesteps`` then
``step`` with ``use_clipped_model_output=True``, which is what clipping x̂₀ means in the
library). Like for like in float32; then the library's default (``autocast=None``) and the
mode ``du.fast_setup`` measures as fastest here (for both loops). Rows are measured in turns,
each keeping its best round. The network's forward passes are timed with
``time.perf_counter`` around each call; the rest is the sampler: the step arithmetic and the
loop. The largest difference between the two loops' images is printed too.

diffusers is optional (pip install -r requirements-dev.txt); without it part 2 measures the
library only. No assertions on speed: this prints numbers.
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import diffusion_utilities as du  # noqa: E402

DDIM_STEPS = (10, 20, 50, 100)
COMPARE_STEPS = 50


class TimedNet(nn.Module):
    """The network, adding up the seconds spent in its forward passes (``seconds``, ``calls``)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.seconds, self.calls = 0.0, 0
        if hasattr(net, "fast_choice"):     # the library's samplers follow fast_setup's choice
            self.fast_choice = net.fast_choice

    def forward(self, x, t, **cond):
        synchronize(x.device)
        start = time.perf_counter()
        out = self.net(x, t, **cond)
        synchronize(x.device)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn):
    """``(result, seconds)`` of ``fn()``."""
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


# ── part 1: DDIM against DDPM ──


def quality_rows(model, schedule, classifier, args, device) -> None:
    n, bs = args.n, args.batch_size
    reference = du.reference_images(n)
    mode = "bfloat16 autocast" if du._bf16_is_fast(device, model) else "float32"
    print(f"== 1. DDIM against DDPM: {n} images in batches of {bs}, seed {args.seed}, {mode} "
          f"(the library's default here), distances to {n} real images (du.reference_images)")
    header = (f"{'sampler':<34}{'steps':>6}{'wall s':>9}{'img/s':>8}{'net %':>7}"
              f"{'recognised':>11}{'Fréchet':>10}{'kernel':>10}")
    print(header)

    def report(name, steps, images, seconds, net_seconds):
        dist = du.distribution_distances(images, reference, classifier)
        if net_seconds is None:   # not sampled
            timing = f"{'-':>6}{'-':>9}{'-':>8}{'-':>7}"
        else:
            timing = (f"{steps:>6}{seconds:9.1f}{len(images) / seconds:8.2f}"
                      f"{100 * net_seconds / seconds:6.0f}%")
        print(f"{name:<34}{timing}"
              f"{du.recognised_fraction(images, classifier):11.3f}{dist['frechet']:10.3f}"
              f"{dist['kernel']:10.4f}", flush=True)
        return seconds

    other_real = du.reference_images(n, seed=du.REFERENCE_SEED + 1)
    report("real images (another seed)", 0, other_real, 0.0, None)
    walls = {}
    for eta in args.etas:
        for steps in args.ddim_steps:
            net = TimedNet(model)
            images, wall = timed(lambda: du.ddim_images(
                net, n, schedule, num_steps=steps, eta=eta, batch_size=bs, device=device,
                generator=torch.Generator(device).manual_seed(args.seed), progress=False))
            walls[f"DDIM {steps} (η = {eta:g})"] = report(f"DDIM, η = {eta:g}, trailing", steps,
                                                           images, wall, net.seconds)
    net = TimedNet(model)
    ddpm_steps = args.ddpm_steps or schedule.T
    images, wall = timed(lambda: du.sample_images(
        net, n, schedule, num_steps=ddpm_steps, batch_size=bs, device=device,
        generator=torch.Generator(device).manual_seed(args.seed), progress=False))
    label = "DDPM, ancestral" + ("" if ddpm_steps == schedule.T else " (respaced)")
    walls["DDPM"] = report(label, ddpm_steps, images, wall, net.seconds)
    for key in walls:
        if key.startswith("DDIM"):
            print(f"time ratio DDPM {ddpm_steps} steps / {key}: "
                  f"{walls['DDPM'] / walls[key]:.1f}x")


# ── part 2: the library's DDIM loop against diffusers' ──


def diffusers_ddim(net, x_T, schedule, num_steps, autocast):
    """A plain diffusers DDIM loop (set_timesteps, then step) on our schedule's betas: the
    images, clamped to [-1, 1]. use_clipped_model_output=True is what clip_x0 means in ours."""
    from diffusers import DDIMScheduler
    scheduler = DDIMScheduler(
        num_train_timesteps=schedule.T, trained_betas=schedule.betas.cpu().tolist(),
        clip_sample=True, set_alpha_to_one=True, steps_offset=0, timestep_spacing="trailing",
        prediction_type="epsilon")
    scheduler.set_timesteps(num_steps, device=x_T.device)
    x = x_T
    with torch.no_grad():
        for t in scheduler.timesteps:
            with autocast():
                eps = net(x, t.expand(len(x))).float()                  # ε_θ(x_t, t)
            x = scheduler.step(eps, t, x, eta=0.0, use_clipped_model_output=True).prev_sample
    return x.clamp(-1, 1)


def library_ddim(net, x_T, schedule, num_steps, autocast):
    for x in du.ddim_sample(net, x_T.shape, schedule, num_steps=num_steps, eta=0.0,
                            spacing="trailing", x_T=x_T, autocast=autocast, progress=False):
        pass
    return x.clamp(-1, 1)


def loop_rows(model, schedule, args, device) -> None:
    try:
        import diffusers
    except ImportError:
        diffusers = None
    steps, bs = args.compare_steps, args.batch_size
    x_T = torch.randn(bs, 3, 32, 32, generator=torch.Generator().manual_seed(args.seed)).to(device)
    no_autocast = lambda: du.autocast_context(device, enabled=False)   # noqa: E731
    bf16 = lambda: du.autocast_context(device, enabled=True)           # noqa: E731

    default_bf16 = du._bf16_is_fast(device, model)
    rows = {}   # name -> (run(), TimedNet)
    if diffusers is not None:
        net = TimedNet(model)
        rows["diffusers loop, float32"] = (
            lambda net=net: diffusers_ddim(net, x_T, schedule, steps, no_autocast), net)
    net = TimedNet(model)
    rows["du.ddim_sample, float32"] = (
        lambda net=net: library_ddim(net, x_T, schedule, steps, False), net)
    net = TimedNet(model)
    rows[f"du.ddim_sample, default ({'bfloat16' if default_bf16 else 'float32'})"] = (
        lambda net=net: library_ddim(net, x_T, schedule, steps, None), net)
    if not args.quick:
        saved = dict(du._FAST_ON_DEVICE)    # fast_setup remembers its choice per device:
        fast_model, _ = du.fast_setup(copy.deepcopy(model), cache=False)   # measured afresh
        du._FAST_ON_DEVICE.clear()
        du._FAST_ON_DEVICE.update(saved)    # ... keep it to its own rows
        choice = fast_model.fast_choice
        seconds = ", ".join(f"{m} {1000 * s:.0f} ms" for m, s in choice.seconds.items())
        print(f"du.fast_setup chose {choice.describe()} (forward + backward at batch "
              f"{choice.batch}: {seconds})")
        net = TimedNet(fast_model)
        rows["du.ddim_sample, fast path"] = (
            lambda net=net: library_ddim(net, x_T, schedule, steps, None), net)
        if diffusers is not None:
            net = TimedNet(fast_model)
            rows["diffusers loop, fast path"] = (
                lambda net=net: diffusers_ddim(net, x_T, schedule, steps,
                                               bf16 if choice.bf16 else no_autocast), net)
    if diffusers is None:
        print("diffusers is not installed (pip install -r requirements-dev.txt): "
              "measuring the library's loop only")

    print(f"\n== 2. the sampler loop: {bs} images, {steps} DDIM steps (η = 0, trailing, x̂₀ "
          f"clipped), {args.rounds} rounds, best kept"
          + (f"; diffusers {diffusers.__version__} (its loop: DDIMScheduler.set_timesteps, "
             "then step)" if diffusers is not None else "")
          + ("" if args.quick else "; fast path: the mode du.fast_setup chose (above)"))
    best = {name: None for name in rows}
    images = {}
    for _ in range(args.rounds):
        for name, (run, net) in rows.items():
            net.seconds, net.calls = 0.0, 0
            out, wall = timed(run)
            images[name] = out
            if best[name] is None or wall < best[name][0]:
                best[name] = (wall, net.seconds, net.calls)
    base = next((b[0] for n, b in best.items() if n.startswith("diffusers") and "float32" in n),
                None)
    print(f"{'loop':<36}{'wall s':>8}{'img/s':>8}{'net s':>8}{'net %':>7}"
          f"{'sampler ms/step':>16}{'speed vs diffusers f32':>23}")
    for name, (wall, net_s, calls) in best.items():
        rest_ms = 1000 * (wall - net_s) / max(calls, 1)
        ratio = f"{base / wall:22.2f}x" if base else f"{'-':>23}"
        print(f"{name:<36}{wall:8.2f}{bs / wall:8.1f}{net_s:8.2f}{100 * net_s / wall:6.0f}%"
              f"{rest_ms:16.2f}{ratio}")
    if diffusers is not None:
        print("largest |difference| between the two loops' images (rounding alone moves x̂₀ by "
              "~1e-3 in float32 at the first step, t = 999 of the cosine schedule, which divides "
              "by sqrt(ᾱ) ≈ 5e-5; bfloat16 far more):")
        for name in images:
            if name.startswith("du."):
                mode = name[name.index(", ") + 2:]
                other = next((n for n in images if n.startswith("diffusers") and
                              ("fast path" in n) == ("fast path" in mode)), None)
                diff = (images[name].float() - images[other].float()).abs().max().item()
                print(f"  {name} vs {other}: {diff:.2e}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=256, help="images per sampler in part 1")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=2, help="rounds of part 2")
    parser.add_argument("--quick", action="store_true",
                        help="a tiny run (4 images, few steps, no fast_setup): a smoke test")
    parser.add_argument("--ddim-steps", type=int, nargs="+", default=list(DDIM_STEPS),
                        help="DDIM step counts of part 1")
    parser.add_argument("--etas", type=float, nargs="+", default=[0.0, 1.0],
                        help="DDIM's η values in part 1 (0: deterministic; 1: DDPM's variance)")
    parser.add_argument("--part", choices=("1", "2", "both"), default="both",
                        help="1: quality and time against DDPM; 2: the loop against diffusers'")
    args = parser.parse_args(argv)
    args.ddpm_steps, args.compare_steps = None, COMPARE_STEPS
    if args.quick:
        args.n, args.batch_size, args.rounds = 4, 4, 1
        args.ddim_steps, args.ddpm_steps, args.compare_steps, args.etas = (2, 5), 5, 4, [0.0]
    if args.threads:
        torch.set_num_threads(args.threads)
    device = du.get_device()
    model, schedule = du.load_diffusion_model(device=device)
    classifier = du.load_classifier(device=device)
    print(f"torch {torch.__version__}, {platform.machine()} {device}, {torch.get_num_threads()} "
          f"threads, load average {os.getloadavg()[0]:.1f}; model ddpm_shapes "
          f"({du.count_parameters(model) / 1e6:.2f}M parameters), schedule "
          f"{du.CheckpointManifest.load().entry('ddpm_shapes')['schedule']}\n")
    start = time.perf_counter()
    if args.part in ("1", "both"):
        quality_rows(model, schedule, classifier, args, device)
        print()
    if args.part in ("2", "both"):
        loop_rows(model, schedule, args, device)
    print(f"\ntotal {time.perf_counter() - start:.0f} s; load average at the end "
          f"{os.getloadavg()[0]:.1f} (other work on the machine slows every row)")


if __name__ == "__main__":
    main()
