"""Tests of the check machinery in diffusion_checks/_core.py: inputs left unchanged, what came
back, NaN-safe comparisons, where a difference is largest, the device probe, and which of the
learner's functions passed."""
import dataclasses
import math

import pytest
import torch
from torch import nn

import diffusion_checks as dc
import diffusion_utilities as du
from diffusion_checks import _core

pytestmark = pytest.mark.usefixtures("one_thread")


def fails_with(fn, *args, **kwargs) -> str:
    with pytest.raises(AssertionError) as err:
        fn(*args, **kwargs)
    return str(err.value)


# ── inputs left as they were ──


@dataclasses.dataclass
class Pair:
    first: torch.Tensor
    second: torch.Tensor


def test_call_pure_returns_the_result_when_no_input_changed():
    x = torch.arange(3.0)
    assert torch.equal(dc.call_pure(lambda x, k: x * k, x, 2, names=("x", "k")), 2 * x)


@pytest.mark.parametrize("fn, args, kwargs, names, name", [
    (lambda x, y: x.mul_(2), (torch.ones(2), torch.ones(2)), {}, ("x", "y"), "`x`"),
    (lambda x, y: y.add_(1), (torch.ones(2), torch.ones(2)), {}, ("x", "y"), "`y`"),
    (lambda x, *, eps: eps.clamp_(max=0), (torch.ones(2),), {"eps": torch.ones(2)}, ("x",),
     "`eps`"),
    (lambda x, y: x.unsqueeze_(0), (torch.ones(2), torch.ones(2)), {}, ("x", "y"), "`x`"),
    (lambda p: p.second.zero_(), (Pair(torch.ones(2), torch.ones(2)),), {}, ("p",),
     "`p.second`"),
    (lambda m: m.weight.data.fill_(0), (nn.Linear(2, 2),), {}, ("m",), "`m.weight`"),
    (lambda xs: xs[1].neg_(), ([torch.ones(1), torch.ones(1)],), {}, ("xs",), "`xs[1]`"),
], ids=["first", "second", "keyword", "shape", "dataclass_field", "module", "list_item"])
def test_call_pure_names_the_input_changed_in_place(fn, args, kwargs, names, name):
    message = fails_with(dc.call_pure, fn, *args, names=names, **kwargs)
    assert f"changed its input {name} in place" in message


def test_call_pure_names_positional_inputs_it_has_no_name_for():
    message = fails_with(dc.call_pure, lambda x, y: y.mul_(3), torch.ones(2), torch.ones(2),
                         names=("x",))
    assert "`argument 2`" in message


def test_a_nan_left_as_it_was_is_no_change():
    x = torch.tensor([1.0, math.nan])
    snap = dc.snapshot(x, "x")
    assert dc.changed(x, snap, "x") is None
    x[1] = 0.0
    assert dc.changed(x, snap, "x") == "x"


def test_call_turns_the_stub_into_not_attempted():
    def stub():
        raise NotImplementedError()
    with pytest.raises(_core._NotAttempted):
        dc.call(stub)


# ── what came back ──


def test_expect_tensor_names_what_is_missing_or_of_another_kind():
    assert "forget the `return`" in fails_with(dc.expect_tensor, None, shape=(2,))
    assert "stray comma" in fails_with(dc.expect_tensor, (torch.ones(2),), shape=(2,))
    assert "should be a torch.Tensor of shape (2,), got list" in fails_with(
        dc.expect_tensor, [1.0, 2.0], shape=(2,))
    assert "should have dtype torch.float32, got torch.float64" in fails_with(
        dc.expect_tensor, torch.ones(2, dtype=torch.float64), shape=(2,))


def test_the_broadcasting_hint_only_for_extra_elements():
    extra = fails_with(dc.expect_tensor, torch.ones(4, 4, 1, 1), shape=(4, 1, 1, 1))
    assert dc.BROADCAST_HINT in extra
    fewer = fails_with(dc.expect_tensor, torch.ones(4), shape=(4, 1, 1, 1))
    assert dc.BROADCAST_HINT not in fewer and "compare each step's shape" in fewer
    transposed = fails_with(dc.expect_tensor, torch.ones(8, 5), shape=(5, 8))
    assert dc.BROADCAST_HINT not in transposed


def test_a_shape_hint_replaces_the_default():
    message = fails_with(dc.expect_tensor, torch.ones(4, 4, 1, 1), shape=(4, 1, 1, 1),
                         shape_hint="one number per item")
    assert message.endswith("one number per item") and dc.BROADCAST_HINT not in message


