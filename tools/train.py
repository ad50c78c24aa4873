"""Train the checkpoints shipped in data/, with the course library's own code.

    python -m tools.train classifier            # the attribute classifier (quality measure)
    python -m tools.train ddpm --steps 6000     # lesson 03's unconditional DDPM model
    python -m tools.train ddpm --steps 6000 --resume    # continue it after an interruption
    python -m tools.train cond --init-from ddpm_shapes  # lesson 04's conditional model
    python -m tools.train clip                  # lesson 06's CLIP
    python -m tools.train noisy                 # lesson 09's noise-aware classifier
    python -m tools.train vae                   # lesson 07's VAE
    python -m tools.train latent                # lesson 07's latent UNet (needs the VAE)
    python -m tools.train sd                    # lesson 08's text-to-image UNet

Each command writes data/<name>.pt and its record in data/manifest.json: the exact
command, steps, wall time, device, parameter count, model config and the quality reached.
Runs on whatever `du.get_device()` picks (a GPU if there is one); on a CPU keep
`--threads` at the number of cores you can spare.

Every --save-every steps, at the end of training and when you press Ctrl-C, a run saves
all it needs to continue (weights, EMA, optimiser, learning-rate schedule, random number
generators, position in the data) in <data-dir>/<name>.resume.pt. The same command with
--resume continues from there to the same result as an uninterrupted run; the file is
deleted once the checkpoint is written.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import platform
import random
import shlex
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
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


def start_from(model: torch.nn.Module, name: str | None, data_dir=None, *,
               new_parts: tuple[str, ...] = ()) -> Earlier:
    """Load the checkpoint ``name`` from ``data_dir`` (default data/) into ``model``
    (nothing if None) and return its record, which the new run's record extends.
    Parameters whose names start with one of ``new_parts`` may be missing from the
    checkpoint (they keep their fresh values: e.g. a condition embedding added to a
    trained unconditional model); any other mismatch is an error."""
    if not name:
        return Earlier()
    before = du.CheckpointManifest.load(data_dir).entry(name)
    result = model.load_state_dict(du.load_checkpoint(name, data_dir=data_dir), strict=False)
    wrong = [k for k in result.missing_keys if not k.startswith(new_parts)]
    if wrong or result.unexpected_keys:
        raise ValueError(f"checkpoint {name!r} does not fit this model: missing "
                         f"{wrong[:5]}, unexpected {result.unexpected_keys[:5]}")
    return Earlier(before["command"], before["steps"], before["wall_time_s"], before["device"])


# ── checking the arguments before any work ────────────────────────────────────────────


def whole(low: int, high: int | None = None, *, multiple_of: int = 1):
    """An argparse ``type``: a whole number in [low, high], a multiple of ``multiple_of``."""
    expected = f"a whole number >= {low}" if high is None else \
        f"a whole number from {low} to {high}"
    if multiple_of > 1:
        expected = f"a multiple of {multiple_of} >= {low}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if value < low or (high is not None and value > high) or value % multiple_of:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
        return value
    return parse


def number(*, above: float | None = None, at_least: float | None = None,
           below: float | None = None):
    """An argparse ``type``: a finite number > ``above`` (or >= ``at_least``), < ``below``."""
    bounds = [f"> {above:g}" if above is not None else f">= {at_least:g}"]
    if below is not None:
        bounds.append(f"< {below:g}")
    expected = "a number " + " and ".join(bounds)

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not (math.isfinite(value) and (above is None or value > above)
                and (at_least is None or value >= at_least) and (below is None or value < below)):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
        return value
    return parse


def folder_problem(folder: Path) -> str | None:
    """Create ``folder`` (parents too) if it is missing; why it cannot hold a checkpoint,
    or None if it can."""
    if folder.exists() and not folder.is_dir():
        return "it is a file, not a folder"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        return f"it cannot be created ({err.strerror or err})"
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        return f"it is not writable ({err.strerror or err})"
    return None


def checkpoint_problem(name: str, data_dir) -> str | None:
    """Why the checkpoint ``name`` in ``data_dir`` (default data/) cannot be loaded, or None."""
    manifest = du.CheckpointManifest.load(data_dir)
    if name not in manifest.entries:
        return (f"no checkpoint called {name!r} in {manifest.path} "
                f"(known: {sorted(manifest.entries)})")
    path = manifest.path.parent / manifest.entries[name]["file"]
    return None if path.exists() else f"the file of checkpoint {name!r}, {path}, is missing"


def check_arguments(parser: argparse.ArgumentParser, args) -> None:
    """Refuse, before any work, arguments that cannot make a run: argparse's usage error
    (exit status 2) naming the argument and what it expects. Creates ``--data-dir``."""
    if args.what in ("ddpm", "cond"):
        if args.warmup >= args.steps:
            parser.error(f"argument --warmup: expected a whole number from 0 to --steps - 1 "
                         f"= {args.steps - 1}, got {args.warmup}")
        if args.eval_steps > args.T:
            parser.error(f"argument --eval-steps: expected at most --T = {args.T} sampling "
                         f"steps, got {args.eval_steps}")
        if args.max_minutes is not None and args.lr_shape != "constant":
            parser.error("argument --max-minutes: needs --lr-shape constant (a cosine decay "
                         "is planned to end at --steps)")
    elif args.what in ("clip", "noisy", "vae", "latent", "sd"):
        if args.warmup >= args.steps:
            parser.error(f"argument --warmup: expected a whole number from 0 to --steps - 1 "
                         f"= {args.steps - 1}, got {args.warmup}")
        if args.what == "clip" and 32 % args.patch_size:
            parser.error(f"argument --patch-size: expected a divisor of the image size 32, "
                         f"got {args.patch_size}")
        if args.what == "vae" and 32 % 2 ** (len(args.channels) - 1):
            parser.error(f"argument --channels: expected at most 6 levels (each but the last "
                         f"halves the 32-pixel image), got {len(args.channels)}")
    elif args.epochs * args.num_images < args.batch_size:
        parser.error(f"argument --batch-size: expected at most --epochs x --num-images = "
                     f"{args.epochs * args.num_images} (the images of the whole run), "
                     f"got {args.batch_size}")
    if args.what in ("latent", "sd"):
        if args.eval_steps > args.T:
            parser.error(f"argument --eval-steps: expected at most --T = {args.T} sampling "
                         f"steps, got {args.eval_steps}")
        for name in ("vae", "clip") if args.what == "sd" else ("vae",):
            if problem := checkpoint_problem(name, args.vae_dir):
                parser.error(f"argument --vae-dir: the run needs the {name} checkpoint: "
                             f"{problem}; train it first with `python -m tools.train "
                             f"{name}`")
    folder = Path(du.DATA_DIR if args.data_dir is None else args.data_dir)
    problem = folder_problem(folder)
    if problem:
        parser.error(f"argument --data-dir: cannot write checkpoints in {folder}: {problem}")
    if args.init_from and (problem := checkpoint_problem(args.init_from, args.data_dir)):
        parser.error(f"argument --init-from: {problem}")
    if args.what in ("ddpm", "cond", "latent", "sd") and \
            (problem := checkpoint_problem("classifier", None)):
        parser.error(f"the quality measure needs the shipped classifier: {problem}; train it "
                     "first with `python -m tools.train classifier`")


# ── interrupting and resuming a run ───────────────────────────────────────────────────

# Arguments that may differ when a run is resumed: they do not change what it computes.
MAY_DIFFER_ON_RESUME = ("resume", "save_every", "log_every", "threads", "data_dir")


def rng_states() -> dict:
    """The state of every random number generator a run may draw from, as tensors and
    numbers only (so that ``torch.load(..., weights_only=True)`` reads it)."""
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
            "python": {"version": version, "internal": torch.tensor(internal),
                       "gauss_next": gauss_next}}


def set_rng_states(states: dict) -> None:
    """Restore the generators to what :func:`rng_states` saved."""
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    n = states["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    py = states["python"]
    random.setstate((py["version"], tuple(py["internal"].tolist()), py["gauss_next"]))


class ResumableBatches:
    """A DataLoader's batches, pass after pass without end, able to continue where an
    interrupted run stopped. The loader shuffles with its own generator, so a position in
    the data is that generator's state at the start of the current pass and the number of
    batches taken from this pass."""

    def __init__(self, loader, position: dict | None = None):
        self.loader = loader
        self.pass_start = position["pass_start"] if position else None
        self.taken = position["taken"] if position else 0

    def position(self) -> dict:
        return {"pass_start": self.pass_start, "taken": self.taken}

    def __iter__(self):
        skip = self.taken
        if self.pass_start is not None:
            self.loader.generator.set_state(self.pass_start)
        while True:
            self.pass_start, self.taken = self.loader.generator.get_state(), 0
            for batch in self.loader:
                self.taken += 1
                if self.taken > skip:  # the batches before were used before the interruption
                    yield batch
            if self.taken == 0:
                raise ValueError("the data yielded no batches")
            skip = 0


class CtrlC:
    """Inside ``with CtrlC() as ctrl_c:`` a first Ctrl-C only sets ``ctrl_c.pressed``, so
    that the training loop can finish its step and save; a second one stops at once."""

    def __init__(self):
        self.pressed = False
        self.previous = None

    def __enter__(self) -> CtrlC:
        if threading.current_thread() is threading.main_thread():  # only it gets signals
            self.previous = signal.signal(signal.SIGINT, self.press)
        return self

    def press(self, signum, frame) -> None:
        if self.pressed:
            raise KeyboardInterrupt
        self.pressed = True
        print("\nCtrl-C: stopping after this step to save the run "
              "(press Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def _shown(value) -> str:
    """An argument's value as a message shows it."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return "not given" if value is None else str(value)


