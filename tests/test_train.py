"""tools.train, the command that builds the shipped checkpoints: a few steps of each model
into a temporary folder, and a fine-tune chained onto it (command, steps, wall time, device);
arguments refused before any work; runs interrupted by Ctrl-C and resumed to the same result;
checkpoint writes that an interruption cannot leave half done."""
import argparse
import dataclasses
import json
import os
import signal

import pytest
import torch

import diffusion_utilities as du
from tools import train


def record(data_dir, name):
    return du.CheckpointManifest.load(data_dir).entry(name)


def test_ddpm_run_and_a_chained_fine_tune(tmp_path, capsys):
    common = ["--num-images", "64", "--batch-size", "8", "--eval-samples", "4",
              "--eval-steps", "2", "--warmup", "1", "--half", "--data-dir", str(tmp_path)]
    train.main(["ddpm", "--steps", "3", *common])
    first = record(tmp_path, "ddpm_shapes")
    assert first["steps"] == 3 and first["dtype"] == "float16"
    assert first["command"] == "python -m tools.train ddpm --steps 3 " + " ".join(common)
    assert 0.0 <= first["quality"]["recognised_fraction"] <= 1.0
    assert first["parameters"] == du.count_parameters(du.UNet(train.ddpm_config()))
    assert "recognised fraction of 4 samples" in capsys.readouterr().out

    train.main(["ddpm", "--steps", "2", "--init-from", "ddpm_shapes", "--lr-shape", "cosine",
                *common])
    second = record(tmp_path, "ddpm_shapes")
    assert second["steps"] == 5
    assert second["command"].startswith(first["command"] + " && python -m tools.train ddpm ")
    assert "--init-from ddpm_shapes" in second["command"].split(" && ")[1]
    assert second["wall_time_s"] >= first["wall_time_s"]
    assert second["device"].startswith(first["device"] + "; then 2 steps on ")
    # the fine-tune's weights load into the UNet of the manifest's config
    state = du.load_checkpoint("ddpm_shapes", data_dir=tmp_path)
    assert set(state) == set(du.UNet(train.ddpm_config()).state_dict())


@pytest.mark.usefixtures("one_thread", "tiny_unet")
def test_cond_run_fine_tunes_the_unconditional_model_with_its_conditions(tmp_path, monkeypatch):
    common = ["--num-images", "24", "--batch-size", "8", "--eval-samples", "4", "--eval-steps",
              "2", "--warmup", "1", "--data-dir", str(tmp_path), "--fast-mode", "float32"]
    train.main(["ddpm", "--steps", "2", *common])
    seen = []
    original = du.diffusion_loss
    monkeypatch.setattr(du, "diffusion_loss", lambda *a, **kw: seen.append(kw) or original(*a, **kw))
    train.main(["cond", "--steps", "3", "--init-from", "ddpm_shapes", "--cond-drop", "0.5",
                "--min-snr-gamma", "5", *common])
    entry = record(tmp_path, "cond_shapes")
    assert entry["steps"] == 5 and entry["config"]["attribute_dim"] == du.ATTRIBUTE_DIM
    assert entry["command"].split(" && ")[1].startswith("python -m tools.train cond --steps 3")
    assert entry["training"]["cond_drop"] == 0.5 and entry["training"]["min_snr_gamma"] == 5.0
    for split in ("seen_pairs", "held_out_pairs"):
        assert 0.0 <= entry["quality"][split]["shape and colour"] <= 1.0
    # every step's loss got the batch's context vectors (rows multi-hot or dropped to zeros)
    assert len(seen) == 3
    for kw in seen:
        c = kw["attributes"]
        assert c.shape == (8, du.ATTRIBUTE_DIM) and kw["min_snr_gamma"] == 5.0
        assert set(c.sum(dim=1).tolist()) <= {0.0, 5.0}
    # the unconditional weights were the start: all but the new embedding came from them
    config = du.UNetConfig(**{k: tuple(v) if isinstance(v, list) else v
                              for k, v in entry["config"].items()})
    state = du.load_checkpoint("cond_shapes", data_dir=tmp_path)
    assert set(state) == set(du.UNet(config).state_dict())
    assert any(k.startswith("attribute_emb.") for k in state)


def test_classifier_run_records_its_accuracy(tmp_path):
    train.main(["classifier", "--num-images", "160", "--epochs", "1", "--batch-size", "32",
                "--width", "8", "--data-dir", str(tmp_path)])
    entry = record(tmp_path, "classifier")
    assert entry["steps"] == 5 and entry["config"]["width"] == 8
    assert set(entry["quality"]["accuracy_train_split"]) == set(du.ATTRIBUTES)
    model = du.AttributeClassifier(entry["config"]["num_classes"], width=8)
    model.load_state_dict(du.load_checkpoint("classifier", data_dir=tmp_path))


