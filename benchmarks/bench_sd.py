"""The miniature Stable Diffusion of lesson 08 (``du.MiniStableDiffusion.load()``), measured:
how fast it draws, how often it draws what the prompt asks, and what the guidance scale trades.

    python benchmarks/bench_sd.py                          # 256 prompts per set, all threads
    python benchmarks/bench_sd.py --threads 1 --repeats 10 --scales 0 1 4 12
    python benchmarks/bench_sd.py --data-dir /path/to/checkpoints   # another vae + clip + sd_unet
    python benchmarks/bench_sd.py --quick                  # seconds: a smoke test

The pipeline (CLIP text encoder, latent UNet ``sd_unet``, VAE) loads from ``--data-dir``; the
attribute classifier that judges the images always loads from data/. Prompts are canonical
captions (``du.canonical_caption``) of label rows drawn as the data set draws them
(``du.combination_labels``): the seen shape-colour pairs with seed 20000 (split "train") and
the held-out pairs with seed 20001 (split "held_out"), the seeds of the checkpoint's own
quality measure. Sampling: deterministic DDIM (η = 0), ``--steps`` steps, classifier-free
guidance, the starting noises drawn from one seed, so every scale starts from the same noises.

1. Generation time: 8 images of 32x32 (prompt to pixels: text encoder, UNet, decoder) with
   25 DDIM steps (whatever ``--steps`` says) at ``--guidance``, float32, best and median of
   ``--repeats`` runs after a warm-up, with the torch threads given (default: all cores).
   Target: a median of at most 2 s.
2. Prompt accuracy: the share of ``--n`` images in which the classifier reads each asked
   attribute (``du.attribute_agreement``), and shape and colour both, at ``--guidance``.
   Targets, shape and colour both: at least 95 % for the seen pairs, 80 % for the held-out.
3. The guidance scale against fidelity and diversity (``--scales``): for each scale, the
   prompt accuracy (seen pairs); the Fréchet and kernel distances of the classifier's
   features (``du.distribution_distances``) to real images with the same labels
   (``du.make_shapes`` with the prompts' seed and split); and the diversity, the mean pairwise
   distance between the classifier features (``du.classifier_features``) of images drawn for
   the same prompt (8 prompts x 8 images), averaged over the prompts. A row of real images
   gives the yardsticks: the distances of other real images with the same labels (the floor
   at this number of images) and the diversity of real images with the same five attributes.

No assertions but the target lines: this prints numbers.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import diffusion_utilities as du  # noqa: E402

SETS = {"seen": ("train", 20_000), "held-out": ("held_out", 20_001)}   # name: (split, seed)
ACCURACY_TARGETS = {"seen": 0.95, "held-out": 0.80}                    # shape and colour both
TIMING_IMAGES, TIMING_STEPS, TIMING_TARGET_S = 8, 25, 2.0
SCALES = (0, 1, 2, 4, 7.5, 12)
DIVERSITY_PROMPTS, IMAGES_PER_PROMPT = 8, 8
REAL_SEED = 20_002          # real images for the yardsticks: a seed the prompts do not use


def verdict(met: bool) -> str:
    return "MET" if met else "NOT MET"


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def captions(labels: torch.Tensor) -> list[str]:
    """The canonical caption of each label row ``(N, 5)``."""
    return [du.canonical_caption(du.ShapeAttributes.from_labels(row)) for row in labels]


def generate(sd, prompts: list[str], scale: float, args) -> tuple[torch.Tensor, float]:
    """One image per prompt at guidance ``scale``, in batches of ``--batch-size``, and the
    seconds it took; one generator, so the starting noises depend only on the seed and the
    prompt's place in the list."""
    generator = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    images = torch.cat([sd(prompts[i:i + args.batch_size], num_steps=args.steps,
                           guidance_scale=scale, generator=generator, progress=False).cpu()
                        for i in range(0, len(prompts), args.batch_size)])
    return images, time.perf_counter() - start


