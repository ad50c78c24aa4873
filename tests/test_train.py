"""tools.train, the command that builds the shipped checkpoints: a few steps of each model
into a temporary folder, and a fine-tune chained onto it (command, steps, wall time, device)."""
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


def test_classifier_run_records_its_accuracy(tmp_path):
    train.main(["classifier", "--num-images", "160", "--epochs", "1", "--batch-size", "32",
                "--width", "8", "--data-dir", str(tmp_path)])
    entry = record(tmp_path, "classifier")
    assert entry["steps"] == 5 and entry["config"]["width"] == 8
    assert set(entry["quality"]["accuracy_train_split"]) == set(du.ATTRIBUTES)
    model = du.AttributeClassifier(entry["config"]["num_classes"], width=8)
    model.load_state_dict(du.load_checkpoint("classifier", data_dir=tmp_path))


def test_init_from_a_missing_checkpoint_names_it(tmp_path):
    with pytest.raises(ValueError, match="ddpm_shapes"):
        train.main(["ddpm", "--steps", "1", "--init-from", "ddpm_shapes",
                    "--data-dir", str(tmp_path)])


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
