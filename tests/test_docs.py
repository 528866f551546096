"""Every public docstring example runs (einops' habit): seeded, so the output is fixed."""

import doctest
import importlib

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
