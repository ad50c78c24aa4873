"""How fast does the course's UNet train and sample on this machine's CPU?

    python benchmarks/bench_unet.py            # batch 64 of 32x32x3, three rounds
    python benchmarks/bench_unet.py --rounds 5 --steps 3 --variants --threads 1

Rows: our UNet with the fast path that ``du.fast_setup`` measures and picks for this machine
(measured afresh, without its cache; the line above the table says what it chose, its timings
and how long measuring took), our UNet in plain float32, and diffusers' ``UNet2DModel`` with
the same channels and attention and (within 10%) the same parameter count, in its default
float32 and in the mode fast_setup chose for ours.
Training = forward + MSE loss + backward + AdamW step; sampling = one no_grad forward pass
of the batch (a sampler makes one per step). The rows are measured in turns, round after
round, and each keeps its best round, so a busy machine slows all rows alike.
diffusers is optional (requirements-dev.txt); without it only our rows are measured.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import os
import platform
import time

import torch
import torch.nn.functional as F

import diffusion_utilities as du

# Lesson 03's unconditional model (as in tools/train.py): ~2.8 M parameters, 32 -> 64 -> 128
# channels at 32x32 -> 16x16 -> 8x8, self-attention at 8x8 and in the middle.
LESSON_03_CONFIG = du.UNetConfig(base_channels=32, channel_mults=(1, 2, 4), num_res_blocks=2,
                                 attention_resolutions=(8,), heads=4, groups=8)


def diffusers_twin(config: du.UNetConfig):
    """diffusers' UNet2DModel with our channels, attention levels and parameter count, or None."""
    try:
        from diffusers import UNet2DModel
    except ImportError:
        return None
    chans = tuple(config.base_channels * m for m in config.channel_mults)
    sizes = [config.image_size // 2**i for i in range(len(chans))]
    attn = [s in config.attention_resolutions for s in sizes]
    head_dim = next((c for c, a in zip(chans, attn) if a), chans[-1]) // config.heads
    return UNet2DModel(
        sample_size=config.image_size, in_channels=config.in_channels,
        out_channels=config.out_channels, block_out_channels=chans,
        layers_per_block=1,   # diffusers' up path has one more block per level than its down path
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        norm_num_groups=config.groups, attention_head_dim=head_dim)


def make_runner(model, autocast, *, batch: int, image_size: int, diffusers: bool):
    """Return ``(train_step, sample_step)`` closures on fixed random data."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, image_size, image_size, generator=g)
    eps = torch.randn(batch, 3, image_size, image_size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def predict():
        out = model(x, t)
        return out.sample if diffusers else out

    def train_step():
        with autocast():
            loss = F.mse_loss(predict().float(), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def sample_step():
        with torch.no_grad(), autocast():
            predict()

    return train_step, sample_step


def cpu_has_native_bf16() -> bool:
    """Whether this CPU does bfloat16 arithmetic in hardware (x86 AVX512-BF16 or AMX)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def channels_last(model):
    return copy.deepcopy(model).to(memory_format=torch.channels_last)


def timed(fn, repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", action="store_true",
                        help="also measure float32 + channels_last and bf16 with / without it")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--steps", type=int, default=2,
                        help="train steps (and sampling passes) per round")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    config = LESSON_03_CONFIG
    torch.manual_seed(0)
    ours = du.UNet(config)
    fast_ours, fast = du.fast_setup(copy.deepcopy(ours), cache=False)   # measured afresh
    choice = fast_ours.fast_choice
    chosen = du._FAST_WORDS[choice.mode]
    rows = {f"our UNet, fast path ({chosen})": (fast_ours, fast, False),
            "our UNet, float32": (ours, contextlib.nullcontext, False)}
    if args.variants:        # the other combinations fast_setup chose between
        bf16 = functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16)
        rows["our UNet, float32 + channels_last"] = (channels_last(ours), contextlib.nullcontext,
                                                     False)
        rows["our UNet, bf16 autocast (NCHW)"] = (copy.deepcopy(ours), bf16, False)
        rows["our UNet, bf16 autocast + channels_last"] = (channels_last(ours), bf16, False)
    twin = diffusers_twin(config)
    if twin is None:
        print("diffusers is not installed: pip install -r requirements-dev.txt to compare with "
              "its UNet2DModel. Measuring our rows only.\n")
    else:
        rows["diffusers UNet2DModel, float32 (default)"] = (twin, contextlib.nullcontext, True)
        fast_twin, twin_fast = du.fast_setup(copy.deepcopy(twin), mode=choice.mode)
        rows[f"diffusers UNet2DModel, fast path ({chosen})"] = (fast_twin, twin_fast, True)

    print(f"torch {torch.__version__}, {platform.machine()} CPU, capability "
          f"{torch.backends.cpu.get_cpu_capability()}, native bf16: {cpu_has_native_bf16()}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    print(f"batch {args.batch} of {config.in_channels}x{config.image_size}x{config.image_size}, "
          f"config {config}")
    passes = ", ".join(f"{mode} {1000 * s:.0f} ms" for mode, s in choice.seconds.items())
    print(f"fast_setup chose {choice.describe()}\n  its best forward + backward pass at batch "
          f"{choice.batch}: {passes}\n")
    runners = {name: make_runner(m, ac, batch=args.batch, image_size=config.image_size,
                                 diffusers=d) for name, (m, ac, d) in rows.items()}
    best = {name: [float("inf"), float("inf")] for name in rows}
    for name, (train_step, sample_step) in runners.items():      # warm-up: allocations, kernels
        train_step(), sample_step()
    for _ in range(args.rounds):
        for name, (train_step, sample_step) in runners.items():
            best[name][0] = min(best[name][0], timed(train_step, args.steps))
            best[name][1] = min(best[name][1], timed(sample_step, args.steps))

    baseline = next((b[0] for n, b in best.items() if "default" in n), None)
    print(f"{'model':66s} {'params':>9s} {'train steps/s':>14s} {'sample img/s':>13s} "
          f"{'train x diffusers':>18s}")
    for name, (m, _, _) in rows.items():
        step_s, sample_s = best[name]
        ratio = f"{baseline / step_s:17.2f}x" if baseline else f"{'-':>18s}"
        print(f"{name:66s} {du.count_parameters(m) / 1e6:8.2f}M {1 / step_s:14.2f} "
              f"{args.batch / sample_s:13.1f} {ratio}")
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f} (other work on the machine slows "
          "every row)")


if __name__ == "__main__":
    main()
