"""Packaging: the sdist carries what it takes to run the tests, the wheel carries the package.

Builds the sdist and, from it, the wheel with ``python -m build`` (without build isolation when
this environment has setuptools >= 77, else in an isolated environment, which needs PyPI), then
checks their file lists and runs a few of the sdist's own tests from the unpacked sdist.
Installing each into a fresh virtual environment is the manual check described in the README.
"""

import importlib.util
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _setuptools_new_enough() -> bool:
    try:
        import setuptools
    except ImportError:
        return False
    return int(setuptools.__version__.split(".")[0]) >= 77


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    if importlib.util.find_spec("build") is None:
        pytest.skip("the `build` package is not installed (pip install -e '.[test]')")
    out = tmp_path_factory.mktemp("dist")
    cmd = [sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)]
    if _setuptools_new_enough():
        cmd.insert(3, "--no-isolation")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (sdist,) = out.glob("gumbelkit-*.tar.gz")
    (wheel,) = out.glob("gumbelkit-*.whl")
    return sdist, wheel


def test_sdist_holds_the_tests_and_the_license(dists):
    sdist, _ = dists
    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    needed = {"LICENSE", "README.md", "pyproject.toml", "MANIFEST.in", "Makefile", "mkdocs.yml",
              "requirements-dev.txt", "src/gumbelkit/py.typed", "src/gumbelkit/__init__.py",
              "src/gumbelkit/cli.py", "tests/conftest.py", "tests/reference.py", "docs/index.md",
              "tools/griffe_examples.py"}
    needed |= {p.relative_to(ROOT).as_posix() for p in (ROOT / "tests").glob("*.py")}
    needed |= {p.relative_to(ROOT).as_posix() for p in (ROOT / "benchmarks").glob("*.py")}
    assert needed <= names, sorted(needed - names)
    assert not [n for n in names if n.endswith((".pt", ".pyc")) or "__pycache__" in n]


def test_wheel_holds_the_package_only(dists):
    _, wheel = dists
    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
        entry_points = next(whl.read(n).decode() for n in names if n.endswith("entry_points.txt"))
        metadata = next(whl.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
    assert "gumbelkit/py.typed" in names and "gumbelkit/cli.py" in names
    assert any(n.endswith("licenses/LICENSE") for n in names)
    assert not [n for n in names if n.startswith(("tests/", "docs/", "benchmarks/"))]
    assert "gumbelkit = gumbelkit.cli:main" in entry_points
    assert "License-Expression: MIT" in metadata
    assert "Provides-Extra: demo" in metadata and "Provides-Extra: docs" in metadata


def test_unpacked_sdist_runs_its_own_tests(dists, tmp_path):
    sdist, _ = dists
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp_path, filter="data")
    (root,) = tmp_path.iterdir()
    # conftest.py (hypothesis profile) and reference.py (test_noise imports it) must be there
    cmd = [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider",
           "tests/test_noise.py", "tests/test_docs.py::test_python_blocks_are_found"]
    env = {"PYTHONPATH": str(root / "src"), "PATH": "/usr/bin:/bin", "HYPOTHESIS_PROFILE": "ci"}
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert " passed" in proc.stdout and "error" not in proc.stdout.lower().split("passed")[-1]
    # the tests ran against the unpacked copy, not this checkout
    check = subprocess.run([sys.executable, "-c", "import gumbelkit; print(gumbelkit.__file__)"],
                           cwd=root, capture_output=True, text=True, env=env, timeout=120)
    assert check.stdout.strip().startswith(str(root))
