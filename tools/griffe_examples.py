"""A griffe extension for the API reference (mkdocs.yml): read ``Example:`` as ``Examples:``.

gumbelkit's docstrings use the Google style with an ``Example:`` section of doctests. griffe
reads ``Example:`` as an admonition of prose, so the doctest output (``[1.0, 1.0]``) is taken
for Markdown link references; ``Examples:`` is read as code. This renames the section title
while the docstrings are loaded, leaving the source as it is.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)


class ExampleSections(griffe.Extension):
    """Rename ``Example:`` section titles to ``Examples:`` in every docstring."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _EXAMPLE.sub(r"\1Examples:", obj.docstring.value)