def real_groups(rows: torch.Tensor, k: int) -> torch.Tensor:
    """``k`` real images with each label row of ``rows`` ``(P, 5)`` (all five attributes the
    same), grouped by row: ``(P * k, 3, 32, 32)``, found among ``make_shapes(m, seed=REAL_SEED)``
    for the smallest power-of-two m that holds enough of them."""
    m = 4096
    while True:
        labels = du.combination_labels(m, seed=REAL_SEED)
        found = [(labels == row).all(1).nonzero().flatten()[:k] for row in rows]
        if all(len(f) == k for f in found):
            break
        m *= 2
    chosen = torch.cat(found)
    return du.from_uint8(du.make_shapes(int(chosen.max()) + 1, seed=REAL_SEED).images[chosen])


def diversity(images: torch.Tensor, groups: int, classifier) -> float:
    """Mean pairwise distance of the classifier features within each of ``groups`` equal,
    consecutive groups of ``images``, averaged over the groups."""
    features = du.classifier_features(images, classifier)                 # (groups * k, F)
    features = features.view(groups, -1, features.shape[1])                # (groups, k, F)
    return float(torch.stack([torch.pdist(f).mean() for f in features]).mean())


def timing(sd, args, device) -> None:
    prompts = captions(du.combination_labels(TIMING_IMAGES, seed=SETS["seen"][1]))

    def run() -> float:
        synchronize(device)
        start = time.perf_counter()
        sd(prompts, num_steps=TIMING_STEPS, guidance_scale=args.guidance,
           generator=torch.Generator().manual_seed(args.seed), progress=False)
        synchronize(device)
        return time.perf_counter() - start

    run()   # warm-up
    seconds = [run() for _ in range(args.repeats)]
    best, median = min(seconds), statistics.median(seconds)
    print(f"== 1. generation time: {TIMING_IMAGES} images of 32x32, {TIMING_STEPS} DDIM "
          f"steps, guidance {args.guidance:g}"
          f"{' (UNet batch doubled)' if args.guidance != 1 else ''}, {torch.get_num_threads()} "
          f"thread(s), float32, {args.repeats} run(s) after a warm-up")
    print(f"   best {best:.2f} s, median {median:.2f} s ({TIMING_IMAGES / median:.1f} images/s)")
    print(f"target: {TIMING_IMAGES} images in ≤ {TIMING_TARGET_S:g} s (median): "
          f"{verdict(median <= TIMING_TARGET_S)}")
    print()


def accuracy(labels, images, classifier, args) -> None:
    print(f"== 2. prompt accuracy: {args.n} canonical captions per set, DDIM {args.steps} "
          f"steps, guidance {args.guidance:g}, seed {args.seed}; the share of images in which "
          f"the classifier reads the asked attribute")
    columns = (*du.ATTRIBUTES, "shape and colour")
    print(f"{'pairs':<10}" + "".join(f"{c:>12}" for c in columns[:-1]) + f"{columns[-1]:>18}"
          "   target (shape and colour)")
    for name in SETS:
        agreement = du.attribute_agreement(images[name], labels[name], classifier)
        target = ACCURACY_TARGETS[name]
        print(f"{name:<10}" + "".join(f"{agreement[c]:12.1%}" for c in columns[:-1])
              + f"{agreement[columns[-1]]:18.1%}   ≥ {target:.0%}: "
              f"{verdict(agreement[columns[-1]] >= target)}")
    print()


