"""The checkpoints shipped in data/: the manifest, the sha256 check with its clear messages,
and the quality each model still reaches (a small CPU sample against the manifest's figure)."""
import shutil
import time

import pytest
import torch

import diffusion_utilities as du
from tools.train import shapes_tensors

MANIFEST = du.CheckpointManifest.load()


def shipped(name):
    """The manifest entry of ``name``, or skip (with the reason) if it is not shipped."""
    if name not in MANIFEST.entries:
        pytest.skip(f"data/manifest.json has no entry {name!r} (build it with tools/train.py)")
    return MANIFEST.entries[name]


# ── save / load and the error messages (on temporary copies) ─────────────────────────


def test_save_and_load_round_trip(tmp_path):
    model = torch.nn.Linear(3, 2)
    entry = du.save_checkpoint("tiny", model.state_dict(), command="python make_tiny.py",
                               data_dir=tmp_path, steps=1, quality={"measures": "nothing"})
    assert entry["file"] == "tiny.pt" and entry["size_bytes"] == (tmp_path / "tiny.pt").stat().st_size
    assert entry["sha256"] == du.file_sha256(tmp_path / "tiny.pt")
    state = du.load_checkpoint("tiny", data_dir=tmp_path)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    # a second checkpoint keeps the first one's record
    du.save_checkpoint("tiny_half", model.state_dict(), command="x", data_dir=tmp_path, half=True)
    manifest = du.CheckpointManifest.load(tmp_path)
    assert set(manifest.entries) == {"tiny", "tiny_half"}
    half = du.load_checkpoint("tiny_half", data_dir=tmp_path)
    assert half["weight"].dtype == torch.float32
    assert torch.allclose(half["weight"], model.weight, atol=1e-3)


@pytest.fixture
def copied(tmp_path):
    """A temporary data dir holding one small checkpoint and its manifest."""
    du.save_checkpoint("tiny", torch.nn.Linear(3, 2).state_dict(),
                       command="python -m tools.train tiny --steps 5", data_dir=tmp_path)
    return tmp_path


def test_missing_file_names_file_and_command(copied):
    (copied / "tiny.pt").unlink()
    with pytest.raises(FileNotFoundError) as err:
        du.load_checkpoint("tiny", data_dir=copied)
    assert "tiny.pt" in str(err.value)
    assert "python -m tools.train tiny --steps 5" in str(err.value)


def test_corrupt_file_names_file_and_command(copied):
    path = copied / "tiny.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError) as err:
        du.load_checkpoint("tiny", data_dir=copied)
    assert "tiny.pt" in str(err.value) and "corrupt" in str(err.value)
    assert "python -m tools.train tiny --steps 5" in str(err.value)


def test_unknown_name_lists_the_known_ones(copied):
    with pytest.raises(ValueError, match="known: \\['tiny'\\]"):
        du.load_checkpoint("nope", data_dir=copied)


# ── the shipped files ────────────────────────────────────────────────────────────────


def test_manifest_records_are_complete():
    fields = {"file", "sha256", "size_bytes", "command", "steps", "wall_time_s", "device",
              "parameters", "config", "quality"}
    for name, entry in MANIFEST.entries.items():
        assert fields <= set(entry), f"{name}: missing {fields - set(entry)}"
        assert entry["command"].startswith("python -m tools.train ")
        assert "measures" in entry["quality"]
        assert entry["size_bytes"] < 10_000_000, f"{name} is too big to ship"


@pytest.mark.parametrize("name", sorted(MANIFEST.entries) or ["(none)"])
def test_shipped_checkpoint_matches_its_manifest(name, tmp_path):
    entry = shipped(name)
    state = du.load_checkpoint(name)  # checks the sha256
    assert all(v.dtype != torch.float16 for v in state.values())
    # the same file, corrupted in a temporary copy, is refused with the rebuild command
    shutil.copy(MANIFEST.path, tmp_path / du.MANIFEST_FILE)
    data = bytearray((du.DATA_DIR / entry["file"]).read_bytes())
    data[-10] ^= 0xFF
    (tmp_path / entry["file"]).write_bytes(bytes(data))
    with pytest.raises(ValueError, match="rebuild it with `python -m tools.train"):
        du.load_checkpoint(name, data_dir=tmp_path)