class Resumable:
    """The file ``<data-dir>/<name>.resume.pt`` from which ``--resume`` continues a run.

    It holds what the run needs to go on exactly as if it had not stopped, as tensors,
    numbers, strings, lists and dicts (read back with ``weights_only=True``): the command
    line and arguments, the step, and what each training loop adds to :meth:`save`.
    """

    def __init__(self, name: str, args, argv: list[str]):
        self.path = Path(du.DATA_DIR if args.data_dir is None else args.data_dir) / \
            f"{name}.resume.pt"
        self.every = args.save_every
        self.argv = argv  # the command line of the run's first part, for its record
        self.command = the_command(argv if "--resume" in argv else [*argv, "--resume"])
        self.arguments = {k: v for k, v in sorted(vars(args).items())
                          if k not in MAY_DIFFER_ON_RESUME}
        self.saved_step: int | None = None

    def load(self, parser: argparse.ArgumentParser) -> dict:
        """The saved state; argparse's usage error if there is none or its arguments differ."""
        if not self.path.exists():
            parser.error(f"argument --resume: no interrupted run to continue: {self.path} "
                         "does not exist (start the run without --resume)")
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001  (any failure: the file is unusable)
            parser.error(f"argument --resume: {self.path} cannot be read ({err}); "
                         "start the run afresh without --resume")
        before = state["arguments"]
        differ = [f"--{k.replace('_', '-')} {_shown(self.arguments.get(k))} (the interrupted "
                  f"run: {_shown(before.get(k))})"
                  for k in sorted(set(before) | set(self.arguments))
                  if before.get(k) != self.arguments.get(k)]
        if differ:
            parser.error("argument --resume: the interrupted run had other arguments: "
                         + "; ".join(differ) + ". Resume it with its own arguments, or start "
                         "a new run without --resume")
        self.argv, self.saved_step = state["argv"], state["step"]
        print(f"resuming after step {state['step']} from {self.path}", flush=True)
        return state

    def due(self, step: int) -> bool:
        """Whether ``--save-every`` asks for a save after ``step``."""
        return step % self.every == 0

    def save(self, *, step: int, **state) -> None:
        """Write the state after ``step`` (and the random generators' states) atomically:
        to a temporary file in the same folder, then renamed over the old one."""
        state = {"argv": self.argv, "arguments": self.arguments, "step": step,
                 "rng": rng_states(), **state}
        du.write_atomically(self.path, lambda temporary: torch.save(state, temporary))
        self.saved_step = step

    def stop(self) -> None:
        """After Ctrl-C: say how to continue, and exit with status 130 (as Ctrl-C does)."""
        print(self.how_to_continue(), file=sys.stderr, flush=True)
        raise SystemExit(130)

    def how_to_continue(self) -> str:
        if self.saved_step is None:
            return (f"stopped before the first save (at step {self.every}, --save-every): "
                    "there is nothing to resume")
        return (f"stopped: the run as it was after step {self.saved_step} is saved in "
                f"{self.path}\ncontinue it with: {self.command}")

    def finish(self) -> None:
        """The run is complete (its checkpoint written): delete the file."""
        self.path.unlink(missing_ok=True)


# ── the attribute classifier ──────────────────────────────────────────────────────────


