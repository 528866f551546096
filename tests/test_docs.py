"""Every public docstring example runs (einops' habit): seeded, so the output is fixed."""

import doctest
import importlib
import re
import textwrap
from pathlib import Path

import pytest

MODULES = ["gumbelkit", "gumbelkit.noise", "gumbelkit.functional"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, extraglobs={"torch": importlib.import_module("torch")},
                             optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0


def test_public_surface():
    import gumbelkit as gk

    for name in gk.__all__:
        assert hasattr(gk, name), name
        obj = getattr(gk, name)
        if callable(obj):
            assert obj.__doc__ and "Example" in obj.__doc__, f"{name} lacks a docstring example"


# ----------------------------------------------------------------------------- pages

ROOT = Path(__file__).resolve().parents[1]
_BLOCK = re.compile(r"^```python[^\n]*\n(.*?)^```", re.DOTALL | re.MULTILINE)
ALL_PAGES = sorted(p.relative_to(ROOT).as_posix() for p in [ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
PAGES = [page for page in ALL_PAGES if _BLOCK.search((ROOT / page).read_text())]


def python_blocks(text: str) -> list[str]:
    """The ```python fenced blocks of a Markdown page, in order."""
    return [textwrap.dedent(block) for block in _BLOCK.findall(text)]


def test_pages_with_examples_are_found():
    for page in ("README.md", "docs/index.md", "docs/estimators.md", "docs/distributions/concrete.md"):
        assert page in PAGES, page


def test_python_blocks_are_found():
    page = "text\n```python\nx = 1\n```\n```bash\nls\n```\n```python\n>>> x + 1\n2\n```\n"
    assert python_blocks(page) == ["x = 1\n", ">>> x + 1\n2\n"]


@pytest.mark.parametrize("page", PAGES)
def test_page_examples_run(page, tmp_path, monkeypatch):
    """Every ```python block of every page runs as written, top to bottom in one namespace (a
    block of ``>>>`` lines is run as a doctest and its output compared), in a scratch directory."""
    blocks = python_blocks((ROOT / page).read_text())
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    parser, runner = doctest.DocTestParser(), doctest.DocTestRunner(
        optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    for i, block in enumerate(blocks):
        where = f"{page}, python block {i + 1}"
        if ">>>" in block:
            test = parser.get_doctest(block, namespace, where, page, 0)
            result = runner.run(test, clear_globs=False)
            namespace.update(test.globs)  # DocTest runs in a copy: keep its names for the next block
            assert result.failed == 0, f"{where}: {result.failed} doctest example(s) failed"
        else:
            exec(compile(block, where, "exec"), namespace)
