"""The machinery every exercise check is built on."""
import pytest
import torch

from diffusion_checks import (NOT_ATTEMPTED_MARK, PASSED_MARK, call, compare, exercise_check,
                              expect_tensor)


@exercise_check("double")
def check_double(fn):
    x = torch.arange(4.0)
    out = expect_tensor(call(fn, x), shape=(4,), what="double(x)")
    compare(out, 2 * x, {"you added x to itself once too often": 3 * x}, what="double(x)")
    return "4 values match"


def test_pass_prints_mark_and_returns_true(capsys):
    assert check_double(lambda x: x * 2) is True
    assert capsys.readouterr().out.startswith(f"{PASSED_MARK} double: 4 values match")


def test_stub_is_not_attempted(capsys):
    def stub(x):
        raise NotImplementedError()
    assert check_double(stub) is False
    assert capsys.readouterr().out.startswith(f"{NOT_ATTEMPTED_MARK} double: not attempted yet")


@pytest.mark.parametrize("fn, hint", [
    (lambda x: None, "did you forget the `return`"),
    (lambda x: (2 * x,), "stray comma"),
    (lambda x: (2 * x).tolist(), "should be a torch.Tensor"),
    (lambda x: (2 * x)[None], "should have shape (4,), got (1, 4)"),
    (lambda x: (2 * x).double(), "should have dtype torch.float32"),
    (lambda x: x / 0, "contains NaN values"),
    (lambda x: 3 * x, "you added x to itself once too often"),
    (lambda x: 2 * x + 1, "largest difference 1"),
])
def test_mistakes_fail_with_a_hint_naming_the_exercise(fn, hint):
    with pytest.raises(AssertionError) as err:
        check_double(fn)
    assert str(err.value).startswith("double: ")
    assert hint in str(err.value)


def test_learner_errors_other_than_the_stub_propagate():
    with pytest.raises(ZeroDivisionError):
        check_double(lambda x: 1 / 0)


def test_passing_something_not_callable_is_a_type_error():
    with pytest.raises(TypeError, match=r"expects your function or class itself \(double\)"):
        check_double(torch.ones(3))


def test_yours_if_passed_uses_the_learners_version_only_after_it_passed(capsys):
    from diffusion_checks import passed, yours_if_passed

    def library(x):
        return x * 2

    def mine(x):
        return x + x

    assert not passed(mine)
    assert yours_if_passed(mine, library) is library
    assert "using the library's du.library" in capsys.readouterr().out
    check_double(mine)
    assert passed(mine)
    assert yours_if_passed(mine, library, name="double") is mine
    assert "using your double" in capsys.readouterr().out

    def changed_since(x):  # redefined after the check: not the object that passed
        return x + x
    assert yours_if_passed(changed_since, library) is library


def test_a_failed_or_stubbed_check_is_not_remembered(capsys):
    from diffusion_checks import passed

    def wrong(x):
        return 3 * x

    def stub(x):
        raise NotImplementedError()
    with pytest.raises(AssertionError):
        check_double(wrong)
    check_double(stub)
    assert not passed(wrong) and not passed(stub)


def test_check_functions_carry_their_exercise_name():
    assert check_double.exercise == "double"