def shapes_tensors(n: int, *, seed: int, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` shapes images as float in [-1, 1] and their labels ``(n, 5)``."""
    data = du.make_shapes(n, seed=seed, split=split)
    return du.from_uint8(data.images), data.labels


@torch.no_grad()
def attribute_accuracy(classifier, images, labels, *, batch_size: int = 500) -> dict[str, float]:
    """Accuracy of each head on ``images`` against ``labels`` (du.attribute_agreement's
    per-attribute shares, rounded)."""
    agreement = du.attribute_agreement(images, labels, classifier, batch_size=batch_size)
    return {name: round(agreement[name], 4) for name in du.ATTRIBUTES}


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


def train_classifier(args, run: Resumable, resumed: dict | None) -> None:
    """Train :class:`du.AttributeClassifier` on both splits (it is a measuring instrument,
    so it must also read the held-out shape-colour pairs) and test it on fresh images.
    ``--init-from classifier`` fine-tunes the shipped weights (e.g. with ``--negatives``);
    ``resumed``: the state an interrupted run saved (see :class:`Resumable`)."""
    du.seed_everything(args.seed)
    n_held = args.num_images // 5
    x_a, y_a = shapes_tensors(args.num_images - n_held, seed=args.seed, split="train")
    x_b, y_b = shapes_tensors(n_held, seed=args.seed, split="held_out")
    images, labels = torch.cat([x_a, x_b]), torch.cat([y_a, y_b])
    model = du.AttributeClassifier(width=args.width)
    earlier = Earlier(**resumed["earlier"]) if resumed else \
        start_from(model, args.init_from, args.data_dir)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    steps = args.epochs * len(images) // args.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps)
    n_neg = int(args.negatives * args.batch_size)
    done = 0
    if resumed:
        model.load_state_dict(resumed["model"])
        opt.load_state_dict(resumed["optimizer"])
        sched.load_state_dict(resumed["scheduler"])
        set_rng_states(resumed["rng"])  # the batches are drawn with torch's generator
        done = resumed["step"]
    start = time.time() - (resumed["wall_time_s"] if resumed else 0.0)
    model.train()
    with CtrlC() as ctrl_c:
        for step in du.tqdm(range(done + 1, steps + 1), desc="classifier", initial=done,
                            total=steps):
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
            if run.due(step) or step == steps or ctrl_c.pressed:
                run.save(step=step, wall_time_s=time.time() - start,
                         earlier=dataclasses.asdict(earlier), model=model.state_dict(),
                         optimizer=opt.state_dict(), scheduler=sched.state_dict())
            if ctrl_c.pressed:
                run.stop()
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
        command=earlier.chain_command(the_command(run.argv)),
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
    run.finish()
    print(f"wrote {args.data_dir or 'data'}/{entry['file']} ({entry['size_bytes'] / 1e6:.2f} MB)")


# ── lesson 06's CLIP ──────────────────────────────────────────────────────────────────


def clip_config(args) -> du.ClipConfig:
    return du.ClipConfig(patch_size=args.patch_size, vision_width=args.width,
                         text_width=args.width, embed_dim=args.width,
                         vision_layers=args.layers, text_layers=args.layers)


def faster_in_bfloat16(step, *, tries: int = 2) -> bool:
    """Time ``step(bf16)`` (one training step, run for real) in float32 and in bfloat16
    autocast on this machine; True if bfloat16 is faster. CPUs differ: on some bfloat16
    is 2x faster, on others slower."""
    seconds = {}
    for bf16 in (False, True):
        step(bf16)  # warm-up
        start = time.perf_counter()
        for _ in range(tries):
            step(bf16)
        seconds[bf16] = time.perf_counter() - start
    print(f"one step: float32 {seconds[False] / tries:.2f} s, bfloat16 "
          f"{seconds[True] / tries:.2f} s", flush=True)
    return seconds[True] < seconds[False]


def restore_or_measure(resumed: dict | None, model, opt, sched, step, args) -> tuple[int, bool]:
    """Where a run starts: ``(steps done, bfloat16 or not)``. After an interruption, the saved
    weights, optimiser, learning-rate schedule and generators, and the precision chosen then;
    otherwise the precision measured with real ``step(bf16)`` calls, whose effect on the
    weights and optimiser is then undone, and the generators seeded afresh."""
    if resumed:
        model.load_state_dict(resumed["model"])
        opt.load_state_dict(resumed["optimizer"])
        sched.load_state_dict(resumed["scheduler"])
        set_rng_states(resumed["rng"])
        done, bf16 = resumed["step"], bool(resumed["bf16"])
    else:
        snapshot = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()))
        bf16 = faster_in_bfloat16(step) and not args.float32
        model.load_state_dict(snapshot[0])   # the timing steps leave no trace in the model
        opt.load_state_dict(snapshot[1])
        du.seed_everything(args.seed)
        done = 0
    print(f"training in {'bfloat16 autocast' if bf16 else 'float32'}", flush=True)
    return done, bf16


def run_steps(run: Resumable, args, *, desc: str, step, sched, model, opt, done: int,
              bf16: bool, start: float, earlier: Earlier, report=None, evaluate=None,
              extra_state=None) -> list[float]:
    """The loop of ``clip``, ``noisy`` and ``vae``: ``step(bf16)`` then the learning-rate step,
    from step ``done + 1`` to ``--steps``; every ``--log-every`` steps a line ``step s: loss
    ...`` (``report(recent losses)`` writes what follows "step s: "), every ``--eval-every``
    steps before the last ``evaluate()``; the state ``--resume`` needs (``extra_state()`` adds
    to it) saved when due, at the end and on Ctrl-C. Returns the losses of this run."""
    losses = []
    model.train()
    with CtrlC() as ctrl_c:
        for s in du.tqdm(range(done + 1, args.steps + 1), desc=desc, initial=done,
                         total=args.steps):
            losses.append(step(bf16))
            sched.step()
            if s % args.log_every == 0:
                print(f"step {s}: {report(losses[-args.log_every:])}", flush=True)
            if evaluate is not None and s % args.eval_every == 0 and s < args.steps:
                print(f"step {s}:", evaluate(), flush=True)
            if run.due(s) or s == args.steps or ctrl_c.pressed:
                run.save(step=s, wall_time_s=time.time() - start, bf16=bf16,
                         earlier=dataclasses.asdict(earlier), model=model.state_dict(),
                         optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                         **(extra_state() if extra_state else {}))
            if ctrl_c.pressed:
                run.stop()
    return losses


@torch.no_grad()
def clip_quality(model) -> dict:
    """Zero-shot accuracy of shape and colour on fresh images of the seen and of the held-out
    pairs, and text -> image retrieval recalls in galleries of 100."""
    model.eval()
    seen = du.make_shapes(1000, seed=10_000, split="train")
    held = du.make_shapes(1000, seed=10_001, split="held_out")
    zero_seen = du.zero_shot_accuracy(model, du.from_uint8(seen.images), seen.labels)
    zero_held = du.zero_shot_accuracy(model, du.from_uint8(held.images), held.labels)
    recalls = []
    for i in range(0, 1000, 100):
        img = du.embed_images(model, du.from_uint8(seen.images[i:i + 100]))
        txt = du.embed_captions(model, seen.captions[i:i + 100])
        labels = seen.labels[i:i + 100]
        same = (labels[:, None, :] == labels[None, :, :]).all(-1)
        strict = du.retrieval_recall(txt @ img.T)
        loose = du.retrieval_recall(txt @ img.T, same=same)
        recalls.append({**strict, **{f"{k} (same attributes)": v for k, v in loose.items()}})
    retrieval = {k: round(float(np.mean([r[k] for r in recalls])), 4) for k in recalls[0]}
    model.train()
    return {"zero_shot_seen": {k: round(v, 4) for k, v in zero_seen.items()},
            "zero_shot_held_out": {k: round(v, 4) for k, v in zero_held.items()},
            "retrieval": retrieval}


def train_clip(args, run: Resumable, resumed: dict | None) -> None:
    """Train :class:`du.CLIP` on images of the seen pairs only (the held-out pairs stay
    unseen, image and caption, for the zero-shot test), with a fresh wording of each caption
    every time an image is drawn."""
    du.seed_everything(args.seed)
    data = du.make_shapes(args.num_images, seed=args.seed, split="train")
    images = du.from_uint8(data.images)
    tokenizer = du.CaptionTokenizer()
    model = du.CLIP(clip_config(args))
    earlier = Earlier(**resumed["earlier"]) if resumed else \
        start_from(model, args.init_from, args.data_dir)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": rest, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    sched = du.make_lr_scheduler(opt, warmup_steps=args.warmup, total_steps=args.steps,
                                 shape="cosine")
    caption_rng = np.random.default_rng([args.seed, 6])

    def batch():
        idx = torch.randint(0, len(images), (args.batch_size,))
        captions = [du.caption_for(data.attributes[i], caption_rng) for i in idx.tolist()]
        return images[idx], tokenizer.encode(captions)[0]

    def step(bf16: bool) -> float:
        x, ids = batch()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = du.contrastive_loss(model.encode_image(x), model.encode_text(ids),
                                       model.logit_scale.clamp(max=math.log(100)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    if resumed:
        caption_rng.bit_generator.state = resumed["caption_rng"]
    done, bf16 = restore_or_measure(resumed, model, opt, sched, step, args)
    start = time.time() - (resumed["wall_time_s"] if resumed else 0.0)
    losses = run_steps(
        run, args, desc="clip", step=step, sched=sched, model=model, opt=opt, done=done,
        bf16=bf16, start=start, earlier=earlier, evaluate=lambda: clip_quality(model),
        report=lambda recent: f"loss {np.mean(recent):.4f}, "
                              f"temperature {1 / float(model.scale().detach()):.4f}",
        extra_state=lambda: {"caption_rng": caption_rng.bit_generator.state})
    wall = time.time() - start
    quality = clip_quality(model)
    print("quality:", quality, flush=True)
    config = dataclasses.asdict(model.config)
    entry = du.save_checkpoint(
        "clip", model.state_dict(), data_dir=args.data_dir, half=args.half,
        command=earlier.chain_command(the_command(run.argv)),
        steps=earlier.steps + args.steps, wall_time_s=round(earlier.wall_time_s + wall, 1),
        device=earlier.chain_device(device_description(torch.device("cpu")) +
                                    (", bfloat16 autocast" if bf16 else ", float32"), args.steps),
        parameters=du.count_parameters(model), config=config,
        training={"batch_size": args.batch_size, "lr": args.lr, "warmup_steps": args.warmup,
                  "num_images": args.num_images, "final_loss": round(float(np.mean(losses[-50:])), 4),
                  "temperature": round(1 / float(model.scale().detach()), 4), "recipe": args.recipe},
        quality={"measures": "zero-shot accuracy (prompt ensembles of 32 canonical captions "
                             "per class) on 1000 fresh images of the seen pairs (seed 10000) "
                             "and 1000 of the held-out pairs (seed 10001), never trained on; "
                             "text -> image recall@k in galleries of 100 (10 galleries), "
                             "strictly the captioned image, or any image with its attributes",
                 **quality},
    )
    run.finish()
    print(f"wrote {args.data_dir or 'data'}/{entry['file']} ({entry['size_bytes'] / 1e6:.2f} MB)")


# ── lesson 09's noise-aware classifier ───────────────────────────────────────────────


def noisy_schedule() -> du.NoiseSchedule:
    """The schedule of the shipped diffusion models, which the classifier must match."""
    record = du.CheckpointManifest.load().entry("ddpm_shapes")["schedule"]
    return du.NoiseSchedule.from_betas(du.make_beta_schedule(record["name"], record["T"]))


@torch.no_grad()
def noisy_quality(model, schedule) -> dict:
    """Accuracy of the shape and colour heads on fresh noised images (1000 of the seen pairs,
    seed 10000, and 1000 of the held-out pairs, seed 10001), by range of t."""
    model.eval()
    out = {}
    for split, seed in (("train", 10_000), ("held_out", 10_001)):
        x0, labels = shapes_tensors(1000, seed=seed, split=split)
        g = torch.Generator().manual_seed(seed)
        for low in range(0, schedule.T, schedule.T // 4):
            t = torch.randint(low, low + schedule.T // 4, (len(x0),), generator=g)
            xt = du.q_sample(x0, t, torch.randn(x0.shape, generator=g), schedule)
            logits = model(xt, t)
            for i, name in ((0, "shape"), (1, "colour")):
                key = f"{split} {name}, t in [{low}, {low + schedule.T // 4})"
                out[key] = round(float((logits[name].argmax(-1) == labels[:, i]).float().mean()), 4)
    model.train()
    return out


def train_noisy(args, run: Resumable, resumed: dict | None) -> None:
    """Train :class:`du.NoisyClassifier` on x_t = q_sample(x_0, t, ε) with t uniform in
    [0, T), on both splits (as the attribute classifier: guidance may ask for any pair)."""
    du.seed_everything(args.seed)
    schedule = noisy_schedule()
    n_held = args.num_images // 5
    x_a, y_a = shapes_tensors(args.num_images - n_held, seed=args.seed, split="train")
    x_b, y_b = shapes_tensors(n_held, seed=args.seed, split="held_out")
    images, labels = torch.cat([x_a, x_b]), torch.cat([y_a, y_b])
    model = du.NoisyClassifier(width=args.width)
    earlier = Earlier(**resumed["earlier"]) if resumed else \
        start_from(model, args.init_from, args.data_dir)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = du.make_lr_scheduler(opt, warmup_steps=args.warmup, total_steps=args.steps,
                                 shape="cosine")

    def step(bf16: bool) -> float:
        idx = torch.randint(0, len(images), (args.batch_size,))
        t = torch.randint(0, schedule.T, (args.batch_size,))
        xt = du.q_sample(images[idx], t, torch.randn_like(images[idx]), schedule)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(xt, t)
        loss = sum(torch.nn.functional.cross_entropy(logits[name].float(), labels[idx, i])
                   for i, name in enumerate(du.ATTRIBUTES))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    done, bf16 = restore_or_measure(resumed, model, opt, sched, step, args)
    start = time.time() - (resumed["wall_time_s"] if resumed else 0.0)
    losses = run_steps(
        run, args, desc="noisy classifier", step=step, sched=sched, model=model, opt=opt,
        done=done, bf16=bf16, start=start, earlier=earlier,
        report=lambda recent: f"loss {np.mean(recent):.4f}")
    wall = time.time() - start
    quality = noisy_quality(model, schedule)
    print("quality:", quality, flush=True)
    entry = du.save_checkpoint(
        "noisy_classifier", model.state_dict(), data_dir=args.data_dir, half=args.half,
        command=earlier.chain_command(the_command(run.argv)),
        steps=earlier.steps + args.steps, wall_time_s=round(earlier.wall_time_s + wall, 1),
        device=earlier.chain_device(device_description(torch.device("cpu")) +
                                    (", bfloat16 autocast" if bf16 else ", float32"), args.steps),
        parameters=du.count_parameters(model),
        config={"num_classes": model.num_classes, "width": args.width},
        schedule=du.CheckpointManifest.load().entry("ddpm_shapes")["schedule"],
        training={"batch_size": args.batch_size, "lr": args.lr, "warmup_steps": args.warmup,
                  "num_images": args.num_images,
                  "final_loss": round(float(np.mean(losses[-100:])), 4)},
        quality={"measures": "accuracy of the shape and colour heads on fresh images noised "
                             "to t drawn uniformly in each quarter of [0, T)", **quality},
    )
    run.finish()
    print(f"wrote {args.data_dir or 'data'}/{entry['file']} ({entry['size_bytes'] / 1e6:.2f} MB)")


# ── lesson 07's VAE ──────────────────────────────────────────────────────────────────


def vae_config(args) -> du.VAEConfig:
    return du.VAEConfig(latent_channels=args.latent_channels,
                        block_channels=tuple(args.channels), layers_per_block=args.layers)


@torch.no_grad()
def vae_quality(model) -> dict:
    """Reconstruction PSNR (from the posterior's mean) on 1000 fresh images of the seen pairs
    (seed 10000) and 1000 of the held-out pairs (seed 10001), never trained on."""
    model.eval()
    out = {}
    for split, seed in (("train", 10_000), ("held_out", 10_001)):
        x, _ = shapes_tensors(1000, seed=seed, split=split)
        values = torch.cat([du.psnr(model(x[i:i + 250], sample=False)[0].clamp(-1, 1),
                                    x[i:i + 250]) for i in range(0, 1000, 250)])
        key = "seen_pairs" if split == "train" else "held_out_pairs"
        out[f"psnr_{key}"] = round(float(values.mean()), 2)
        out[f"psnr_{key}_worst_5pct"] = round(float(values.quantile(0.05)), 2)
    model.train()
    return out


def train_vae(args, run: Resumable, resumed: dict | None) -> None:
    """Train :class:`du.VAE` on images of the seen pairs with :func:`du.vae_loss`; then
    measure its PSNR and compute the latent scale factor from 2000 training images."""
    du.seed_everything(args.seed)
    images, _ = shapes_tensors(args.num_images, seed=args.seed, split="train")
    model = du.VAE(vae_config(args))
    earlier = Earlier(**resumed["earlier"]) if resumed else \
        start_from(model, args.init_from, args.data_dir)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    sched = du.make_lr_scheduler(opt, warmup_steps=args.warmup, total_steps=args.steps,
                                 shape="cosine")

    def step(bf16: bool) -> float:
        x = images[torch.randint(0, len(images), (args.batch_size,))]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            reconstruction, posterior = model(x)
        loss = du.vae_loss(reconstruction.float(), x, posterior.mean.float(),
                           posterior.logvar.float(), kl_weight=args.kl_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    done, bf16 = restore_or_measure(resumed, model, opt, sched, step, args)
    start = time.time() - (resumed["wall_time_s"] if resumed else 0.0)
    losses = run_steps(
        run, args, desc="vae", step=step, sched=sched, model=model, opt=opt, done=done,
        bf16=bf16, start=start, earlier=earlier, evaluate=lambda: vae_quality(model),
        report=lambda recent: f"loss {np.mean(recent):.3f}")
    wall = time.time() - start
    if args.half:  # measure exactly the weights we ship
        model.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
    quality = vae_quality(model)
    model.eval()
    with torch.no_grad():
        z = torch.cat([model.encode(images[i:i + 500]).sample(torch.Generator().manual_seed(i))
                       for i in range(0, min(2000, len(images)), 500)])
    scale = du.latent_scale(z)
    print("quality:", quality, f"latent scale {scale:.4f}", flush=True)
    entry = du.save_checkpoint(
        "vae", model.state_dict(), data_dir=args.data_dir, half=args.half,
        command=earlier.chain_command(the_command(run.argv)),
        steps=earlier.steps + args.steps, wall_time_s=round(earlier.wall_time_s + wall, 1),
        device=earlier.chain_device(device_description(torch.device("cpu")) +
                                    (", bfloat16 autocast" if bf16 else ", float32"), args.steps),
        parameters=du.count_parameters(model), config=dataclasses.asdict(model.config),
        latent_scale=round(scale, 6),
        training={"batch_size": args.batch_size, "lr": args.lr, "warmup_steps": args.warmup,
                  "num_images": args.num_images, "kl_weight": args.kl_weight,
                  "final_loss": round(float(np.mean(losses[-100:])), 4), "recipe": args.recipe},
        quality={"measures": "reconstruction PSNR in dB (posterior mean, pixels in [-1, 1]) "
                             "on 1000 fresh images of the seen pairs (seed 10000) and 1000 of "
                             "the held-out pairs (seed 10001); the latent scale is 1 / std of "
                             "posterior draws of 2000 training images", **quality},
    )
    run.finish()
    print(f"wrote {args.data_dir or 'data'}/{entry['file']} ({entry['size_bytes'] / 1e6:.2f} MB)")


# ── lesson 07's latent UNet and lesson 08's text-to-image UNet ───────────────────────


def latent_data(args, vae: du.VAE) -> tuple[torch.Tensor, torch.Tensor, list]:
    """The posterior's mean and standard deviation for ``--num-images`` images of the seen
    pairs (so the held-out pairs stay unseen by the text-to-image model), and their
    attributes. A fresh latent is drawn from each posterior every time an image is used."""
    data = du.make_shapes(args.num_images, seed=args.seed, split="train")
    images = du.from_uint8(data.images)
    means, stds = [], []
    with torch.no_grad():
        for i in range(0, len(images), 500):
            posterior = vae.encode(images[i:i + 500])
            means.append(posterior.mean)
            stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds), data.attributes


@torch.no_grad()
def latent_quality(args, unet, vae, scale, schedule) -> dict:
    """Unconditional: the recognised fraction and the distances to 1000 real images of 1000
    samples. Text-to-image: how often the classifier reads back the asked shape and colour,
    for 256 canonical captions of seen pairs and 256 of held-out pairs, at --eval-guidance."""
    classifier = du.load_classifier()
    generator = torch.Generator().manual_seed(0)
    if args.what == "latent":
        model = du.LatentDiffusion(unet, vae, scale, schedule)
        images = model.images(args.eval_samples, num_steps=args.eval_steps, generator=generator,
                              progress=False, batch_size=250)
        reference = du.reference_images(args.eval_samples)
        return {"recognised_fraction": round(du.recognised_fraction(images, classifier), 4),
                **{k: round(v, 4) for k, v in
                   du.distribution_distances(images, reference, classifier).items()},
                "num_samples": args.eval_samples,
                "sampler": f"DDIM (eta 0), {args.eval_steps} steps, seed 0",
                "measures": "recognised fraction (shape probability >= 0.9) and the Frechet "
                            "and kernel distances of the classifier's features to as many "
                            "real images (du.reference_images)"}
    pipe = du.MiniStableDiffusion(du.TextEncoder(du.load_clip(data_dir=args.vae_dir)), unet,
                                vae, scale, schedule)
    out = {}
    for split, seed in (("seen_pairs", 20_000), ("held_out_pairs", 20_001)):
        labels = du.combination_labels(args.eval_samples, seed=seed,
                                       split="train" if split == "seen_pairs" else "held_out")
        prompts = [du.canonical_caption(du.ShapeAttributes.from_labels(row)) for row in labels]
        images = torch.cat([pipe(prompts[i:i + 128], num_steps=args.eval_steps,
                                 guidance_scale=args.eval_guidance, generator=generator,
                                 progress=False) for i in range(0, len(prompts), 128)])
        out[split] = {k: round(v, 4) for k, v in
                      du.attribute_agreement(images, labels, classifier).items()}
    return {**out, "num_samples": args.eval_samples, "guidance_scale": args.eval_guidance,
            "sampler": f"DDIM (eta 0), {args.eval_steps} steps, classifier-free guidance, seed 0",
            "measures": "share of samples in which the shipped classifier reads the asked "
                        "attributes (argmax), for canonical captions of label rows drawn as "
                        "the data set draws them (du.combination_labels), seen pairs seed "
                        "20000, held-out pairs seed 20001"}


def train_latent(args, run: Resumable, resumed: dict | None) -> None:
    """Train a UNet on the shipped VAE's scaled latents with du.train and EMA: unconditional
    (``latent``), or conditioned on captions through the shipped CLIP's frozen text encoder
    with caption dropout for classifier-free guidance (``sd``)."""
    du.seed_everything(args.seed)
    vae = du.load_vae(data_dir=args.vae_dir)
    scale = du.vae_scale(data_dir=args.vae_dir)
    text = du.TextEncoder(du.load_clip(data_dir=args.vae_dir)) if args.what == "sd" else None
    config = du.sd_unet_config(vae.config, text.width if text else None)
    model = du.UNet(config)
    earlier = Earlier(**resumed["earlier"]) if resumed else \
        start_from(model, args.init_from, args.data_dir)
    schedule = du.NoiseSchedule.create(args.schedule, args.T)
    mean, std, attributes = latent_data(args, vae)
    ema = du.EMA(model, decay=args.ema_decay)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    scheduler = du.make_lr_scheduler(optimizer, warmup_steps=args.warmup,
                                     total_steps=args.steps, shape="cosine")
    caption_rng = np.random.default_rng([args.seed, 8])

    def batches():
        while True:
            idx = torch.randint(0, len(mean), (args.batch_size,))
            yield (mean[idx] + std[idx] * torch.randn_like(std[idx])) * scale, idx

    def captions(batch) -> dict:
        chosen = [du.training_caption(attributes[i], caption_rng) for i in batch[1].tolist()]
        with torch.no_grad():
            encoding = text(du.drop_captions(chosen, args.cond_drop))
        return {"context": encoding.tokens, "context_mask": encoding.mask}

    if resumed:
        model.load_state_dict(resumed["model"])
        ema.model.load_state_dict(resumed["ema"])
        ema.num_updates = resumed["ema_updates"]
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        set_rng_states(resumed["rng"])
        caption_rng.bit_generator.state = resumed["caption_rng"]
        bf16, done, losses = bool(resumed["bf16"]), resumed["step"], resumed["losses"].tolist()
    else:
        bf16 = du._bf16_is_fast(torch.device("cpu"), model) and not args.float32
        done, losses = 0, []
    print(f"training in {'bfloat16 autocast' if bf16 else 'float32'}", flush=True)
    start = time.time() - (resumed["wall_time_s"] if resumed else 0.0)
    training = du.train(model, batches(), schedule, steps=args.steps, ema=ema,
                        optimizer=optimizer, scheduler=scheduler, start_step=done,
                        autocast=bf16, cond_fn=captions if text else None,
                        min_snr_gamma=args.min_snr_gamma)
    with CtrlC() as ctrl_c:
        for state in training:
            losses.append(state.loss)
            if state.step % args.log_every == 0:
                print(f"step {state.step}: loss {np.mean(losses[-args.log_every:]):.4f}  "
                      f"{time.time() - start:.0f}s", flush=True)
            if run.due(state.step) or state.step == args.steps or ctrl_c.pressed:
                run.save(step=state.step, wall_time_s=time.time() - start, bf16=bf16,
                         earlier=dataclasses.asdict(earlier), model=model.state_dict(),
                         ema=ema.state_dict(), ema_updates=ema.num_updates,
                         optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                         losses=torch.tensor(losses, dtype=torch.float64),
                         caption_rng=caption_rng.bit_generator.state)
            if ctrl_c.pressed:
                run.stop()
    wall = time.time() - start
    shadow = ema.model.eval()
    if args.half:  # measure exactly the weights we ship
        shadow.load_state_dict({k: v.half().float() if v.is_floating_point() else v
                                for k, v in ema.state_dict().items()})
    start_eval = time.time()
    quality = latent_quality(args, shadow, vae, scale, schedule)
    print("quality:", quality, f"(the evaluation took {time.time() - start_eval:.0f}s)",
          flush=True)
    vae_record = du.CheckpointManifest.load(args.vae_dir).entry("vae")
    entry = du.save_checkpoint(
        NAMES[args.what], ema.state_dict(), data_dir=args.data_dir, half=args.half,
        command=earlier.chain_command(the_command(run.argv)),
        steps=earlier.steps + args.steps, wall_time_s=round(earlier.wall_time_s + wall, 1),
        device=earlier.chain_device(device_description(torch.device("cpu")) +
                                    (", bfloat16 autocast" if bf16 else ", float32"), args.steps),
        parameters=du.count_parameters(model), config=dataclasses.asdict(config),
        schedule={"name": args.schedule, "T": args.T},
        trained_on={"vae_sha256": vae_record["sha256"], "latent_scale": scale,
                    **({"clip_sha256": du.CheckpointManifest.load(args.vae_dir).entry("clip")[
                        "sha256"]} if text else {})},
        training={"batch_size": args.batch_size, "lr": args.lr, "warmup_steps": args.warmup,
                  "ema_decay": args.ema_decay, "num_images": args.num_images,
                  "min_snr_gamma": args.min_snr_gamma,
                  "final_loss": round(float(np.mean(losses[-100:])), 4), "recipe": args.recipe,
                  **({"cond_drop": args.cond_drop} if text else {})},
        quality=quality,
    )
    run.finish()
    print(f"wrote {args.data_dir or 'data'}/{entry['file']} ({entry['size_bytes'] / 1e6:.2f} MB)")


# ── the DDPM model of lesson 03 ───────────────────────────────────────────────────────


def ddpm_config() -> du.UNetConfig:
    """The UNet lesson 03 trains: about 2.8 M parameters, 32-64-128 channels at 32-16-8
    pixels, self-attention at 8x8 (cheap enough for a CPU run)."""
    return du.UNetConfig(base_channels=32, channel_mults=(1, 2, 4), num_res_blocks=2,
                         attention_resolutions=(8,))


def cond_config() -> du.UNetConfig:
    """Lesson 04's conditional UNet: lesson 03's, plus an embedding of the multi-hot
    attribute vector (du.AttributeEmbedding) joined with the time embedding."""
    return dataclasses.replace(ddpm_config(), attribute_dim=du.ATTRIBUTE_DIM)


def conditions(args):
    """``cond_fn`` for du.train: the context vectors of a batch's labels, each dropped to
    "nothing asked" with probability ``--cond-drop`` (None for the unconditional model)."""
    if args.what != "cond":
        return None
    return lambda batch: {"attributes": du.drop_condition(du.attribute_vector(batch[1]),
                                                          args.cond_drop)}


@torch.no_grad()
def evaluate(args, model, schedule, device, use_bf16: bool) -> dict:
    """The quality the manifest records: the recognised fraction of unconditional samples,
    or, for the conditional model, how often the classifier reads back the asked shape and
    colour, on seen and on held-out shape-colour pairs."""
    classifier = du.load_classifier(device=device)
    common = dict(num_steps=args.eval_steps, batch_size=64, device=device, autocast=use_bf16)
    sampler = (f"DDPM ancestral (posterior variance), {args.eval_steps} of the {args.T} "
               f"timesteps (du.respace_schedule), seed 0" + (", bfloat16 autocast" if use_bf16 else ""))
    if args.what == "ddpm":
        samples = du.sample_images(model, args.eval_samples, schedule,
                                   generator=torch.Generator(device).manual_seed(0), **common)
        fraction = du.recognised_fraction(samples, classifier)
        print(f"recognised fraction of {args.eval_samples} samples: {fraction:.3f}", flush=True)
        return {"measures": "recognised fraction: share of samples whose shape the shipped "
                            "classifier names with probability >= 0.9",
                "recognised_fraction": round(fraction, 4), "num_samples": args.eval_samples,
                "num_steps": args.eval_steps, "sampler": sampler}
    quality = {"measures": "share of conditional samples (no guidance) in which the shipped "
                           "classifier reads the asked attributes (argmax); labels drawn as the "
                           "data set draws them, seen pairs from the train split (seed 20000), "
                           "held-out pairs from the held-out split (seed 20001)",
               "num_samples": args.eval_samples, "num_steps": args.eval_steps, "sampler": sampler}
    for split, seed in (("train", 20_000), ("held_out", 20_001)):
        labels = du.combination_labels(args.eval_samples, split=split, seed=seed)
        samples = du.sample_images(model, len(labels), schedule,
                                   generator=torch.Generator(device).manual_seed(0),
                                   attributes=du.attribute_vector(labels).to(device), **common)
        agreement = du.attribute_agreement(samples, labels, classifier)
        print(f"{split} pairs: {agreement}", flush=True)
        key = "seen_pairs" if split == "train" else "held_out_pairs"
        quality[key] = {k: round(v, 4) for k, v in agreement.items()}
    return quality


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


def train_ddpm(args, run: Resumable, resumed: dict | None) -> None:
    """Train the unconditional UNet on the shapes images with EMA; measure the recognised
    fraction of ``--eval-samples`` samples drawn with ``--eval-steps`` DDPM steps.
    ``resumed``: the state an interrupted run saved (see :class:`Resumable`)."""
    du.seed_everything(args.seed)
    device = du.get_device()
    config = ddpm_config() if args.what == "ddpm" else cond_config()
    model = du.UNet(config).to(device)
    # --init-from: fine-tune the shipped weights (its EMA) and chain the commands; the
    # conditional model may start from the unconditional one (its attribute embedding fresh)
    earlier = Earlier(**resumed["earlier"]) if resumed else \
        start_from(model, args.init_from, args.data_dir, new_parts=("attribute_emb.",))
    fast_mode = "float32"
    if not args.no_fast_path:
        # the fastest of float32 / channels_last / bfloat16, measured here (or --fast-mode);
        # a resumed run keeps the mode it started with, so it continues to the same result
        mode = resumed.get("fast_mode", args.fast_mode) if resumed else args.fast_mode
        model, _ = du.fast_setup(model, mode=mode)
        fast_mode = model.fast_choice.mode
        print(f"fast path: {model.fast_choice.describe()}", flush=True)
    use_bf16 = fast_mode.startswith("bfloat16")
    schedule = du.NoiseSchedule.create(args.schedule, args.T)
    ema = du.EMA(model, decay=args.ema_decay)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)  # as du.train makes them
    scheduler = du.make_lr_scheduler(optimizer, warmup_steps=args.warmup,
                                     total_steps=args.steps, shape=args.lr_shape)
    loader = du.shapes_dataloader(args.num_images, batch_size=args.batch_size, seed=args.seed)
    batches = ResumableBatches(loader, resumed["data"] if resumed else None)
    losses, done, finished = [], 0, False
    if resumed:
        model.load_state_dict(resumed["model"])
        ema.model.load_state_dict(resumed["ema"])
        ema.num_updates = resumed["ema_updates"]
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        set_rng_states(resumed["rng"])
        losses, done, finished = resumed["losses"].tolist(), resumed["step"], resumed["finished"]
    start = time.time() - (resumed["wall_time_s"] if resumed else 0.0)

    def save(step: int, *, finished: bool) -> None:
        run.save(step=step, finished=finished, wall_time_s=time.time() - start,
                 losses=torch.tensor(losses, dtype=torch.float64),
                 earlier=dataclasses.asdict(earlier), model=model.state_dict(),
                 ema=ema.state_dict(), ema_updates=ema.num_updates,
                 optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                 data=batches.position(), fast_mode=fast_mode)

    training = [] if finished else du.train(  # finished: only the evaluation is left
        model, batches, schedule, steps=args.steps, ema=ema, optimizer=optimizer,
        scheduler=scheduler, start_step=done, autocast=use_bf16, device=device,
        cond_fn=conditions(args), min_snr_gamma=args.min_snr_gamma)
    with CtrlC() as ctrl_c:
        for state in training:
            losses.append(state.loss)
            if state.step % args.log_every == 0 or state.step == args.steps:
                recent = sum(losses[-args.log_every:]) / len(losses[-args.log_every:])
                print(f"step {state.step}/{args.steps}  loss {recent:.4f}  lr {state.lr:.2e}  "
                      f"{time.time() - start:.0f}s", flush=True)
            time_up = bool(args.max_minutes) and time.time() - start > 60 * args.max_minutes
            if time_up:
                print(f"time limit reached after {state.step} steps", flush=True)
            # saved at the end of training too, so a Ctrl-C during the evaluation loses nothing
            last = time_up or state.step == args.steps
            if run.due(state.step) or last or ctrl_c.pressed:
                save(state.step, finished=last)
            if ctrl_c.pressed:
                run.stop()
            if time_up:
                break
    wall = resumed["wall_time_s"] if finished else time.time() - start
    steps_done = len(losses)
    shadow = ema.model
    if args.half:  # measure exactly the weights we ship
        shadow.load_state_dict({k: v.half().float() if v.is_floating_point() else v
                                for k, v in ema.state_dict().items()})
    start_eval = time.time()
    quality = evaluate(args, shadow, schedule, device, use_bf16)
    print(f"(the evaluation took {time.time() - start_eval:.0f}s)", flush=True)
    entry = du.save_checkpoint(
        NAMES[args.what], ema.state_dict(), data_dir=args.data_dir,
        command=earlier.chain_command(reproducing_command(run.argv, steps_done)),
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
                  "final_loss": round(sum(losses[-100:]) / len(losses[-100:]), 4),
                  "min_snr_gamma": args.min_snr_gamma, "recipe": args.recipe,
                  **({"cond_drop": args.cond_drop} if args.what == "cond" else {})},
        quality=quality,
    )
    run.finish()
    print(f"wrote {args.data_dir or 'data'}/{entry['file']} ({entry['size_bytes'] / 1e6:.2f} MB)")


NAMES = {"classifier": "classifier", "ddpm": "ddpm_shapes", "cond": "cond_shapes",
         "clip": "clip", "noisy": "noisy_classifier", "vae": "vae",
         "latent": "latent_unet", "sd": "sd_unet"}  # the checkpoint each trains
MAX_IMAGES = 10**7  # du.make_shapes's limit


def run_options(q: argparse.ArgumentParser, *, steps: int, batch_size: int, min_batch: int,
                lr: float, num_images: int, min_images: int, log_every: int) -> None:
    """The options of a run of ``clip`` and ``noisy``: AdamW with warm-up then a cosine decay,
    the precision measured on this machine, float16 storage, fine-tuning a shipped model."""
    q.add_argument("--steps", type=whole(1), default=steps)
    q.add_argument("--batch-size", type=whole(min_batch), default=batch_size)
    q.add_argument("--lr", type=number(above=0), default=lr, help="peak learning rate")
    q.add_argument("--warmup", type=whole(0), default=100,
                   help="steps of linear warm-up, then a cosine decay to 0 at --steps")
    q.add_argument("--num-images", type=whole(min_images, MAX_IMAGES), default=num_images)
    q.add_argument("--float32", action="store_true",
                   help="train in float32 even where bfloat16 autocast measures faster")
    q.add_argument("--half", action="store_true", help="store the weights as float16")
    q.add_argument("--log-every", type=whole(1), default=log_every)
    q.add_argument("--init-from", default=None,
                   help="start from this shipped checkpoint (e.g. the one it trains) and fine-tune")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m tools.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    c = sub.add_parser("classifier", help="the attribute classifier (quality measure)")
    c.add_argument("--num-images", type=whole(5, MAX_IMAGES), default=20_000)
    c.add_argument("--epochs", type=whole(1), default=4)
    c.add_argument("--batch-size", type=whole(1), default=128)
    c.add_argument("--lr", type=number(above=0), default=3e-3, help="peak learning rate")
    c.add_argument("--width", type=whole(8, multiple_of=8), default=16,
                   help="channels of the first layer (GroupNorm uses 8 groups)")
    c.add_argument("--negatives", type=number(at_least=0), default=0.0,
                   help="shapeless images per real one, trained towards uniform predictions")
    c.add_argument("--init-from", default=None,
                   help="start from this shipped checkpoint (e.g. classifier) and fine-tune")
    d = sub.add_parser("ddpm", help="lesson 03's unconditional DDPM model")
    k = sub.add_parser("cond", help="lesson 04's conditional model (multi-hot attributes, "
                                    "condition dropout)")
    k.add_argument("--cond-drop", type=number(at_least=0, below=1), default=0.1,
                   help="probability of dropping a condition to 'nothing asked' in training")
    for q in (d, k):
        q.add_argument("--steps", type=whole(1), default=6000)
        q.add_argument("--batch-size", type=whole(1), default=32)
        q.add_argument("--lr", type=number(above=0), default=1e-3)
        q.add_argument("--warmup", type=whole(0), default=200,
                       help="steps of linear learning-rate warm-up (fewer than --steps)")
        q.add_argument("--lr-shape", choices=("constant", "cosine"), default="constant",
                       help="after warm-up: constant, or a cosine decay to 0 at --steps")
        q.add_argument("--ema-decay", type=number(at_least=0, below=1), default=0.999)
        q.add_argument("--num-images", type=whole(1, MAX_IMAGES), default=20_000)
        q.add_argument("--schedule", choices=du.SCHEDULE_NAMES, default="cosine")
        q.add_argument("--T", type=whole(1), default=1000)
        q.add_argument("--eval-samples", type=whole(1), default=256)
        q.add_argument("--eval-steps", type=whole(1), default=100, help="at most --T")
        q.add_argument("--half", action="store_true", help="store the weights as float16")
        q.add_argument("--fast-mode", choices=du.FAST_MODES, default=None,
                       help="run in this mode instead of the fastest one measured here "
                            "(see du.fast_setup)")
        q.add_argument("--no-fast-path", action="store_true",
                       help="plain float32 (NCHW), without measuring the faster modes")
        q.add_argument("--log-every", type=whole(1), default=100)
        q.add_argument("--max-minutes", type=number(above=0), default=None,
                       help="stop early after this long of training, before an interruption "
                            "included (constant learning rate only); the manifest records the "
                            "steps done")
        q.add_argument("--init-from", default=None,
                       help="start from this shipped checkpoint (e.g. ddpm_shapes) and fine-tune")
        q.add_argument("--min-snr-gamma", type=number(above=0), default=None,
                       help="weight the loss by min(SNR, gamma) / SNR (Hang et al. 2023)")
        q.add_argument("--recipe", default=None,
                       help="a note for the manifest: why this recipe (not used by training)")
    g = sub.add_parser("clip", help="lesson 06's CLIP (image and text encoders)")
    g.add_argument("--patch-size", type=whole(1), default=4)
    g.add_argument("--width", type=whole(8, multiple_of=4), default=128,
                   help="width of both encoders and of the shared space (4 heads)")
    g.add_argument("--layers", type=whole(1), default=4, help="blocks in each encoder")
    g.add_argument("--eval-every", type=whole(1), default=1000)
    n = sub.add_parser("noisy", help="lesson 09's noise-aware classifier (classifier guidance)")
    n.add_argument("--width", type=whole(8, multiple_of=8), default=32,
                   help="channels of the first layer (GroupNorm uses 8 groups)")
    v = sub.add_parser("vae", help="lesson 07's VAE (the latent space of latent diffusion)")
    v.add_argument("--latent-channels", type=whole(1), default=4)
    v.add_argument("--channels", type=whole(8, multiple_of=8), nargs="+", default=[32, 64, 64],
                   help="channels of each level; every level but the last halves the size")
    v.add_argument("--layers", type=whole(1), default=1, help="ResBlocks per encoder level")
    v.add_argument("--kl-weight", type=number(at_least=0), default=1e-3,
                   help="weight of the KL term against the summed squared error")
    v.add_argument("--eval-every", type=whole(1), default=1000)
    v.add_argument("--recipe", default=None,
                   help="a note for the manifest: why this recipe (not used by training)")
    run_options(v, steps=4000, batch_size=64, min_batch=1, lr=1e-3, num_images=20_000,
                min_images=1, log_every=100)
    la = sub.add_parser("latent", help="lesson 07's unconditional UNet on the VAE's latents")
    sd = sub.add_parser("sd", help="lesson 08's text-to-image UNet on the VAE's latents "
                                   "(the miniature Stable Diffusion)")
    sd.add_argument("--cond-drop", type=number(at_least=0, below=1), default=0.1,
                    help="probability of training on the empty caption (classifier-free "
                         "guidance)")
    sd.add_argument("--eval-guidance", type=number(at_least=0), default=4.0,
                    help="guidance scale of the quality measure")
    for q in (la, sd):
        run_options(q, steps=8000, batch_size=64, min_batch=1, lr=1e-3, num_images=20_000,
                    min_images=1, log_every=100)
        q.add_argument("--ema-decay", type=number(at_least=0, below=1), default=0.999)
        q.add_argument("--schedule", choices=du.SCHEDULE_NAMES, default="cosine")
        q.add_argument("--T", type=whole(1), default=1000)
        q.add_argument("--eval-samples", type=whole(1), default=256)
        q.add_argument("--eval-steps", type=whole(1), default=25, help="DDIM steps, at most --T")
        q.add_argument("--min-snr-gamma", type=number(above=0), default=None,
                       help="weight the loss by min(SNR, gamma) / SNR (Hang et al. 2023)")
        q.add_argument("--vae-dir", default=None,
                       help="folder whose VAE (and CLIP, for sd) the run uses (default: data/)")
        q.add_argument("--recipe", default=None,
                       help="a note for the manifest: why this recipe (not used by training)")
    run_options(g, steps=3000, batch_size=256, min_batch=2, lr=5e-4, num_images=40_000,
                min_images=2, log_every=50)
    run_options(n, steps=4000, batch_size=128, min_batch=1, lr=2e-3, num_images=20_000,
                min_images=5, log_every=100)
    g.add_argument("--recipe", default=None,
                   help="a note for the manifest: why this recipe (not used by training)")
    for p in (c, d, k, g, n, v, la, sd):
        p.add_argument("--seed", type=whole(0, 2**32 - 1), default=0)
        p.add_argument("--data-dir", default=None,
                       help="folder for the checkpoint and its manifest record, also where "
                            "--init-from reads (default: data/; the quality measure always "
                            "uses the shipped classifier); created if missing")
        p.add_argument("--threads", type=whole(1), default=None,
                       help="torch CPU threads (default: torch's choice)")
        p.add_argument("--save-every", type=whole(1), default=500,
                       help="save the state needed by --resume every this many steps "
                            "(also at the end of training and on Ctrl-C)")
        p.add_argument("--resume", action="store_true",
                       help="continue the interrupted run of this same command from "
                            "<data-dir>/<name>.resume.pt")
    args = parser.parse_args(argv)
    command = {"classifier": c, "ddpm": d, "cond": k, "clip": g, "noisy": n, "vae": v,
               "latent": la, "sd": sd}[args.what]
    check_arguments(command, args)
    run = Resumable(NAMES[args.what], args, argv)
    resumed = run.load(command) if args.resume else None
    if not args.resume and run.path.exists():
        print(f"note: {run.path} holds an interrupted run, which this new run replaces at its "
              "first save; to continue that one instead, stop now and add --resume",
              file=sys.stderr, flush=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    train = {"classifier": train_classifier, "ddpm": train_ddpm, "cond": train_ddpm,
             "clip": train_clip, "noisy": train_noisy, "vae": train_vae,
             "latent": train_latent, "sd": train_latent}[args.what]
    try:
        train(args, run, resumed)
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside the training loop
        run.stop()


if __name__ == "__main__":
    main()
