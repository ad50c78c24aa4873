"""What the tests of the exercise checks share: a stub like the one in an exercise notebook,
and assertions on what a check says."""
import pytest

import diffusion_checks as dc

# Phrases of the checks' hints that the tests look for
GENERIC = "differs from the reference"
IN_PLACE = "in place (an in-place operation"
DEVICE = "is created on the CPU inside your code"
NAN = "contains NaN values"


def stub(*args, **kwargs):
    """The exercise notebook's blank: ``raise NotImplementedError()``."""
    raise NotImplementedError()


def assert_passes(check, fn, capsys):
    assert check(fn) is True
    assert dc.PASSED_MARK in capsys.readouterr().out


def assert_not_attempted(check, capsys):
    assert check(stub) is False
    assert dc.NOT_ATTEMPTED_MARK in capsys.readouterr().out


def assert_fails_with(check, fn, hint):
    with pytest.raises(AssertionError) as err:
        check(fn)
    assert hint in str(err.value), str(err.value)


def cases(table, width=None):
    """``pytest.param`` rows of a table {check name: [(case id, *values), ...]}, each with the
    id "<check name>-<case id>"; with ``width``, only the rows of that many items."""
    return [pytest.param(name, *row[1:], id=f"{name}-{row[0]}")
            for name, rows in table.items() for row in rows if width is None or len(row) == width]


def table_tests(checks, right, mistakes):
    """The four table-driven tests of a lesson's checks, to assign at a test module's top level:
    ``checks`` {name: (check, reference, ...)}, ``right`` and ``mistakes`` {name: [(case id,
    fn[, hint]), ...]}. The reference passes and is remembered as passed; the stub is "not
    attempted"; each right version in another form passes; each planted mistake fails with its
    hint (and never with the broadcasting hint, which would mislead)."""

    @pytest.mark.parametrize("name", checks)
    def test_reference_passes(name, capsys):
        check, reference = checks[name][:2]
        assert_passes(check, reference, capsys)
        assert dc.passed(reference)

    @pytest.mark.parametrize("name", checks)
    def test_stub_is_not_attempted(name, capsys):
        assert_not_attempted(checks[name][0], capsys)

    @pytest.mark.parametrize("name, fn", cases(right))
    def test_right_versions_in_other_forms_pass(name, fn, capsys):
        assert_passes(checks[name][0], fn, capsys)

    @pytest.mark.parametrize("name, fn, hint", cases(mistakes))
    def test_planted_mistakes_fail_with_their_hint(name, fn, hint):
        with pytest.raises(AssertionError) as err:
            checks[name][0](fn)
        assert hint in str(err.value), str(err.value)
        assert dc.BROADCAST_HINT not in str(err.value)

    return (test_reference_passes, test_stub_is_not_attempted,
            test_right_versions_in_other_forms_pass, test_planted_mistakes_fail_with_their_hint)
