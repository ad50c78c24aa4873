"""Train the checkpoints shipped in data/, with the course library's own code.

    python -m tools.train classifier            # the attribute classifier (quality measure)
    python -m tools.train ddpm --steps 6000     # lesson 03's unconditional DDPM model

Each command writes data/<name>.pt and its record in data/manifest.json: the exact
command, steps, wall time, device, parameter count, model config and the quality reached.
Runs on whatever `du.get_device()` picks (a GPU if there is one); on a CPU keep
`--threads` at the number of cores you can spare.
"""
from __future__ import annotations

import argparse
import dataclasses
import platform
import shlex
import sys
import time

import torch
from torchvision.transforms.functional import gaussian_blur

import diffusion_utilities as du


def device_description(device: torch.device) -> str:
    """Where the run happened, in words (e.g. "cpu, 2 threads, x86_64")."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    threads = torch.get_num_threads()
    return f"{device.type}, {threads} thread{'s' if threads > 1 else ''}, {platform.machine()}"


def _channels_last(model: torch.nn.Module) -> bool:
    """Whether ``model``'s conv weights are in channels_last layout (as du.fast_setup sets)."""
    weight = next(p for p in model.parameters() if p.dim() == 4)
    return weight.is_contiguous(memory_format=torch.channels_last) and weight.stride(1) == 1


def the_command(argv: list[str]) -> str:
    """The command line that reproduces this run."""
    return "python -m tools.train " + " ".join(shlex.quote(a) for a in argv)


@dataclasses.dataclass
class Earlier:
    """What a fine-tuning run builds on: the shipped checkpoint's record (empty if none)."""
    command: str = ""
    steps: int = 0
    wall_time_s: float = 0.0
    device: str = ""

    def chain_command(self, command: str) -> str:
        return f"{self.command} && {command}" if self.command else command

    def chain_device(self, device: str, steps: int) -> str:
        """Where every stage ran: "<earlier stages>; then <steps> steps on <device>"."""
        return f"{self.device}; then {steps} steps on {device}" if self.device else device


def start_from(model: torch.nn.Module, name: str | None, data_dir=None) -> Earlier:
    """Load the checkpoint ``name`` from ``data_dir`` (default data/) into ``model``
    (nothing if None) and return its record, which the new run's record extends."""
    if not name:
        return Earlier()
    before = du.CheckpointManifest.load(data_dir).entry(name)
    model.load_state_dict(du.load_checkpoint(name, data_dir=data_dir))
    return Earlier(before["command"], before["steps"], before["wall_time_s"], before["device"])


# ── the attribute classifier ──────────────────────────────────────────────────────────