def test_classifier_still_reads_the_attributes():
    entry = shipped("classifier")
    classifier = du.load_classifier()
    images, labels = shapes_tensors(500, seed=20_000, split="train")
    with torch.no_grad():
        logits = classifier(images)
    for i, name in enumerate(du.ATTRIBUTES):
        accuracy = (logits[name].argmax(-1) == labels[:, i]).float().mean().item()
        assert accuracy >= entry["quality"]["accuracy_train_split"][name] - 0.03, name
    quality = entry["quality"]
    assert du.recognised_fraction(images, classifier) >= quality["recognised_fraction_real"] - 0.05
    torch.manual_seed(0)
    noise = torch.randn(200, 3, 32, 32).clamp(-1, 1)
    assert du.recognised_fraction(noise, classifier) <= quality["recognised_fraction_noise"] + 0.05


def test_ddpm_model_still_makes_recognisable_shapes():
    entry = shipped("ddpm_shapes")
    if "classifier" not in MANIFEST.entries:
        pytest.skip("the classifier checkpoint is not shipped")
    model, schedule = du.load_diffusion_model("ddpm_shapes")
    model, _ = du.fast_setup(model)
    start = time.time()
    samples = du.sample_images(model, 32, schedule, num_steps=CHECK_STEPS, progress=False,
                               generator=torch.Generator().manual_seed(1))
    elapsed = time.time() - start
    fraction = du.recognised_fraction(samples, du.load_classifier())
    # 32 samples: a binomial standard deviation of about 0.05 around the manifest's figure
    assert fraction >= entry["quality"]["recognised_fraction"] - MARGIN, (fraction, elapsed)


CHECK_STEPS = 100  # respaced DDPM steps for the quick check (the manifest says what it used)
MARGIN = 0.2


def test_clip_still_names_shapes_and_colours_zero_shot():
    entry = shipped("clip")
    clip = du.load_clip()
    for split, seed, key in (("train", 20_000, "zero_shot_seen"),
                             ("held_out", 20_001, "zero_shot_held_out")):
        images, labels = shapes_tensors(300, seed=seed, split=split)
        accuracy = du.zero_shot_accuracy(clip, images, labels)
        for name in ("shape", "colour"):
            # 300 images: a binomial standard deviation of at most 0.03 around the manifest's
            assert accuracy[name] >= entry["quality"][key][name] - 0.08, (split, name, accuracy)


def test_noisy_classifier_still_reads_noised_images():
    entry = shipped("noisy_classifier")
    model = du.load_noisy_classifier()
    schedule = du.NoiseSchedule.create(entry["schedule"]["name"], entry["schedule"]["T"])
    images, labels = shapes_tensors(300, seed=20_002, split="train")
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 250, (len(images),), generator=g)   # the first quarter of [0, T)
    xt = du.q_sample(images, t, torch.randn(images.shape, generator=g), schedule)
    with torch.no_grad():
        logits = model(xt, t)
    for i, name in ((0, "shape"), (1, "colour")):
        accuracy = (logits[name].argmax(-1) == labels[:, i]).float().mean().item()
        assert accuracy >= entry["quality"][f"train {name}, t in [0, 250)"] - 0.08, name


def test_load_diffusion_model_gives_the_model_and_its_schedule():
    entry = shipped("ddpm_shapes")
    model, schedule = du.load_diffusion_model()
    assert not model.training and schedule.T == entry["schedule"]["T"]
    expected = du.NoiseSchedule.create(entry["schedule"]["name"], entry["schedule"]["T"])
    assert torch.equal(schedule.alpha_bars, expected.alpha_bars)
    state = du.load_checkpoint("ddpm_shapes")
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="not a diffusion model"):
        du.load_diffusion_model("classifier")
