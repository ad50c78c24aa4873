"""The benchmark scripts of lessons 06 to 09 run end to end in their quick mode and print
every row (their numbers are for reading, not for asserting here)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

import diffusion_utilities as du

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run_quick(script: str, timeout: int = 120) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), "--quick", "--threads", "1"],
                          capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=BENCHMARKS.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_bench_clip_quick_prints_targets_recalls_and_throughput():
    if "clip" not in du.CheckpointManifest.load().entries:
        pytest.skip("the clip checkpoint is not shipped")
    text = run_quick("bench_clip.py")
    for row in ("zero-shot accuracy", "seen", "held-out", "target", "recall@1", "recall@5",
                "images:", "captions:"):
        assert row in text, f"{row!r} missing from the output:\n{text}"
    assert "MET" in text


def test_bench_guidance_quick_prints_both_tables():
    entries = du.CheckpointManifest.load().entries
    missing = {"ddpm_shapes", "noisy_classifier", "clip", "classifier"} - set(entries)
    if missing:
        pytest.skip(f"not shipped: {sorted(missing)}")
    text = run_quick("bench_guidance.py")
    for row in ("1. classifier guidance", "2. CLIP guidance", "real images", "target acc",
                "Fréchet", "kernel"):
        assert row in text, f"{row!r} missing from the output:\n{text}"


def test_bench_latent_quick_prints_the_table_and_the_speed_ups():
    entries = du.CheckpointManifest.load().entries
    missing = {"ddpm_shapes", "classifier", "vae", "latent_unet"} - set(entries)
    if missing:
        pytest.skip(f"not shipped yet: {sorted(missing)}")
    text = run_quick("bench_latent.py")
    for row in ("pixel (ddpm_shapes)", "latent (latent_unet + vae)", "real images",
                "train step ms", "sample s", "decode s", "recognised", "Fréchet", "kernel",
                "speed-up of latent over pixel: training step"):
        assert row in text, f"{row!r} missing from the output:\n{text}"


def test_bench_sd_quick_prints_targets_and_the_guidance_sweep():
    entries = du.CheckpointManifest.load().entries
    missing = {"classifier", "clip", "vae", "sd_unet"} - set(entries)
    if missing:
        pytest.skip(f"not shipped yet: {sorted(missing)}")
    text = run_quick("bench_sd.py")
    for row in ("1. generation time", "2. prompt accuracy", "3. guidance scale", "real images",
                "shape and colour", "Fréchet", "kernel", "diversity"):
        assert row in text, f"{row!r} missing from the output:\n{text}"
    targets = [line for line in text.splitlines() if line.rstrip().endswith("MET")]
    assert len(targets) == 3, f"expected three target lines (time, seen, held-out):\n{text}"
    assert any("≤ 2 s" in line for line in targets), text
    assert [line.split()[0] for line in targets[1:]] == ["seen", "held-out"], text
