"""Test-suite settings shared by the library tests and the notebook runs."""
import os
from pathlib import Path

# The smallest run size unless the caller chose another; notebook kernels inherit it.
os.environ.setdefault("COURSE_SCALE", "ci")
os.environ.setdefault("MPLBACKEND", "Agg")
# Notebook kernels import the library from this checkout, whatever else is installed.
_root = str(Path(__file__).resolve().parent)
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_root, os.environ.get("PYTHONPATH")) if p)
