"""The exercise generator: markers become stubs, outputs go, errors are clear, bytes are stable."""
import nbformat
import pytest

from tools.make_exercises import MarkerError, exercise_bytes, make_exercise, strip_solutions

SOLVED = """def f(x):
    \"\"\"Double x.\"\"\"
    ### BEGIN SOLUTION
    y = 2 * x
    return y
    ### END SOLUTION
"""


def test_region_becomes_stub_at_its_indentation():
    assert strip_solutions(SOLVED) == (
        'def f(x):\n    """Double x."""\n    # YOUR CODE HERE\n    raise NotImplementedError()'
    )


def test_two_regions_and_top_level_region():
    src = "### BEGIN SOLUTION\na = 1\n### END SOLUTION\nprint(a)\n  ### BEGIN SOLUTION\n  b\n  ### END SOLUTION"
    assert strip_solutions(src) == (
        "# YOUR CODE HERE\nraise NotImplementedError()\nprint(a)\n  # YOUR CODE HERE\n  raise NotImplementedError()"
    )


def test_markdown_region_becomes_answer_placeholder():
    assert strip_solutions("Why?\n### BEGIN SOLUTION\nBecause.\n### END SOLUTION", cell_type="markdown") == (
        "Why?\n_YOUR ANSWER HERE_"
    )


@pytest.mark.parametrize("source, message", [
    ("### BEGIN SOLUTION\n### BEGIN SOLUTION\nx\n### END SOLUTION\n### END SOLUTION", "nested"),
    ("### BEGIN SOLUTION\nx = 1", "never closed"),
    ("x = 1\n### END SOLUTION", "without a"),
])
def test_bad_markers_raise(source, message):
    with pytest.raises(MarkerError, match=message):
        strip_solutions(source, where="cell 3")


def _solution_notebook(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python", "version": "3.11.7"}
    code = nbformat.v4.new_code_cell(SOLVED, execution_count=3)
    code.outputs = [nbformat.v4.new_output("stream", text="hello\n")]
    code.metadata["execution"] = {"iopub.execute_input": "2026-01-01"}
    code.metadata["tags"] = ["exercise"]
    nb.cells = [nbformat.v4.new_markdown_cell("# Title"), code,
                nbformat.v4.new_code_cell("check(f)", execution_count=4)]
    path = tmp_path / "01_demo.ipynb"
    nbformat.write(nb, path)
    return path


def test_outputs_and_volatile_metadata_are_cleared(tmp_path):
    path = _solution_notebook(tmp_path)
    exercise = make_exercise(nbformat.read(path, as_version=4))
    for cell in exercise.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None
    assert exercise.cells[1].metadata == {"tags": ["exercise"]}
    assert exercise.metadata["language_info"] == {"name": "python"}
    assert "raise NotImplementedError()" in exercise.cells[1].source
    assert "2 * x" not in exercise.cells[1].source
    nbformat.validate(exercise)


def test_generation_is_byte_stable_and_idempotent(tmp_path):
    path = _solution_notebook(tmp_path)
    first = exercise_bytes(path)
    assert exercise_bytes(path) == first
    # The generated notebook is a fixed point: generating from it changes nothing.
    generated = nbformat.reads(first.decode(), as_version=4)
    assert (nbformat.writes(make_exercise(generated)) + "\n").encode() == first


def test_solution_without_exercise_is_rejected(tmp_path):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1")])
    path = tmp_path / "03_none.ipynb"
    nbformat.write(nb, path)
    with pytest.raises(MarkerError, match="03_none.ipynb"):
        exercise_bytes(path)