def sweep(sd, labels, cache, classifier, args) -> None:
    """Part 3; ``cache``: {scale: (images, seconds)} of the seen prompts, filled as needed."""
    split, seed = SETS["seen"]
    prompts = captions(labels)
    reference = du.from_uint8(du.make_shapes(args.n, seed=seed, split=split).images)
    groups = labels[:args.diversity_prompts]
    same_prompt = [p for p in captions(groups) for _ in range(args.per_prompt)]
    print(f"== 3. guidance scale: fidelity against diversity. {args.n} images of the seen pairs "
          f"per scale, DDIM {args.steps} steps, seed {args.seed}; distances to the {args.n} real "
          f"images with the same labels; diversity: mean pairwise feature distance among "
          f"{args.per_prompt} images of the same prompt ({args.diversity_prompts} prompts)")
    print(f"{'scale':>12}{'shape and colour':>18}{'Fréchet':>10}{'kernel':>10}{'diversity':>11}"
          f"{'seconds':>9}")
    other = real_groups(labels, 1)              # other real images with the very same labels
    floor = du.distribution_distances(other, reference, classifier)
    real_accuracy = du.attribute_agreement(reference, labels, classifier)["shape and colour"]
    real_diversity = diversity(real_groups(groups, args.per_prompt), len(groups), classifier)
    print(f"{'real images':>12}{real_accuracy:18.1%}{floor['frechet']:10.2f}"
          f"{floor['kernel']:10.4f}{real_diversity:11.2f}{'-':>9}", flush=True)
    for scale in args.scales:
        if scale not in cache:
            cache[scale] = generate(sd, prompts, scale, args)
        images, seconds = cache[scale]
        spread = diversity(generate(sd, same_prompt, scale, args)[0], len(groups), classifier)
        dist = du.distribution_distances(images, reference, classifier)
        agreement = du.attribute_agreement(images, labels, classifier)["shape and colour"]
        print(f"{scale:>12g}{agreement:18.1%}{dist['frechet']:10.2f}{dist['kernel']:10.4f}"
              f"{spread:11.2f}{seconds:9.1f}", flush=True)
    print(f"(seconds: for the {args.n} images. Real images: the accuracy and diversity of real "
          "images with the prompts' labels; the distances to them of other real images with "
          "the same labels, the floor at this number of images)")
    print()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=256, help="prompts per set (seen, held-out)")
    parser.add_argument("--steps", type=int, default=TIMING_STEPS,
                        help="DDIM steps of parts 2 and 3 (part 1 always takes 25)")
    parser.add_argument("--guidance", type=float, default=4.0,
                        help="the guidance scale of parts 1 and 2")
    parser.add_argument("--scales", type=float, nargs="*", default=list(SCALES),
                        help="guidance scales of part 3")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of part 1")
    parser.add_argument("--batch-size", type=int, default=64, help="prompts per sampling batch")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None,
                        help="where the vae, clip and sd_unet checkpoints are (default data/); "
                             "the classifier always loads from data/")
    parser.add_argument("--quick", action="store_true",
                        help="a tiny run (8 prompts per set, 3 steps, two scales, 2 x 2 images "
                             "for the diversity, one timed run): a smoke test")
    args = parser.parse_args(argv)
    args.diversity_prompts, args.per_prompt = DIVERSITY_PROMPTS, IMAGES_PER_PROMPT
    if args.quick:
        args.n, args.steps, args.repeats, args.scales = 8, 3, 1, [0.0, 4.0]
        args.diversity_prompts, args.per_prompt = 2, 2
    if args.n < max(2, args.diversity_prompts):
        parser.error(f"argument --n: expected at least {max(2, args.diversity_prompts)} prompts "
                     f"(the distances need two, the diversity {args.diversity_prompts}), "
                     f"got {args.n}")
    if args.repeats < 1:
        parser.error(f"argument --repeats: expected at least 1, got {args.repeats}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = du.get_device()
    sd = du.MiniStableDiffusion.load(data_dir=args.data_dir, device=device)
    classifier = du.load_classifier(device=device)
    manifest = du.CheckpointManifest.load(args.data_dir)
    record = manifest.entry("sd_unet")
    for piece in ("vae", "clip"):
        if record["trained_on"].get(f"{piece}_sha256") != manifest.entry(piece)["sha256"]:
            print(f"warning: sd_unet was trained with another {piece} than this one")
    print(f"torch {torch.__version__}, {platform.machine()} {device}, {torch.get_num_threads()} "
          f"threads, load average {os.getloadavg()[0]:.1f}; sd_unet ({record['parameters']:,} "
          f"parameters, {record['steps']:,} steps), vae and clip from {manifest.path.parent}\n")

    start = time.perf_counter()
    timing(sd, args, device)
    labels = {name: du.combination_labels(args.n, seed=seed, split=split)
              for name, (split, seed) in SETS.items()}
    seen_cache = {args.guidance: generate(sd, captions(labels["seen"]), args.guidance, args)}
    images = {"seen": seen_cache[args.guidance][0],
              "held-out": generate(sd, captions(labels["held-out"]), args.guidance, args)[0]}
    accuracy(labels, images, classifier, args)
    if args.scales:
        sweep(sd, labels["seen"], seen_cache, classifier, args)
    print(f"total {time.perf_counter() - start:.0f} s; load average at the end "
          f"{os.getloadavg()[0]:.1f} (other work on the machine slows every timing)")


if __name__ == "__main__":
    main()
