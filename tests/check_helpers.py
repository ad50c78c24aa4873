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
