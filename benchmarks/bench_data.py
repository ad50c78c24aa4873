"""How fast the shapes data set is generated, on one CPU thread.

Run: ``python benchmarks/bench_data.py``. The course design asks for 10,000 images at
32 x 32 in under 10 s on one core, so a lesson can make a fresh training set in seconds.
"""
import os

# One thread everywhere, set before NumPy and PyTorch load their thread pools.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import time  # noqa: E402

import torch  # noqa: E402

import diffusion_utilities as du  # noqa: E402

TARGET_S = 10.0


def time_make_shapes(n: int, *, image_size: int, repeats: int = 3) -> float:
    """Best wall time in seconds of ``du.make_shapes(n, image_size=image_size)`` over ``repeats`` runs."""
    best = float("inf")
    for seed in range(repeats):
        start = time.perf_counter()
        du.make_shapes(n, seed=seed, image_size=image_size)
        best = min(best, time.perf_counter() - start)
    return best


def time_one_epoch(n: int, *, batch_size: int = 64) -> float:
    """Seconds to iterate once over a prepared ``shapes_dataloader`` (float conversion, batching)."""
    loader = du.shapes_dataloader(n, batch_size=batch_size)
    start = time.perf_counter()
    for _ in loader:
        pass
    return time.perf_counter() - start


def main() -> None:
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread")
    n = 10_000
    seconds = time_make_shapes(n, image_size=32)
    verdict = "OK" if seconds < TARGET_S else "TOO SLOW"
    print(f"make_shapes({n}, image_size=32): {seconds:.2f} s, {n / seconds:,.0f} images/s"
          f"   (target < {TARGET_S:.0f} s: {verdict})")
    for image_size, count in ((64, 2_000), (128, 500)):
        seconds = time_make_shapes(count, image_size=image_size, repeats=1)
        print(f"make_shapes({count}, image_size={image_size}): {seconds:.2f} s, {count / seconds:,.0f} images/s")
    seconds = time_one_epoch(n)
    print(f"one epoch of shapes_dataloader({n}, batch_size=64): {seconds:.2f} s, {n / seconds:,.0f} images/s")


if __name__ == "__main__":
    main()
