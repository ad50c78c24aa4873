"""Execute a notebook in a fresh kernel of the *current* Python environment.

Used by the tests (exercise notebooks must only raise NotImplementedError) and by the
course's command-line tools.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import ipykernel.kernelspec
import nbformat
from jupyter_client.kernelspec import KernelSpecManager
from nbclient import NotebookClient

CURRENT_ENV_KERNEL = "course-current-env"


class _CurrentEnvKernelSpecs(KernelSpecManager):
    """Resolve :data:`CURRENT_ENV_KERNEL` to an IPython kernel running ``sys.executable``."""

    def get_kernel_spec(self, kernel_name):
        if kernel_name == CURRENT_ENV_KERNEL:
            spec = ipykernel.kernelspec.get_kernel_dict()
            spec["argv"][0] = sys.executable
            return self.kernel_spec_class(resource_dir=ipykernel.kernelspec.RESOURCES, **spec)
        return super().get_kernel_spec(kernel_name)


@dataclass
class CellError:
    """An error raised by one code cell."""

    cell_index: int
    ename: str
    evalue: str


class CurrentEnvClient(NotebookClient):
    """A notebook client whose kernel runs this process's Python (and is shut down after)."""

    def create_kernel_manager(self):
        self.km = self.kernel_manager_class(
            kernel_name=CURRENT_ENV_KERNEL, kernel_spec_manager=_CurrentEnvKernelSpecs(),
            config=self.config)
        return self.km


def run_notebook(path: str | Path, *, cell_timeout: int = 600, allow_errors: bool = True):
    """Execute the notebook at ``path`` (working directory: its folder) and return it executed.

    With ``allow_errors`` every cell runs even after an error, as a learner clicking
    "run all" and then reading the errors would see.
    """
    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    client = CurrentEnvClient(nb, timeout=cell_timeout, allow_errors=allow_errors,
                              resources={"metadata": {"path": str(path.parent.resolve())}})
    client.execute()
    return nb


def cell_errors(nb) -> list[CellError]:
    """The errors in an executed notebook's outputs, in cell order."""
    found = []
    for index, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []) if cell.cell_type == "code" else []:
            if out.get("output_type") == "error":
                found.append(CellError(index, out.get("ename", ""), out.get("evalue", "")))
    return found


def cell_text(cell) -> str:
    """Everything a code cell printed (streams and plain-text results)."""
    parts = []
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream":
            parts.append(out.get("text", ""))
        elif out.get("output_type") in ("execute_result", "display_data"):
            parts.append(out.get("data", {}).get("text/plain", ""))
    return "".join(parts)
