"""The docs are true: examples run, links resolve, and the CLI flags and settings they name exist.

* Every block fenced ```` ```python ```` in ``docs/*.md`` is a runnable example: it is executed
  here and its assertions must hold (README.md's blocks run in ``tests/test_readme.py``).
  Anything that is not a runnable example (shell sessions, output, snippets that need a GPU,
  vLLM or a cluster) must be fenced with another tag: ``sh``, ``bash``, ``text``, ``json``,
  ``yaml``.
* Every relative link and image in README.md and ``docs/*.md`` points to an existing file,
  and a ``#anchor`` into a markdown file names one of its headings (GitHub's slugs).
* Every ``docs/...`` path the code mentions exists.
* Every flag of ``kvindex serve|extproc|simulate`` is documented, and every ``kvindex <command>
  --flag`` written in the docs is a real flag of that command.
* Every setting of the service and of the picker appears in docs/configuration.md.
* Every table has body rows, each with as many cells as its header.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import BaseModel

from kvindex_service.config import Settings
from kvindex_service.extproc import ExtprocConfig

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
PAGES = sorted(DOCS.glob("*.md"))
MARKDOWN = [README, *PAGES]
REQUIRED_PAGES = {
    "service.md",
    "configuration.md",
    "extproc.md",
    "simulator.md",
    "performance.md",
    "operations.md",
    "development.md",
}
COMMANDS = ("serve", "extproc", "simulate")

_FENCE = re.compile(r"^(`{3,}|~{3,})\s*([\w+-]*)")
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_INLINE_CODE = re.compile(r"(`+)(.+?)\1")
_FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def split_fences(text: str) -> tuple[list[tuple[str, str]], str]:
    """The fenced blocks of a markdown text as (tag, body), and the text outside them."""
    blocks: list[tuple[str, str]] = []
    prose: list[str] = []
    fence: str | None = None
    tag = ""
    body: list[str] = []
    for line in text.splitlines():
        if fence is None:
            m = _FENCE.match(line)
            if m:
                fence, tag, body = m.group(1), m.group(2), []
            else:
                prose.append(line)
        elif line.strip() == fence:
            blocks.append((tag, "\n".join(body) + "\n"))
            fence = None
        else:
            body.append(line)
    assert fence is None, "unclosed code fence"
    return blocks, "\n".join(prose)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    _, prose = split_fences(path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    out: set[str] = set()
    for line in prose.splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def python_examples() -> Iterator[tuple[str, str]]:
    for page in PAGES:
        blocks, _ = split_fences(page.read_text(encoding="utf-8"))
        python = [body for tag, body in blocks if tag == "python"]
        for i, body in enumerate(python):
            yield f"{page.name}:{i}", body


EXAMPLES = dict(python_examples())


def relative_links() -> Iterator[tuple[Path, str]]:
    for path in MARKDOWN:
        _, prose = split_fences(path.read_text(encoding="utf-8"))
        prose = _INLINE_CODE.sub("", prose)
        for target in _LINK.findall(prose):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            yield path, target


LINKS = list(relative_links())


def test_required_pages_exist() -> None:
    missing = REQUIRED_PAGES - {p.name for p in PAGES}
    assert not missing, f"docs pages missing: {sorted(missing)}"


def test_readme_is_a_front_door() -> None:
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 400
    for page in REQUIRED_PAGES:
        assert f"(docs/{page}" in text, f"README.md does not link docs/{page}"


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_docs_python_example_runs(name: str) -> None:
    code = compile(EXAMPLES[name], str(DOCS / name.split(":")[0]), "exec")
    exec(code, {"__name__": "docs_example"})


def test_links_found() -> None:
    assert len(LINKS) > 20


@pytest.mark.parametrize(("source", "target"), LINKS, ids=[f"{p.name}->{t}" for p, t in LINKS])
def test_relative_link_resolves(source: Path, target: str) -> None:
    path_part, _, anchor = target.partition("#")
    dest = (source.parent / path_part).resolve() if path_part else source
    assert dest.exists(), f"{source.name}: link to missing {target}"
    if anchor and dest.suffix == ".md":
        assert anchor in anchors(dest), f"{source.name}: no heading for #{anchor} in {dest.name}"


def test_docs_paths_named_in_code_exist() -> None:
    named: set[str] = set()
    for folder in ("kvindex_service", "rust", "benches"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in {".py", ".rs", ".pyi"} and "out" not in path.parts:
                named.update(re.findall(r"\bdocs/[\w./-]*\w", path.read_text(encoding="utf-8")))
    named.update(re.findall(r"\bdocs/[\w./-]*\w", (ROOT / "Makefile").read_text(encoding="utf-8")))
    assert "docs/extproc.md" in named  # the grep itself still finds what it should
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, f"the code refers to missing docs: {missing}"


def _help_flags(command: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-m", "kvindex_service", command, "--help"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        cwd=ROOT,
    ).stdout
    return set(_FLAG.findall(out)) - {"--help"}


@pytest.fixture(scope="module")
def help_flags() -> dict[str, set[str]]:
    return {command: _help_flags(command) for command in COMMANDS}


def _documented_commands() -> Iterator[tuple[str, str]]:
    """(command, rest of the line) for every `kvindex <command> ...` in code blocks and inline
    code of the README and the docs (shell continuation lines joined)."""
    for path in MARKDOWN:
        blocks, prose = split_fences(path.read_text(encoding="utf-8"))
        chunks = [body.replace("\\\n", " ") for _, body in blocks]
        chunks += [m.group(2) for m in _INLINE_CODE.finditer(prose)]
        for chunk in chunks:
            for line in chunk.splitlines():
                for m in re.finditer(r"\bkvindex (serve|extproc|simulate)\b(.*)", line):
                    yield m.group(1), m.group(2)


def test_every_flag_is_documented(help_flags: dict[str, set[str]]) -> None:
    text = "\n".join(p.read_text(encoding="utf-8") for p in MARKDOWN)
    for command, flags in help_flags.items():
        assert flags, f"kvindex {command} --help lists no flags"
        missing = sorted(f for f in flags if not re.search(re.escape(f) + r"(?![\w-])", text))
        assert not missing, f"kvindex {command}: flags not in the docs: {missing}"


def test_documented_flags_exist(help_flags: dict[str, set[str]]) -> None:
    uses = list(_documented_commands())
    assert len(uses) > 5
    wrong = sorted(
        {(command, flag) for command, rest in uses for flag in _FLAG.findall(rest) if flag not in help_flags[command]}
    )
    assert not wrong, f"flags in the docs that the CLI does not have: {wrong}"


def _fields(model: type[BaseModel], prefix: str = "") -> Iterator[str]:
    for name, field in model.model_fields.items():
        key = field.alias or name
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from _fields(annotation, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def test_every_setting_is_documented() -> None:
    text = (DOCS / "configuration.md").read_text(encoding="utf-8")
    missing = []
    for key in [*_fields(Settings), *_fields(ExtprocConfig)]:
        section, _, leaf = key.rpartition(".")
        # table rows name a setting in full (`index.max_keys`) or after a slash (`/ max_pods_per_key`)
        if f"`{key}`" not in text and not (section and f"`{section}." in text and f"`{leaf}`" in text):
            missing.append(key)
    assert not missing, f"settings missing from docs/configuration.md: {missing}"


def _cells(row: str) -> int:
    return len(_INLINE_CODE.sub("code", row).strip().strip("|").split("|"))


@pytest.mark.parametrize("path", MARKDOWN, ids=[p.name for p in MARKDOWN])
def test_tables_are_well_formed(path: Path) -> None:
    _, prose = split_fences(path.read_text(encoding="utf-8"))
    lines = prose.splitlines()
    for i, line in enumerate(lines):
        if not re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", line.strip()):
            continue
        header = _cells(lines[i - 1])
        body = []
        for row in lines[i + 1 :]:
            if not row.startswith("|"):
                break
            body.append(row)
        assert body, f"{path.name}: table without rows under {lines[i - 1]!r}"
        for row in body:
            assert _cells(row) == header, f"{path.name}: {row!r} has {_cells(row)} cells, header {header}"