@pytest.mark.parametrize("values, kind", [([1.0, math.nan, math.nan], "NaN"),
                                          ([1.0, 2.0, math.inf], "inf")])
def test_expect_finite_says_how_many_and_where(values, kind):
    message = fails_with(dc.expect_tensor, torch.tensor(values), shape=(3,), what="x")
    bad = sum(not math.isfinite(v) for v in values)
    first = next(i for i, v in enumerate(values) if not math.isfinite(v))
    assert f"x contains {kind} values ({bad} of 3, the first at index ({first},))" in message


def test_expect_float():
    assert dc.expect_float(0.5, what="loss") == 0.5
    assert ".item()" in fails_with(dc.expect_float, torch.tensor(0.5), what="loss")
    assert "diverged" in fails_with(dc.expect_float, math.nan, what="loss")
    assert "forget the `return`" in fails_with(dc.expect_float, None, what="loss")


def test_near_and_close_never_match_nan_or_inf():
    assert dc.near(1.0, 1.0 + 1e-7) and not dc.near(1.0, 1.1)
    assert not dc.near(math.nan, math.nan) and not dc.near(math.inf, math.inf)
    a = torch.tensor([1.0, math.nan])
    assert not dc.close(a, a.clone())
    assert not dc.close(torch.tensor([math.inf]), torch.tensor([math.inf]))
    assert dc.close(torch.ones(2), torch.ones(2) + 1e-7)
    assert not dc.close(torch.ones(2), torch.ones(3)) and not dc.close([1.0, 1.0], torch.ones(2))


def test_largest_difference_names_the_item():
    out, expected = torch.zeros(3, 2), torch.zeros(3, 2)
    out[2, 1] = 0.25
    assert dc.largest_difference(out, expected, item_names=["t = 0", "t = 5", "t = 30"]) == (
        "largest difference 0.25 at item 2 (t = 30)")
    assert dc.largest_difference(out, expected) == "largest difference 0.25 at index (2, 1)"
    assert dc.largest_difference(torch.tensor(1.0), torch.tensor(0.5)) == "largest difference 0.5"
    out[0, 0] = math.nan                               # a NaN is the largest difference of all
    assert "at item 0" in dc.largest_difference(out, expected, item_names=["a", "b", "c"])


def test_compare_names_a_known_mistake_or_says_where_and_which_term():
    x = torch.arange(4.0)
    dc.compare(2 * x, 2 * x, {}, what="y")
    assert "y is not right: one x too many" in fails_with(
        dc.compare, 3 * x, 2 * x, {"one x too many": 3 * x}, what="y")
    message = fails_with(dc.compare, 2 * x + torch.tensor([0, 0, 0.5, 0]), 2 * x,
                         {"one x too many": 3 * x}, what="y",
                         item_names=[f"t = {i}" for i in range(4)], term_hint="check 2 x")
    assert message == "y differs from the reference (largest difference 0.5 at item 2 (t = 2)); " \
                      "check 2 x"
    assert "term by term" in fails_with(dc.compare, x, 2 * x, {}, what="y")


def test_compare_never_matches_a_nan_to_a_mistake_with_nan():
    nan = torch.tensor([math.nan, 1.0])
    message = fails_with(dc.compare, nan, torch.ones(2), {"the NaN mistake": nan.clone()},
                         what="y")
    assert "differs from the reference" in message


# ── another device ──


def test_other_device_is_a_second_device():
    device = dc.other_device()
    assert device.type != "cpu"
    if not torch.cuda.is_available() and not torch.backends.mps.is_available():
        assert device.type == "meta"


def test_to_device_moves_tensors_modules_dataclasses_and_containers():
    device = dc.other_device()
    schedule = du.NoiseSchedule.create("cosine", 20)
    moved = dc.to_device({"x": [torch.ones(2), (torch.zeros(1), 3)], "s": schedule,
                          "m": nn.Linear(2, 2)}, device)
    assert moved["x"][0].device.type == device.type
    assert isinstance(moved["x"][1], tuple) and moved["x"][1][0].device.type == device.type
    assert moved["x"][1][1] == 3
    assert moved["s"].alpha_bars.device.type == device.type
    assert schedule.alpha_bars.device.type == "cpu"                      # a copy
    assert moved["m"].weight.device.type == device.type


