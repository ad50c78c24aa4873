"""Section 00 set-up helpers: device choice, the scale switch, seeding."""
import pytest
import torch

import diffusion_utilities as du


def test_get_device_is_available_here():
    device = du.get_device()
    assert device.type in ("cuda", "mps", "cpu")
    torch.zeros(1, device=device)  # usable


@pytest.mark.parametrize("value, expected", [("ci", "ci"), (" Standard ", "standard"), ("full", "full")])
def test_course_scale_reads_the_environment(monkeypatch, value, expected):
    monkeypatch.setenv("COURSE_SCALE", value)
    assert du.course_scale() == expected
    assert du.by_scale(ci=1, standard=2, full=3) == {"ci": 1, "standard": 2, "full": 3}[expected]


def test_course_scale_defaults_to_standard(monkeypatch):
    monkeypatch.delenv("COURSE_SCALE", raising=False)
    assert du.course_scale() == "standard"


def test_unknown_scale_names_the_choices(monkeypatch):
    monkeypatch.setenv("COURSE_SCALE", "huge")
    with pytest.raises(ValueError, match=r"COURSE_SCALE must be one of \('ci', 'standard', 'full'\)"):
        du.course_scale()


def test_seed_everything_repeats_random_draws():
    du.seed_everything(3)
    a = torch.randn(5)
    du.seed_everything(3)
    assert torch.equal(a, torch.randn(5))