def test_init_from_a_missing_checkpoint_names_it(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        train.main(["ddpm", "--steps", "1", "--warmup", "0", "--init-from", "ddpm_shapes",
                    "--data-dir", str(tmp_path)])
    assert stop.value.code == 2
    assert "argument --init-from: no checkpoint called 'ddpm_shapes'" in capsys.readouterr().err


def test_chained_records_read_as_one_history():
    earlier = train.Earlier("python -m tools.train ddpm --steps 4", 4, 10.0, "cpu, 1 thread")
    assert earlier.chain_command("python -m tools.train ddpm --steps 2 --init-from ddpm_shapes") \
        == ("python -m tools.train ddpm --steps 4 && "
            "python -m tools.train ddpm --steps 2 --init-from ddpm_shapes")
    assert earlier.chain_device("cuda (H100)", 2) == "cpu, 1 thread; then 2 steps on cuda (H100)"
    fresh = train.Earlier()
    assert fresh.chain_command("a") == "a" and fresh.chain_device("cpu", 3) == "cpu"
    assert train.reproducing_command(["ddpm", "--steps", "9", "--max-minutes", "5", "--half"], 7) \
        == "python -m tools.train ddpm --steps 7 --half"


def test_device_description_counts_threads(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert train.device_description(torch.device("cpu")).startswith("cpu, 1 thread, ")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    assert train.device_description(torch.device("cpu")).startswith("cpu, 4 threads, ")


# ── arguments are checked before any work ───────────────────────────────────────────

@pytest.mark.parametrize("argv, message", [
    (["ddpm", "--steps", "0"], "argument --steps: expected a whole number >= 1, got 0"),
    (["ddpm", "--steps", "-5"], "argument --steps: expected a whole number >= 1, got -5"),
    (["ddpm", "--steps", "1e3"], "argument --steps: expected a whole number >= 1, got '1e3'"),
    (["ddpm", "--lr", "-1"], "argument --lr: expected a number > 0, got -1"),
    (["ddpm", "--lr", "inf"], "argument --lr: expected a number > 0, got inf"),
    (["ddpm", "--batch-size", "0"], "argument --batch-size: expected a whole number >= 1"),
    (["ddpm", "--steps", "100"], "argument --warmup: expected a whole number from 0 to "
                                 "--steps - 1 = 99, got 200"),
    (["ddpm", "--warmup", "-1"], "argument --warmup: expected a whole number >= 0, got -1"),
    (["ddpm", "--threads", "0"], "argument --threads: expected a whole number >= 1, got 0"),
    (["ddpm", "--seed", "-1"], "argument --seed: expected a whole number from 0 to 4294967295"),
    (["ddpm", "--log-every", "0"], "argument --log-every: expected a whole number >= 1"),
    (["ddpm", "--save-every", "0"], "argument --save-every: expected a whole number >= 1"),
    (["ddpm", "--ema-decay", "1"], "argument --ema-decay: expected a number >= 0 and < 1, got 1"),
    (["ddpm", "--T", "50"], "argument --eval-steps: expected at most --T = 50 sampling steps"),
    (["ddpm", "--max-minutes", "5", "--lr-shape", "cosine"],
     "argument --max-minutes: needs --lr-shape constant"),
    (["classifier", "--width", "12"], "argument --width: expected a multiple of 8 >= 8, got 12"),
    (["classifier", "--num-images", "10", "--epochs", "1"],
     "argument --batch-size: expected at most --epochs x --num-images = 10"),
    (["classifier", "--save-every", "-1"], "argument --save-every: expected a whole number >= 1"),
    (["clip", "--steps", "10", "--warmup", "10"],
     "argument --warmup: expected a whole number from 0 to --steps - 1 = 9, got 10"),
    (["clip", "--patch-size", "5"],
     "argument --patch-size: expected a divisor of the image size 32, got 5"),
    (["clip", "--patch-size", "64"],
     "argument --patch-size: expected a divisor of the image size 32, got 64"),
    (["clip", "--batch-size", "1"], "argument --batch-size: expected a whole number >= 2, got 1"),
    (["clip", "--width", "10"], "argument --width: expected a multiple of 4 >= 8, got 10"),
    (["clip", "--layers", "0"], "argument --layers: expected a whole number >= 1, got 0"),
    (["clip", "--num-images", "1"], "argument --num-images: expected a whole number from 2 to"),
    (["clip", "--eval-every", "0"], "argument --eval-every: expected a whole number >= 1, got 0"),
    (["noisy", "--steps", "50"], "argument --warmup: expected a whole number from 0 to "
                                 "--steps - 1 = 49, got 100"),
    (["noisy", "--width", "12"], "argument --width: expected a multiple of 8 >= 8, got 12"),
    (["noisy", "--lr", "0"], "argument --lr: expected a number > 0, got 0"),
    (["noisy", "--num-images", "4"], "argument --num-images: expected a whole number from 5 to"),
    (["vae", "--channels", "8", "8", "8", "8", "8", "8", "8"],
     "argument --channels: expected at most 6 levels (each but the last halves the 32-pixel "
     "image), got 7"),
    (["vae", "--channels", "12", "16"], "argument --channels: expected a multiple of 8 >= 8, "
                                        "got 12"),
    (["vae", "--steps", "50"], "argument --warmup: expected a whole number from 0 to "
                               "--steps - 1 = 49, got 100"),
    (["vae", "--kl-weight", "-1"], "argument --kl-weight: expected a number >= 0, got -1"),
    (["vae", "--latent-channels", "0"],
     "argument --latent-channels: expected a whole number >= 1, got 0"),
    (["latent", "--T", "10"], "argument --eval-steps: expected at most --T = 10 sampling "
                              "steps, got 25"),
    (["latent", "--steps", "100"], "argument --warmup: expected a whole number from 0 to "
                                   "--steps - 1 = 99, got 100"),
    (["sd", "--T", "20", "--eval-steps", "30"],
     "argument --eval-steps: expected at most --T = 20 sampling steps, got 30"),
    (["sd", "--cond-drop", "1"], "argument --cond-drop: expected a number >= 0 and < 1, got 1"),
    (["sd", "--eval-guidance", "-1"], "argument --eval-guidance: expected a number >= 0, got -1"),
])
def test_bad_arguments_are_refused_with_the_expected_range(argv, message, capsys, monkeypatch):
    monkeypatch.setattr(train, "train_ddpm", lambda *a: pytest.fail("training started"))
    monkeypatch.setattr(train, "train_classifier", lambda *a: pytest.fail("training started"))
    monkeypatch.setattr(train, "train_clip", lambda *a: pytest.fail("training started"))
    monkeypatch.setattr(train, "train_noisy", lambda *a: pytest.fail("training started"))
    monkeypatch.setattr(train, "train_vae", lambda *a: pytest.fail("training started"))
    monkeypatch.setattr(train, "train_latent", lambda *a: pytest.fail("training started"))
    with pytest.raises(SystemExit) as stop:
        train.main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert f"python -m tools.train {argv[0]}: error: {message}" in err
    assert "Traceback" not in err


def test_the_data_folder_is_created_before_training(tmp_path, monkeypatch):
    folder = tmp_path / "new" / "runs"
    seen = []
    monkeypatch.setattr(train, "train_ddpm", lambda args, *_: seen.append(folder.is_dir()))
    train.main(["ddpm", "--data-dir", str(folder)])
    assert seen == [True]


def test_a_data_folder_that_cannot_hold_checkpoints_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train, "train_ddpm", lambda *a: pytest.fail("training started"))
    (tmp_path / "a_file").write_text("")
    for folder, reason in ((tmp_path / "a_file", "it is a file, not a folder"),
                           (tmp_path / "a_file" / "sub", "it cannot be created")):
        with pytest.raises(SystemExit):
            train.main(["ddpm", "--data-dir", str(folder)])
        assert f"argument --data-dir: cannot write checkpoints in {folder}: {reason}" \
            in capsys.readouterr().err

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(train.tempfile, "TemporaryFile", read_only)
    with pytest.raises(SystemExit):
        train.main(["ddpm", "--data-dir", str(tmp_path)])
    assert "it is not writable (Permission denied)" in capsys.readouterr().err


# ── Ctrl-C saves the run, --resume continues it to the same result ──────────────────

# --fast-mode: the same mode in every run (measuring could pick another between two runs)
TINY_DDPM = ["--num-images", "24", "--batch-size", "8", "--warmup", "1", "--eval-samples", "1",
             "--eval-steps", "1", "--log-every", "1", "--save-every", "2",
             "--fast-mode", "float32_channels_last"]


@pytest.fixture
def tiny_unet(monkeypatch):
    """A much smaller UNet than the shipped one, so a run takes seconds; with dropout, so
    that the model draws random numbers too."""
    monkeypatch.setattr(train, "ddpm_config", lambda: du.UNetConfig(
        base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(16,),
        heads=2, dropout=0.1))


def press_ctrl_c(monkeypatch, owner, name, *, at_call, times=1):
    """Make ``owner.name`` send Ctrl-C (SIGINT) to this process ``times`` times in its
    ``at_call``-th call, in the middle of a training step."""
    original, calls = getattr(owner, name), []

    def pressing(*args, **kwargs):
        calls.append(1)
        if len(calls) == at_call:
            for _ in range(times):
                signal.raise_signal(signal.SIGINT)
        return original(*args, **kwargs)
    monkeypatch.setattr(owner, name, pressing)


def stopped(argv, capsys):
    """Run ``argv``, which is interrupted; return what it printed on stderr."""
    with pytest.raises(SystemExit) as stop:
        train.main(argv)
    assert stop.value.code == 130
    return capsys.readouterr().err


def largest_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.mark.usefixtures("one_thread")
def test_an_interrupted_ddpm_run_resumes_to_the_same_result(tmp_path, capsys, monkeypatch,
                                                            tiny_unet):
    whole_run, parts = tmp_path / "whole", tmp_path / "parts"
    train.main(["ddpm", "--steps", "5", *TINY_DDPM, "--data-dir", str(whole_run)])
    expected = du.load_checkpoint("ddpm_shapes", data_dir=whole_run)
    argv = ["ddpm", "--steps", "5", *TINY_DDPM, "--data-dir", str(parts)]
    resume_file = parts / "ddpm_shapes.resume.pt"

    # Ctrl-C twice in step 3 stops at once: the state saved after step 2 (--save-every 2) stays
    with monkeypatch.context() as patch:
        press_ctrl_c(patch, du.EMA, "update", at_call=3, times=2)
        err = stopped(argv, capsys)
    assert f"after step 2 is saved in {resume_file}" in err
    assert f"continue it with: python -m tools.train {' '.join(argv)} --resume" in err
    # a Ctrl-C in the middle of step 4 (of the resumed run's 2nd step) lets it end, then saves
    with monkeypatch.context() as patch:
        press_ctrl_c(patch, du.EMA, "update", at_call=2)
        err = stopped([*argv, "--resume"], capsys)
    assert f"after step 4 is saved in {resume_file}" in err
    state = torch.load(resume_file, weights_only=True)
    assert state["step"] == 4 and state["fast_mode"] == "float32_channels_last"
    train.main([*argv, "--resume"])
    assert not resume_file.exists()

    got = du.load_checkpoint("ddpm_shapes", data_dir=parts)
    difference = largest_difference(got, expected)
    print(f"largest difference of the resumed run's EMA weights: {difference:.3g}")
    assert difference <= 1e-6
    before, after = record(whole_run, "ddpm_shapes"), record(parts, "ddpm_shapes")
    assert after["steps"] == 5 and after["command"] == before["command"].replace(
        str(whole_run), str(parts))
    assert after["training"]["final_loss"] == pytest.approx(before["training"]["final_loss"],
                                                            abs=1e-4)


@pytest.mark.usefixtures("one_thread")
def test_an_interrupted_classifier_run_resumes_to_the_same_result(tmp_path, capsys,
                                                                 monkeypatch):
    tiny = ["--num-images", "80", "--epochs", "1", "--batch-size", "16", "--width", "8",
            "--negatives", "0.25", "--save-every", "2"]
    train.main(["classifier", *tiny, "--data-dir", str(tmp_path / "whole")])
    argv = ["classifier", *tiny, "--data-dir", str(tmp_path / "parts")]
    with monkeypatch.context() as patch:
        press_ctrl_c(patch, train, "classifier_loss", at_call=3)
        assert "after step 3 is saved" in stopped(argv, capsys)
    train.main([*argv, "--resume"])
    difference = largest_difference(du.load_checkpoint("classifier", data_dir=tmp_path / "parts"),
                                    du.load_checkpoint("classifier", data_dir=tmp_path / "whole"))
    assert difference <= 1e-6
    assert not (tmp_path / "parts" / "classifier.resume.pt").exists()


@pytest.mark.usefixtures("one_thread")
def test_resume_refuses_other_arguments_and_a_missing_state(tmp_path, capsys, monkeypatch,
                                                            tiny_unet):
    argv = ["ddpm", "--steps", "4", *TINY_DDPM, "--data-dir", str(tmp_path)]
    with pytest.raises(SystemExit) as stop:
        train.main([*argv, "--resume"])
    assert stop.value.code == 2
    assert f"no interrupted run to continue: {tmp_path / 'ddpm_shapes.resume.pt'} does not " \
           "exist" in capsys.readouterr().err
    with monkeypatch.context() as patch:
        press_ctrl_c(patch, du.EMA, "update", at_call=1)
        stopped(argv, capsys)
    monkeypatch.setattr(train, "train_ddpm", lambda *a: pytest.fail("training started"))
    with pytest.raises(SystemExit) as stop:
        train.main([*argv, "--resume", "--steps", "6", "--lr", "2e-3", "--half",
                    "--save-every", "3", "--threads", "1"])  # the last two may differ
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert ("the interrupted run had other arguments: --half on (the interrupted run: off); "
            "--lr 0.002 (the interrupted run: 0.001); --steps 6 (the interrupted run: 4)") in err
    # a new run in the same folder warns that it will replace the interrupted one
    monkeypatch.setattr(train, "train_ddpm", lambda *a: None)
    train.main(argv)
    assert f"note: {tmp_path / 'ddpm_shapes.resume.pt'} holds an interrupted run" \
        in capsys.readouterr().err


# ── checkpoint writes are atomic ─────────────────────────────────────────────────────

def test_a_failure_while_writing_leaves_the_old_checkpoint_and_manifest(tmp_path, monkeypatch):
    du.save_checkpoint("tiny", {"w": torch.ones(3)}, command="first", data_dir=tmp_path)
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    real_save = torch.save

    def save_half_then_fail(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        with open(f, "r+b") as out:
            out.truncate(10)  # a partly written file
        raise KeyboardInterrupt
    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", save_half_then_fail)
        with pytest.raises(KeyboardInterrupt):
            du.save_checkpoint("tiny", {"w": torch.zeros(3)}, command="second", data_dir=tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == files  # no temporary left
    assert du.load_checkpoint("tiny", data_dir=tmp_path)["w"].tolist() == [1.0, 1.0, 1.0]

    def dumps_then_fail(*args, **kwargs):
        raise OSError(28, "No space left on device")
    with monkeypatch.context() as patch:
        patch.setattr(json, "dumps", dumps_then_fail)
        with pytest.raises(OSError):
            du.save_checkpoint("other", {"w": torch.zeros(2)}, command="third", data_dir=tmp_path)
    assert (tmp_path / "manifest.json").read_bytes() == files["manifest.json"]
    assert sorted(os.listdir(tmp_path)) == sorted([*files, "other.pt"])
    assert du.load_checkpoint("tiny", data_dir=tmp_path)["w"].tolist() == [1.0, 1.0, 1.0]


# ── lesson 06's CLIP and lesson 09's noise-aware classifier ─────────────────────────

TINY_CLIP = ["--steps", "6", "--warmup", "1", "--num-images", "64", "--batch-size", "16",
             "--width", "16", "--layers", "1", "--eval-every", "1000"]
TINY_NOISY = ["--steps", "4", "--warmup", "1", "--num-images", "40", "--batch-size", "8",
              "--width", "8"]


def in_unit_interval(values) -> bool:
    return all(0.0 <= v <= 1.0 for v in values)


@pytest.mark.usefixtures("one_thread")
def test_clip_run_writes_what_load_clip_reads_and_a_fine_tune_chains_onto_it(tmp_path, capsys):
    common = [*TINY_CLIP, "--data-dir", str(tmp_path)]
    train.main(["clip", *common])
    first = record(tmp_path, "clip")
    assert first["steps"] == 6 and first["dtype"] == "float32"
    assert first["command"] == "python -m tools.train clip " + " ".join(common)
    config = du.ClipConfig(**first["config"])
    assert (config.vision_width, config.text_width, config.embed_dim) == (16, 16, 16)
    assert (config.vision_layers, config.text_layers, config.patch_size) == (1, 1, 4)
    assert first["parameters"] == du.count_parameters(du.CLIP(config))
    quality = first["quality"]
    for split in ("zero_shot_seen", "zero_shot_held_out"):
        assert set(quality[split]) == {"shape", "colour"}
        assert in_unit_interval(quality[split].values())
    assert {"recall@1", "recall@5"} <= set(quality["retrieval"])
    assert in_unit_interval(quality["retrieval"].values())
    assert first["training"]["final_loss"] > 0 and first["training"]["batch_size"] == 16
    assert "training in " in capsys.readouterr().out
    assert not (tmp_path / "clip.resume.pt").exists()

    clip = du.load_clip(data_dir=tmp_path)
    assert not clip.training and clip.config == config
    images = du.from_uint8(du.make_shapes(3, seed=1).images)
    ids, _ = du.CaptionTokenizer().encode(["a red star", "", "a blue circle"])
    assert clip(images, ids).shape == (3, 3)

    train.main(["clip", *common[:1], "2", *common[2:], "--init-from", "clip", "--half"])
    second = record(tmp_path, "clip")
    assert second["steps"] == 8 and second["dtype"] == "float16"
    assert second["command"].startswith(first["command"] + " && python -m tools.train clip ")
    assert second["device"].startswith(first["device"] + "; then ")
    assert du.load_clip(data_dir=tmp_path).config == config


@pytest.mark.usefixtures("one_thread")
def test_noisy_run_writes_what_load_noisy_classifier_reads(tmp_path):
    train.main(["noisy", *TINY_NOISY, "--data-dir", str(tmp_path)])
    entry = record(tmp_path, "noisy_classifier")
    assert entry["steps"] == 4 and entry["config"]["width"] == 8
    assert entry["config"]["num_classes"] == du.attribute_num_classes()
    # the schedule of the shipped diffusion models, which the classifier was trained on
    assert entry["schedule"] == du.CheckpointManifest.load().entry("ddpm_shapes")["schedule"]
    quality = {k: v for k, v in entry["quality"].items() if k != "measures"}
    assert len(quality) == 2 * 2 * 4 and in_unit_interval(quality.values())
    assert "held_out colour, t in [750, 1000)" in quality
    classifier = du.load_noisy_classifier(data_dir=tmp_path)
    assert not classifier.training and classifier.width == 8
    logits = classifier(torch.zeros(2, 3, 32, 32), torch.tensor([0, 999]))
    assert {k: v.shape[1] for k, v in logits.items()} == du.attribute_num_classes()
    assert not (tmp_path / "noisy_classifier.resume.pt").exists()


def test_faster_in_bfloat16_times_both_and_picks_the_faster(monkeypatch, capsys):
    for bf16_seconds, expected in ((0.5, True), (2.0, False)):
        clock, calls = [0.0], []

        def step(bf16):
            calls.append(bf16)
            clock[0] += bf16_seconds if bf16 else 1.0
        monkeypatch.setattr(train.time, "perf_counter", lambda: clock[0])
        assert train.faster_in_bfloat16(step, tries=3) is expected
        assert calls == [False] * 4 + [True] * 4   # a warm-up step, then the timed ones
        assert f"one step: float32 1.00 s, bfloat16 {bf16_seconds:.2f} s" in capsys.readouterr().out


@pytest.mark.parametrize("what, name", [("clip", "clip"), ("noisy", "noisy_classifier")])
def test_init_from_a_missing_clip_or_noisy_checkpoint_names_it(what, name, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        train.main([what, "--init-from", name, "--data-dir", str(tmp_path)])
    assert stop.value.code == 2
    assert f"argument --init-from: no checkpoint called {name!r}" in capsys.readouterr().err


def count_timing_steps(monkeypatch) -> list:
    """Count the training steps that train.faster_in_bfloat16 runs to time them."""
    calls, real = [], train.faster_in_bfloat16
    monkeypatch.setattr(train, "faster_in_bfloat16",
                        lambda step, **kw: real(lambda bf16: calls.append(1) or step(bf16), **kw))
    return calls


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("what, name, tiny, in_step", [
    ("clip", "clip", TINY_CLIP, "contrastive_loss"),
    ("noisy", "noisy_classifier", TINY_NOISY, "q_sample"),
])
def test_an_interrupted_clip_or_noisy_run_resumes_to_the_same_result(
        what, name, tiny, in_step, tmp_path, capsys, monkeypatch):
    # the quality measure is tested above; --float32: the same mode in every run
    monkeypatch.setattr(train, "clip_quality", lambda model: {})
    monkeypatch.setattr(train, "noisy_quality", lambda model, schedule: {})
    tiny = [*tiny, "--float32", "--save-every", "2"]
    timing = count_timing_steps(monkeypatch)
    train.main([what, *tiny, "--data-dir", str(tmp_path / "whole")])
    argv = [what, *tiny, "--data-dir", str(tmp_path / "parts")]
    with monkeypatch.context() as patch:  # Ctrl-C in the middle of training step 3
        press_ctrl_c(patch, du, in_step, at_call=len(timing) + 3)
        assert "after step 3 is saved" in stopped(argv, capsys)
    assert torch.load(tmp_path / "parts" / f"{name}.resume.pt", weights_only=True)["step"] == 3
    train.main([*argv, "--resume"])
    assert "resuming after step 3" in capsys.readouterr().out
    difference = largest_difference(du.load_checkpoint(name, data_dir=tmp_path / "parts"),
                                    du.load_checkpoint(name, data_dir=tmp_path / "whole"))
    assert difference <= 1e-6
    assert not (tmp_path / "parts" / f"{name}.resume.pt").exists()
    before, after = record(tmp_path / "whole", name), record(tmp_path / "parts", name)
    assert after["steps"] == before["steps"] and after["command"] == before["command"].replace(
        str(tmp_path / "whole"), str(tmp_path / "parts"))


# ── lesson 07's VAE and latent UNet, lesson 08's text-to-image UNet ─────────────────

# four levels of 8 channels: 32 x 32 images -> 4 x 4 latents, so the latent UNet is tiny too;
# --float32: the same mode in every run (measuring could pick another between two runs)
TINY_VAE = ["--warmup", "1", "--num-images", "16", "--batch-size", "4",
            "--channels", "8", "8", "8", "8", "--float32"]
TINY_LATENT = ["--warmup", "1", "--num-images", "16", "--batch-size", "4", "--T", "50",
               "--eval-samples", "4", "--eval-steps", "2", "--float32"]


def as_config(cls, recorded: dict):
    """The config dataclass of a manifest record (JSON gives lists for tuples)."""
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in recorded.items()})


def copy_checkpoint(name: str, source, folder) -> None:
    """Copy the checkpoint ``name`` and its manifest record from ``source`` into ``folder``."""
    entry = du.CheckpointManifest.load(source).entry(name)
    source_file = du.CheckpointManifest.load(source).path.parent / entry["file"]
    (folder / entry["file"]).write_bytes(source_file.read_bytes())
    du.CheckpointManifest.load(folder).update(name, **entry)


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory, one_thread):
    """What `latent` and `sd` read from --vae-dir: a tiny `vae` run's checkpoint (4 steps)
    and a copy of the shipped CLIP."""
    if checkpoint_problem := train.checkpoint_problem("clip", None):
        pytest.skip(f"the sd runs need the shipped CLIP: {checkpoint_problem}")
    folder = tmp_path_factory.mktemp("vae_dir")
    train.main(["vae", "--steps", "4", *TINY_VAE, "--data-dir", str(folder)])
    copy_checkpoint("clip", None, folder)
    return folder


def test_vae_run_writes_what_load_vae_reads_and_its_latent_scale(vae_dir):
    entry = record(vae_dir, "vae")
    assert entry["steps"] == 4 and entry["dtype"] == "float32"
    assert entry["command"] == "python -m tools.train vae --steps 4 " + " ".join(
        [*TINY_VAE, "--data-dir", str(vae_dir)])
    config = as_config(du.VAEConfig, entry["config"])
    assert config == du.VAEConfig(block_channels=(8, 8, 8, 8))
    assert entry["parameters"] == du.count_parameters(du.VAE(config))
    assert entry["training"]["kl_weight"] == 1e-3 and entry["training"]["num_images"] == 16
    assert entry["device"].endswith(", float32")
    assert set(entry["quality"]) == {"measures", "psnr_seen_pairs", "psnr_seen_pairs_worst_5pct",
                                     "psnr_held_out_pairs", "psnr_held_out_pairs_worst_5pct"}
    assert all(0 < v < 60 for k, v in entry["quality"].items() if k != "measures")
    assert not (vae_dir / "vae.resume.pt").exists()

    vae = du.load_vae(data_dir=vae_dir)
    assert not vae.training and vae.config == config
    # the scale is 1 / std of posterior draws of the training images (seeded per batch of 500)
    images, _ = train.shapes_tensors(16, seed=0, split="train")
    with torch.no_grad():
        z = vae.encode(images).sample(torch.Generator().manual_seed(0))
    assert du.vae_scale(data_dir=vae_dir) == entry["latent_scale"]
    assert entry["latent_scale"] == pytest.approx(du.latent_scale(z), rel=1e-5)


@pytest.mark.usefixtures("one_thread")
def test_latent_run_records_its_schedule_and_the_vae_it_was_trained_on(vae_dir, tmp_path):
    train.main(["latent", "--steps", "3", *TINY_LATENT, "--vae-dir", str(vae_dir),
                "--data-dir", str(tmp_path)])
    entry, vae_entry = record(tmp_path, "latent_unet"), record(vae_dir, "vae")
    assert entry["steps"] == 3 and entry["schedule"] == {"name": "cosine", "T": 50}
    assert entry["trained_on"] == {"vae_sha256": vae_entry["sha256"],
                                   "latent_scale": vae_entry["latent_scale"]}
    vae = du.load_vae(data_dir=vae_dir)
    config = as_config(du.UNetConfig, entry["config"])
    assert config == du.sd_unet_config(vae.config, None) and config.image_size == 4
    assert entry["parameters"] == du.count_parameters(du.UNet(config))
    assert "cond_drop" not in entry["training"]
    quality = entry["quality"]
    assert 0.0 <= quality["recognised_fraction"] <= 1.0 and quality["num_samples"] == 4
    assert quality["frechet"] >= 0 and "2 steps" in quality["sampler"]
    assert not (tmp_path / "latent_unet.resume.pt").exists()

    unet, schedule = du.load_diffusion_model("latent_unet", data_dir=tmp_path)
    model = du.LatentDiffusion(unet, vae, du.vae_scale(data_dir=vae_dir), schedule)
    images = model.images(2, num_steps=2, generator=torch.Generator().manual_seed(0),
                          progress=False)
    assert images.shape == (2, 3, 32, 32)


@pytest.mark.usefixtures("one_thread")
def test_sd_run_records_the_vae_and_clip_and_loads_as_a_pipeline(vae_dir, tmp_path):
    folder = tmp_path / "all"     # the VAE and CLIP next to the new UNet, as data/ will hold them
    folder.mkdir()
    for name in ("vae", "clip"):
        copy_checkpoint(name, vae_dir, folder)
    train.main(["sd", "--steps", "3", *TINY_LATENT, "--cond-drop", "0.5", "--eval-guidance", "2",
                "--vae-dir", str(vae_dir), "--data-dir", str(folder)])
    entry = record(folder, "sd_unet")
    vae_entry, clip_entry = record(vae_dir, "vae"), record(vae_dir, "clip")
    assert entry["steps"] == 3 and entry["schedule"] == {"name": "cosine", "T": 50}
    assert entry["trained_on"] == {"vae_sha256": vae_entry["sha256"],
                                   "latent_scale": vae_entry["latent_scale"],
                                   "clip_sha256": clip_entry["sha256"]}
    config = as_config(du.UNetConfig, entry["config"])
    assert config == du.sd_unet_config(as_config(du.VAEConfig, vae_entry["config"]),
                                       clip_entry["config"]["text_width"])
    assert entry["training"]["cond_drop"] == 0.5
    quality = entry["quality"]
    assert quality["guidance_scale"] == 2.0 and quality["num_samples"] == 4
    for split in ("seen_pairs", "held_out_pairs"):
        assert in_unit_interval(quality[split].values())
        assert "shape and colour" in quality[split]
    assert not (folder / "sd_unet.resume.pt").exists()

    pipe = du.MiniStableDiffusion.load(data_dir=folder)
    images = pipe(["a red star", ""], num_steps=2, generator=torch.Generator().manual_seed(0),
                  progress=False)
    assert images.shape == (2, 3, 32, 32)


@pytest.mark.usefixtures("one_thread")
def test_sd_quality_reads_the_clip_of_vae_dir(vae_dir, tmp_path):
    """The UNet reads the text encoder of --vae-dir's CLIP; so must its quality measure (here
    a CLIP of another width than the shipped one)."""
    copy_checkpoint("vae", vae_dir, tmp_path)
    torch.manual_seed(0)
    clip = du.CLIP(du.ClipConfig(vision_width=16, vision_layers=1, vision_heads=2, text_width=16,
                                 text_layers=1, text_heads=2, embed_dim=8))
    du.save_checkpoint("clip", clip.state_dict(), command="test", data_dir=tmp_path,
                       config=dataclasses.asdict(clip.config))
    vae = du.load_vae(data_dir=tmp_path)
    unet = du.UNet(du.sd_unet_config(vae.config, 16))
    args = argparse.Namespace(what="sd", vae_dir=str(tmp_path), eval_samples=2, eval_steps=1,
                              eval_guidance=2.0)
    quality = train.latent_quality(args, unet, vae, du.vae_scale(data_dir=tmp_path),
                                   du.NoiseSchedule.create("cosine", 50))
    assert in_unit_interval(quality["seen_pairs"].values())


@pytest.mark.parametrize("what", ["latent", "sd"])
def test_latent_and_sd_name_a_missing_vae_or_clip(what, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train, "train_latent", lambda *a: pytest.fail("training started"))

    def refused(vae_dir) -> str:
        with pytest.raises(SystemExit) as stop:
            train.main([what, "--vae-dir", str(vae_dir), "--data-dir", str(tmp_path / "out")])
        assert stop.value.code == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        return err

    empty = tmp_path / "empty"
    assert (f"python -m tools.train {what}: error: argument --vae-dir: the run needs the vae "
            f"checkpoint: no checkpoint called 'vae' in {empty / 'manifest.json'} (known: []); "
            "train it first with `python -m tools.train vae`") in refused(empty)
    vae = du.VAE(du.VAEConfig(block_channels=(8, 8)))
    (tmp_path / "vae_only").mkdir()
    du.save_checkpoint("vae", vae.state_dict(), command="test", data_dir=tmp_path / "vae_only",
                       config=dataclasses.asdict(vae.config), latent_scale=1.0)
    if what == "sd":
        assert ("argument --vae-dir: the run needs the clip checkpoint: no checkpoint called "
                "'clip'") in refused(tmp_path / "vae_only")
        assert "train it first with `python -m tools.train clip`" in refused(tmp_path / "vae_only")
    (tmp_path / "vae_only" / "vae.pt").unlink()
    assert ("argument --vae-dir: the run needs the vae checkpoint: the file of checkpoint 'vae', "
            f"{tmp_path / 'vae_only' / 'vae.pt'}, is missing") in refused(tmp_path / "vae_only")


@pytest.mark.usefixtures("one_thread")
def test_an_interrupted_vae_run_resumes_to_the_same_result(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train, "vae_quality", lambda model: {})  # tested above
    tiny = ["--steps", "5", *TINY_VAE, "--save-every", "2"]
    timing = count_timing_steps(monkeypatch)
    train.main(["vae", *tiny, "--data-dir", str(tmp_path / "whole")])
    argv = ["vae", *tiny, "--data-dir", str(tmp_path / "parts")]
    with monkeypatch.context() as patch:  # Ctrl-C in the middle of training step 3
        press_ctrl_c(patch, du, "vae_loss", at_call=len(timing) + 3)
        assert "after step 3 is saved" in stopped(argv, capsys)
    train.main([*argv, "--resume"])
    assert "resuming after step 3" in capsys.readouterr().out
    difference = largest_difference(du.load_checkpoint("vae", data_dir=tmp_path / "parts"),
                                    du.load_checkpoint("vae", data_dir=tmp_path / "whole"))
    assert difference <= 1e-6
    assert not (tmp_path / "parts" / "vae.resume.pt").exists()
    before, after = record(tmp_path / "whole", "vae"), record(tmp_path / "parts", "vae")
    assert after["steps"] == 5 and after["command"] == before["command"].replace(
        str(tmp_path / "whole"), str(tmp_path / "parts"))
    assert after["latent_scale"] == pytest.approx(before["latent_scale"], rel=1e-5)


@pytest.mark.usefixtures("one_thread")
def test_an_interrupted_sd_run_resumes_to_the_same_result(vae_dir, tmp_path, capsys,
                                                          monkeypatch):
    monkeypatch.setattr(train, "latent_quality", lambda *args: {})  # tested above
    tiny = ["--steps", "5", *TINY_LATENT, "--save-every", "2", "--log-every", "1",
            "--vae-dir", str(vae_dir)]
    train.main(["sd", *tiny, "--data-dir", str(tmp_path / "whole")])
    argv = ["sd", *tiny, "--data-dir", str(tmp_path / "parts")]
    with monkeypatch.context() as patch:  # Ctrl-C in the middle of training step 3
        press_ctrl_c(patch, du, "drop_captions", at_call=3)
        assert "after step 3 is saved" in stopped(argv, capsys)
    assert torch.load(tmp_path / "parts" / "sd_unet.resume.pt", weights_only=True)["step"] == 3
    train.main([*argv, "--resume"])
    assert "resuming after step 3" in capsys.readouterr().out
    difference = largest_difference(du.load_checkpoint("sd_unet", data_dir=tmp_path / "parts"),
                                    du.load_checkpoint("sd_unet", data_dir=tmp_path / "whole"))
    assert difference <= 1e-6
    assert not (tmp_path / "parts" / "sd_unet.resume.pt").exists()
    before, after = record(tmp_path / "whole", "sd_unet"), record(tmp_path / "parts", "sd_unet")
    assert after["steps"] == 5 and after["trained_on"] == before["trained_on"]
    assert after["command"] == before["command"].replace(str(tmp_path / "whole"),
                                                         str(tmp_path / "parts"))
    assert after["training"]["final_loss"] == pytest.approx(before["training"]["final_loss"],
                                                            abs=1e-4)