def right_code(x):
    return x * torch.arange(x.shape[-1], device=x.device)


def cpu_arange(x):
    return x * torch.arange(x.shape[-1])


def test_the_probe_passes_code_that_follows_the_inputs_device():
    out = dc.probe_device(right_code, torch.ones(2, 3), what="f")
    assert out.device.type == dc.other_device().type


def test_the_probe_names_a_tensor_made_on_the_cpu():
    message = fails_with(dc.probe_device, cpu_arange, torch.ones(2, 3), what="f(x)")
    assert message.startswith("f(x): a tensor is created on the CPU inside your code")
    assert "PyTorch said" in message


def test_the_probe_names_a_result_on_the_cpu():
    message = fails_with(dc.probe_device, lambda x: torch.zeros(3), torch.ones(3), what="f(x)")
    assert "the result is on cpu although the inputs are on" in message


def test_a_cpu_scalar_tensor_is_allowed_as_on_a_gpu():
    assert dc.probe_device(lambda x: x / torch.tensor(2.0), torch.ones(3), what="f") is not None


@pytest.mark.parametrize("fn", [
    lambda x: x[x > 0] + 1,                            # a boolean mask: no kernel on `meta`
    lambda x: x.nonzero(),
    lambda x: (_ for _ in ()).throw(ValueError("a check of the inputs")),
], ids=["mask", "nonzero", "value_error"])
def test_the_probe_is_inconclusive_when_code_cannot_run_there(fn):
    if dc.other_device().type != "meta":
        pytest.skip("the inconclusive cases are those of the meta device")
    assert dc.probe_device(fn, torch.tensor([1.0, -1.0, 2.0]), what="f") is None


@pytest.mark.parametrize("fn", [
    lambda x: x * float(x.max()),                      # reads a value: 0 on `meta`
    lambda x: x * int(x.argmax().item()),
    lambda x: x.cpu().to(x.device) * 2,                # a round trip through the CPU
], ids=["float", "item", "round_trip"])
def test_on_meta_values_read_back_are_zeros_so_correct_code_runs_on(fn):
    if dc.other_device().type != "meta":
        pytest.skip("the meta device's stand-in values")
    out = dc.probe_device(fn, torch.tensor([1.0, -1.0, 2.0]), what="f")
    assert out is not None and out.device.type == "meta"


def test_code_that_reads_values_and_then_mixes_devices_is_still_caught():
    def mixes(x):
        n = int(x.argmax())                               # fine on a GPU, 0 on `meta`
        return x * torch.arange(3.0) + n                  # arange on the CPU: the mistake
    with pytest.raises(AssertionError, match="created on the CPU"):
        dc.probe_device(mixes, torch.tensor([1.0, -1.0, 2.0]), what="f")


def test_a_probe_that_cannot_run_on_meta_never_reads_as_not_attempted(capsys):
    """NotImplementedError on the probe device (no meta kernel) is not the stub's."""
    @dc.exercise_check("masked")
    def check_masked(fn):
        x = torch.tensor([1.0, -1.0, 2.0])
        out = dc.expect_tensor(dc.call(fn, x), shape=(), what="masked(x)")
        dc.compare(out, x[x > 0].sum(), {}, what="masked(x)")
        dc.probe_device(fn, x, what="masked(x)")
        return "the positive values summed"

    assert check_masked(lambda x: x[x > 0].sum()) is True
    assert dc.PASSED_MARK in capsys.readouterr().out


# ── what passed ──


@dc.exercise_check("double")
def check_double(fn):
    out = dc.expect_tensor(dc.call(fn, torch.arange(3.0)), shape=(3,), what="double(x)")
    dc.compare(out, 2 * torch.arange(3.0), {}, what="double(x)")
    return "right"


def test_a_function_that_passed_is_used_and_one_that_did_not_is_not(capsys):
    def mine(x):
        return x + x

    def wrong(x):
        return x

    def library(x):
        return 2 * x

    assert not dc.passed(mine)
    assert dc.yours_if_passed(mine, library, name="double") is library
    assert "using the library's du.double" in capsys.readouterr().out
    assert check_double(mine) is True
    assert dc.passed(mine)
    assert dc.yours_if_passed(mine, library, name="double") is mine
    assert "using your double" in capsys.readouterr().out
    with pytest.raises(AssertionError):
        check_double(wrong)
    assert not dc.passed(wrong)
    assert not dc.passed(torch.ones(1))           # not weakly referenceable: never passed
