"""The README is true: every Python example in it runs and its assertions hold.

Every block fenced ```` ```python ```` in README.md is a runnable example and is executed here.
Anything that is not a runnable example (shell sessions, output, snippets that need a GPU,
vLLM or a cluster) must be fenced with another tag: ``sh``, ``bash``, ``text``, ``json``,
``yaml``. The pages under docs/, the links and the documented CLI flags and settings are
checked in ``tests/test_docs.py``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.S | re.M)


def test_readme_has_python_examples() -> None:
    assert BLOCKS, "README.md lost its Python examples"


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_python_example_runs(code: str) -> None:
    exec(compile(code, str(README), "exec"), {"__name__": "readme_example"})
