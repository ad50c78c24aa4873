"""Generate images with lesson 08's miniature Stable Diffusion, from the command line.

    python -m tools.generate "a red star"                          # 8 images -> generated.png
    python -m tools.generate "a large blue circle on a dark background" --n 16 --seed 3
    python -m tools.generate "a green square" --guidance 7 --negative "a small square"
    python -m tools.generate "a red star" --init-image data/photo.png --strength 0.6
    python -m tools.generate "a yellow triangle" --init-image data/photo.png --mask mask.png

Text-to-image by default; with --init-image, image-to-image: the image is noised --strength
of the way (near 0 keeps it, 1 starts from pure noise) and denoised towards the prompt; with
--init-image and --mask, inpainting: the mask's white pixels are repainted, its black pixels
kept (a mask file of the init image's size, or 32 x 32). Image files are converted to RGB,
centre-cropped to a square and resized to 32 x 32. The same --seed gives the same images.

The model is the shipped one in data/ (checkpoints vae, clip and sd_unet, built by
`python -m tools.train vae`, `clip` and `sd`); it runs on a GPU when there is one. Prompts
use the words of the shapes captions, listed below. The Python function behind this command
is `diffusion_utilities.generate`.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import diffusion_utilities as du


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tools.generate", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1] + "\nwords: " + ", ".join(du.caption_vocabulary()))
    parser.add_argument("prompt", help='what to draw, e.g. "a red star"')
    parser.add_argument("--n", type=int, default=8,
                        help=f"number of images, 1 to {du.GENERATE_MAX_IMAGES} (default 8)")
    parser.add_argument("--seed", type=int, default=0,
                        help="random seed, a whole number >= 0 (default 0)")
    parser.add_argument("--steps", type=int, default=25,
                        help="DDIM sampling steps, 1 to the model's T (default 25)")
    parser.add_argument("--guidance", type=float, default=4.0,
                        help="classifier-free guidance scale >= 0: 0 unconditional, 1 the "
                             "prompt without guidance, above 1 guided (default 4)")
    parser.add_argument("--negative", default="", metavar="PROMPT",
                        help='a prompt to steer away from (default "", the null prompt)')
    parser.add_argument("--init-image", type=Path, metavar="PATH",
                        help="an image file to start from (image-to-image, or inpainting "
                             "with --mask)")
    parser.add_argument("--strength", type=float, default=0.6,
                        help="image-to-image: how much to change the init image, in (0, 1] "
                             "(default 0.6; not used with --mask)")
    parser.add_argument("--mask", type=Path, metavar="PATH",
                        help="inpainting: white = repaint, black = keep (needs --init-image)")
    parser.add_argument("--out", type=Path, default=Path("generated.png"), metavar="PATH",
                        help="the PNG grid to write (default generated.png)")
    parser.add_argument("--nrow", type=int, help="images per row of the grid (default 8)")
    parser.add_argument("--data-dir", type=Path, metavar="PATH",
                        help="the folder holding the checkpoints (default data/)")
    parser.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: a GPU if any)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def parse_device(parser: argparse.ArgumentParser, text: str | None) -> torch.device | None:
    """``--device`` as a torch.device, refused with a usage error when it is not here."""
    if text is None:
        return None
    try:
        device = torch.device(text)
    except RuntimeError:
        parser.error(f"argument --device: expected cpu, cuda, cuda:N or mps, got {text!r}")
    mps = getattr(torch.backends, "mps", None)
    available = {"cpu": True, "cuda": torch.cuda.is_available(),
                 "mps": mps is not None and mps.is_available()}
    if not available.get(device.type, False):
        parser.error(f"argument --device: {text!r} is not available on this machine")
    return device


# the names generate's messages start with -> this command's options
OPTIONS = {"n": "--n", "seed": "--seed", "steps": "--steps", "guidance_scale": "--guidance",
           "negative_prompt": "--negative", "init_image": "--init-image",
           "strength": "--strength", "mask": "--mask", "out": "--out", "nrow": "--nrow"}


def usage_message(err: Exception) -> str:
    """``generate``'s message, led by the option it is about when there is one."""
    message = str(err)
    first, _, rest = message.partition(" ")
    if first.rstrip(":") not in OPTIONS:
        return message
    # "init_image: no image file at ..." -> "argument --init-image: no image file at ..."
    return f"argument {OPTIONS[first.rstrip(':')]}: {rest if first.endswith(':') else message}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    device = parse_device(parser, args.device)
    start = time.perf_counter()
    try:
        du.generate(args.prompt, n=args.n, seed=args.seed, steps=args.steps,
                    guidance_scale=args.guidance, negative_prompt=args.negative,
                    init_image=args.init_image, strength=args.strength, mask=args.mask,
                    out=args.out, nrow=args.nrow, data_dir=args.data_dir, device=device,
                    progress=not args.quiet)
    except (ValueError, FileNotFoundError) as err:   # every check runs before any sampling
        parser.error(usage_message(err))
    seconds = time.perf_counter() - start
    images = "1 image" if args.n == 1 else f"{args.n} images"
    print(f"wrote {images} of {args.prompt!r} to {args.out} in {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