def shapes_tensors(n: int, *, seed: int, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` shapes images as float in [-1, 1] and their labels ``(n, 5)``."""
    data = du.make_shapes(n, seed=seed, split=split)
    return du.from_uint8(data.images), data.labels


@torch.no_grad()
def attribute_accuracy(classifier, images, labels, *, batch_size: int = 500) -> dict[str, float]:
    """Accuracy of each head on ``images`` against ``labels``."""
    classifier.eval()
    correct = {name: 0 for name in du.ATTRIBUTES}
    for start in range(0, len(images), batch_size):
        logits = classifier(images[start:start + batch_size])
        for i, name in enumerate(du.ATTRIBUTES):
            pred = logits[name].argmax(-1)
            correct[name] += int((pred == labels[start:start + batch_size, i]).sum())
    return {name: round(c / len(images), 4) for name, c in correct.items()}


def negatives(x: torch.Tensor) -> torch.Tensor:
    """Images with no recognisable shape, made from a batch of real ones ``x`` (B, 3, H, W):
    pure noise, real images drowned in noise, blurred to blobs, or with shuffled pixels."""
    b = len(x)
    kind = torch.arange(b) % 4
    out = torch.randn_like(x).clamp(-1, 1)                                  # 0: pure noise
    a = torch.rand(b, 1, 1, 1) * 0.05                                        # 1: ᾱ <= 0.05
    drowned = (a.sqrt() * x + (1 - a).sqrt() * torch.randn_like(x)).clamp(-1, 1)
    blob = gaussian_blur(x, kernel_size=15, sigma=4.0)                        # 2: a blob
    perm = torch.randperm(x.shape[-1] * x.shape[-2])                         # 3: shuffled
    shuffled = x.flatten(2)[:, :, perm].reshape(x.shape)
    for k, imgs in ((1, drowned), (2, blob), (3, shuffled)):
        out[kind == k] = imgs[kind == k]
    return out


def classifier_loss(model, x, y, x_neg) -> torch.Tensor:
    """Cross-entropy of every head on the real images, plus "outlier exposure" (Hendrycks
    et al. 2019) for the shape head: on the negatives, cross-entropy to the uniform
    distribution, so that it is *not* confident about images without a shape."""
    logits = model(torch.cat([x, x_neg]))
    n = len(x)
    loss = sum(torch.nn.functional.cross_entropy(logits[name][:n], y[:, i])
               for i, name in enumerate(du.ATTRIBUTES))
    if len(x_neg):
        loss = loss - logits["shape"][n:].log_softmax(-1).mean()
    return loss


def train_classifier(args, argv) -> None:
    """Train :class:`du.AttributeClassifier` on both splits (it is a measuring instrument,
    so it must also read the held-out shape-colour pairs) and test it on fresh images.
    ``--init-from classifier`` fine-tunes the shipped weights (e.g. with ``--negatives``)."""
    du.seed_everything(args.seed)
    n_held = args.num_images // 5
    x_a, y_a = shapes_tensors(args.num_images - n_held, seed=args.seed, split="train")
    x_b, y_b = shapes_tensors(n_held, seed=args.seed, split="held_out")
    images, labels = torch.cat([x_a, x_b]), torch.cat([y_a, y_b])
    model = du.AttributeClassifier(width=args.width)
    earlier = start_from(model, args.init_from, args.data_dir)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    steps = args.epochs * len(images) // args.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps)
    n_neg = int(args.negatives * args.batch_size)
    start = time.time()
    model.train()
    for step in du.tqdm(range(steps), desc="classifier"):
        idx = torch.randint(0, len(images), (args.batch_size,))
        x = images[idx]
        x_neg = negatives(images[torch.randint(0, len(images), (n_neg,))]) if n_neg else x[:0]
        # a little Gaussian noise, so slightly imperfect samples are still read correctly
        x = x + torch.rand(len(x), 1, 1, 1) * 0.1 * torch.randn_like(x)
        loss = classifier_loss(model, x, labels[idx], x_neg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    wall = time.time() - start
    model.eval()
    test_train = attribute_accuracy(model, *shapes_tensors(2000, seed=10_000, split="train"))
    test_held = attribute_accuracy(model, *shapes_tensors(1000, seed=10_001, split="held_out"))
    torch.manual_seed(10_003)
    noise_floor = du.recognised_fraction(torch.randn(1000, 3, 32, 32).clamp(-1, 1), model)
    real_images = shapes_tensors(1000, seed=10_002, split="train")[0]
    real = du.recognised_fraction(real_images, model)
    blobs = du.recognised_fraction(negatives(real_images)[2::4], model)
    print("test accuracy (train split, fresh images):", test_train)
    print("test accuracy (held-out pairs):", test_held)
    print(f"recognised fraction: real {real:.3f}, pure noise {noise_floor:.3f}, "
          f"blurred blobs {blobs:.3f}")
    entry = du.save_checkpoint(
        "classifier", model.state_dict(), data_dir=args.data_dir,
        command=earlier.chain_command(the_command(argv)),
        steps=earlier.steps + steps, wall_time_s=round(earlier.wall_time_s + wall, 1),
        device=earlier.chain_device(device_description(torch.device("cpu")), steps),
        parameters=sum(p.numel() for p in model.parameters()),
        config={"num_classes": model.num_classes, "width": args.width},
        quality={"measures": "accuracy of each attribute head on fresh held-out images "
                             "(2000 of the train split, seed 10000; 1000 of the held-out "
                             "shape-colour pairs, seed 10001); recognised fraction "
                             "(shape probability >= 0.9) of 1000 real images, of 1000 pure "
                             "noise images and of 250 real images blurred to blobs",
                 "accuracy_train_split": test_train, "accuracy_held_out_pairs": test_held,
                 "recognised_fraction_real": real, "recognised_fraction_noise": noise_floor,
                 "recognised_fraction_blobs": blobs, "threshold": 0.9},
    )
    print(f"wrote {args.data_dir or 'data'}/{entry['file']} ({entry['size_bytes'] / 1e6:.2f} MB)")


# ── the DDPM model of lesson 03 ───────────────────────────────────────────────────────


def ddpm_config() -> du.UNetConfig:
    """The UNet lesson 03 trains: about 2.8 M parameters, 32-64-128 channels at 32-16-8
    pixels, self-attention at 8x8 (cheap enough for a CPU run)."""
    return du.UNetConfig(base_channels=32, channel_mults=(1, 2, 4), num_res_blocks=2,
                         attention_resolutions=(8,))


def reproducing_command(argv: list[str], steps_done: int) -> str:
    """The command line with ``--steps`` set to the steps actually done and the time limit
    dropped: the learning rate is constant after warm-up, so that run is this one."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--steps", "--max-minutes"):
            skip = True
        elif not arg.startswith(("--steps=", "--max-minutes=")):
            out.append(arg)
    return the_command(out[:1] + ["--steps", str(steps_done)] + out[1:])


def train_ddpm(args, argv) -> None:
    """Train the unconditional UNet on the shapes images with EMA; measure the recognised
    fraction of ``--eval-samples`` samples drawn with ``--eval-steps`` DDPM steps."""
    du.seed_everything(args.seed)
    device = du.get_device()
    config = ddpm_config()
    model = du.UNet(config).to(device)
    # --init-from: fine-tune the shipped weights (its EMA) and chain the commands
    earlier = start_from(model, args.init_from, args.data_dir)
    if not args.no_fast_path:
        model, _ = du.fast_setup(model)  # channels_last on a CPU, bfloat16 on a GPU
    use_bf16 = not args.no_fast_path and du._bf16_is_fast(device)
    schedule = du.NoiseSchedule.create(args.schedule, args.T)
    ema = du.EMA(model, decay=args.ema_decay)
    loader = du.shapes_dataloader(args.num_images, batch_size=args.batch_size, seed=args.seed)
    start = time.time()
    losses = []
    for state in du.train(model, loader, schedule, steps=args.steps, lr=args.lr,
                          warmup_steps=args.warmup, lr_shape=args.lr_shape, ema=ema,
                          autocast=use_bf16, device=device):
        losses.append(state.loss)
        if state.step % args.log_every == 0 or state.step == args.steps:
            recent = sum(losses[-args.log_every:]) / len(losses[-args.log_every:])
            print(f"step {state.step}/{args.steps}  loss {recent:.4f}  lr {state.lr:.2e}  "
                  f"{time.time() - start:.0f}s", flush=True)
        if args.max_minutes and args.lr_shape == "constant" and \
                time.time() - start > 60 * args.max_minutes:
            print(f"time limit reached after {state.step} steps", flush=True)
            break
    wall, steps_done = time.time() - start, len(losses)
    shadow = ema.model
    if args.half:  # measure exactly the weights we ship
        shadow.load_state_dict({k: v.half().float() if v.is_floating_point() else v
                                for k, v in ema.state_dict().items()})
    classifier = du.load_classifier(device=device)
    start_eval = time.time()
    samples = du.sample_images(shadow, args.eval_samples, schedule, num_steps=args.eval_steps,
                               batch_size=64, generator=torch.Generator(device).manual_seed(0),
                               device=device, autocast=use_bf16)
    fraction = du.recognised_fraction(samples, classifier)
    print(f"recognised fraction of {args.eval_samples} samples: {fraction:.3f} "
          f"(sampling took {time.time() - start_eval:.0f}s)", flush=True)
    entry = du.save_checkpoint(
        "ddpm_shapes", ema.state_dict(), data_dir=args.data_dir,
        command=earlier.chain_command(reproducing_command(argv, steps_done)),
        half=args.half, steps=earlier.steps + steps_done,
        wall_time_s=round(earlier.wall_time_s + wall, 1),
        device=earlier.chain_device(
            device_description(device) + (", bfloat16 autocast" if use_bf16 else ", float32")
            + (", channels_last" if _channels_last(model) else ""), steps_done),
        parameters=du.count_parameters(model), config=dataclasses.asdict(config),
        schedule={"name": args.schedule, "T": args.T},
        training={"batch_size": args.batch_size, "lr": args.lr, "lr_shape": args.lr_shape,
                  "warmup_steps": args.warmup, "init_from": args.init_from,
                  "ema_decay": args.ema_decay, "num_images": args.num_images,
                  "final_loss": round(sum(losses[-100:]) / len(losses[-100:]), 4)},
        quality={"measures": "recognised fraction: share of samples whose shape the shipped "
                             "classifier names with probability >= 0.9",
                 "recognised_fraction": round(fraction, 4), "num_samples": args.eval_samples,
                 "num_steps": args.eval_steps,
                 "sampler": f"DDPM ancestral (posterior variance), {args.eval_steps} of the "
                            f"{args.T} timesteps (du.respace_schedule), seed 0"
                            + (", bfloat16 autocast" if use_bf16 else "")},
    )
    print(f"wrote {args.data_dir or 'data'}/{entry['file']} ({entry['size_bytes'] / 1e6:.2f} MB)")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    c = sub.add_parser("classifier", help="the attribute classifier (quality measure)")
    c.add_argument("--num-images", type=int, default=20_000)
    c.add_argument("--epochs", type=int, default=4)
    c.add_argument("--batch-size", type=int, default=128)
    c.add_argument("--lr", type=float, default=3e-3)
    c.add_argument("--width", type=int, default=16)
    c.add_argument("--negatives", type=float, default=0.0,
                   help="shapeless images per real one, trained towards uniform predictions")
    c.add_argument("--init-from", default=None,
                   help="start from this shipped checkpoint (e.g. classifier) and fine-tune")
    d = sub.add_parser("ddpm", help="lesson 03's unconditional DDPM model")
    d.add_argument("--steps", type=int, default=6000)
    d.add_argument("--batch-size", type=int, default=32)
    d.add_argument("--lr", type=float, default=1e-3)
    d.add_argument("--warmup", type=int, default=200)
    d.add_argument("--lr-shape", choices=("constant", "cosine"), default="constant",
                   help="after warm-up: constant, or a cosine decay to 0 at --steps")
    d.add_argument("--ema-decay", type=float, default=0.999)
    d.add_argument("--num-images", type=int, default=20_000)
    d.add_argument("--schedule", default="cosine")
    d.add_argument("--T", type=int, default=1000)
    d.add_argument("--eval-samples", type=int, default=256)
    d.add_argument("--eval-steps", type=int, default=100)
    d.add_argument("--half", action="store_true", help="store the weights as float16")
    d.add_argument("--no-fast-path", action="store_true",
                   help="skip bfloat16 autocast (plain float32)")
    d.add_argument("--log-every", type=int, default=100)
    d.add_argument("--max-minutes", type=float, default=None,
                   help="stop early after this long (constant learning rate only); "
                        "the manifest records the steps done")
    d.add_argument("--init-from", default=None,
                   help="start from this shipped checkpoint (e.g. ddpm_shapes) and fine-tune")
    for p in (c, d):
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--data-dir", default=None,
                       help="folder for the checkpoint and its manifest record, also where "
                            "--init-from reads (default: data/; the quality measure always "
                            "uses the shipped classifier)")
        p.add_argument("--threads", type=int, default=None,
                       help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    {"classifier": train_classifier, "ddpm": train_ddpm}[args.what](args, argv)


if __name__ == "__main__":
    main()
