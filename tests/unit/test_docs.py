"""The docs teach the code as it is: every ```python block of README.md and docs/*.md runs here.

Each page's blocks run in order in one namespace (a page is one script, split by prose), with the
repository root as the working directory and the Hub unreachable (``HF_HUB_OFFLINE=1``, from
``tests/conftest.py``). A failing block fails that page's test, naming the page, the block
number and the Markdown line; the traceback's line numbers are the Markdown file's own.

Blocks that are not meant to run are fenced ```text, ```bash or ```yaml. Pages are collected
by glob, so a new page (docs/writing-plugins.md included) is tested as soon as it exists.

Also checked: the required pages exist and docs/README.md links each of them, relative links
resolve, and Mermaid blocks start with a diagram type.
"""

from __future__ import annotations

import os
import re
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"

#: The pages the docs must have.
REQUIRED = (
    "README.md",
    "writing-plugins.md",
    "overview.md",
    "vision-towers.md",
    "connector.md",
    "hidden-align.md",
    "packer.md",
    "backbone-and-generation.md",
    "spec-and-config.md",
    "plugins.md",
    "processor.md",
    "speed.md",
    "limits.md",
    "families.md",
)

MERMAID_TYPES = ("flowchart", "graph", "sequenceDiagram", "classDiagram", "stateDiagram")


@dataclass(frozen=True)
class Block:
    """One fenced code block: its language, first code line (1-based) and source."""

    lang: str
    line: int
    code: str


def pages() -> list[Path]:
    """README.md and every docs/*.md, in a stable order."""
    return [REPO / "README.md", *sorted(DOCS.glob("*.md"))]


def blocks(path: Path) -> list[Block]:
    """The fenced blocks of a Markdown file (``` fences, optionally indented; no nesting)."""
    out: list[Block] = []
    lang = None
    start = 0
    body: list[str] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        stripped = line.strip()
        if lang is None:
            if stripped.startswith("```"):
                lang = stripped[3:].strip().split(" ")[0].lower() or "plain"
                start, body = number + 1, []
                indent = len(line) - len(line.lstrip())
        elif stripped.startswith("```"):
            out.append(Block(lang, start, "\n".join(body)))
            lang = None
        else:
            body.append(line[indent:] if line[:indent].strip() == "" else line)
    assert lang is None, f"{path.relative_to(REPO)}: a ``` fence opened at line {start - 1} is never closed"
    return out


def _page_id(path: Path) -> str:
    return str(path.relative_to(REPO))


@pytest.fixture
def clean_plugins():
    """Unregister plugins a page registered at runtime, so pages do not see each other's parts."""
    from vlmkit import plugins

    before = {name for name, dist in plugins.plugin_sources().items() if dist == "<runtime>"}
    before &= {name for name, _ in plugins.get_plugin_manager().list_name_plugin()}
    yield
    pm = plugins.get_plugin_manager()
    for name, dist in plugins.plugin_sources().items():
        if dist == "<runtime>" and name not in before and pm.get_plugin(name) is not None:
            plugins.unregister_plugin(name)


@pytest.mark.parametrize("page", pages(), ids=_page_id)
def test_python_blocks_run(page: Path, monkeypatch, clean_plugins, tmp_path) -> None:
    """Every ```python block of ``page`` runs, in order, in one namespace."""
    if not page.exists():
        pytest.skip(f"{_page_id(page)} does not exist")
    # README.md promises its snippets run from any working directory; the docs pages run from the clone
    monkeypatch.chdir(tmp_path if page.name == "README.md" and page.parent == REPO else REPO)
    namespace: dict = {"__name__": f"docs_{page.stem.replace('-', '_')}"}
    python = [b for b in blocks(page) if b.lang in ("python", "py", "python3")]
    for number, block in enumerate(python, start=1):
        # Pad with newlines so tracebacks report the Markdown file's line numbers.
        code = compile("\n" * (block.line - 1) + block.code, str(page), "exec")
        try:
            exec(code, namespace)  # noqa: S102 - the docs are this repository's own code
        except BaseException:  # noqa: BLE001 - report every failure with its place
            pytest.fail(
                f"{_page_id(page)}: python block {number} (line {block.line}) failed:\n{traceback.format_exc()}",
                pytrace=False,
            )


def test_required_pages_exist_and_are_indexed() -> None:
    missing = [name for name in REQUIRED if not (DOCS / name).is_file()]
    assert not missing, f"docs pages missing: {missing}"
    index = (DOCS / "README.md").read_text(encoding="utf-8")
    unlinked = [name for name in REQUIRED[1:] if f"({name}" not in index]
    assert not unlinked, f"docs/README.md does not link: {unlinked}"


_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _prose_lines(path: Path):
    """``(line number, line)`` outside fenced blocks."""
    inside = False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip().startswith("```"):
            inside = not inside
            continue
        if not inside:
            yield number, line


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors of a Markdown file (lower case, punctuation dropped, spaces to -)."""
    out = set()
    for _, line in _prose_lines(path):
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            text = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower())
            out.add(text.replace(" ", "-"))
    return out


def test_relative_links_resolve() -> None:
    """Relative links point at existing files, and #anchors at existing headings."""
    broken = []
    for page in pages():
        for number, line in _prose_lines(page):
            for target in _LINK.findall(line):
                if re.match(r"^[a-z]+:", target):
                    continue
                file, _, anchor = target.partition("#")
                path = (page.parent / file).resolve() if file else page
                where = f"{_page_id(page)}:{number} -> {target}"
                if not path.exists():
                    broken.append(where)
                elif anchor and path.suffix == ".md" and anchor not in anchors(path):
                    broken.append(where + " (no such heading)")
    assert not broken, "broken relative links:\n" + "\n".join(broken)


def test_mermaid_blocks_name_a_diagram_type() -> None:
    bad = []
    for page in pages():
        for block in blocks(page):
            if block.lang == "mermaid":
                first = block.code.strip().split(None, 1)[0] if block.code.strip() else ""
                if first not in MERMAID_TYPES:
                    bad.append(f"{_page_id(page)}:{block.line} starts with {first!r}")
    assert not bad, "\n".join(bad)


def test_readme_keeps_the_two_commands() -> None:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## The two commands", 1)[1].split("\n## ", 1)[0]
    main_job = ("bash scripts/setup && .venv/bin/python -m vlmkit.recipes.smollm2 smolvlm-256m-smollm2 && "
                '.venv/bin/vlmkit generate smolvlm-256m-smollm2 -p "What is the capital of France?" && '
                ".venv/bin/python -m vlmkit.recipes.digits data/digits && .venv/bin/vlmkit train examples/train-digits-tiny.yaml && "
                '.venv/bin/vlmkit generate runs/digits-tiny --image data/digits/img/1700.png -p "What digit is this?"')
    assert main_job in section  # tests/e2e/test_generate_real.py checks that answer on the same folder
    assert ".venv/bin/python -m pytest" in section


def test_block_parser() -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / "p.md"
        page.write_text("x\n```python\na = 1\n```\n\n```text\nno\n```\n  ```python\n  b = 2\n  ```\n", encoding="utf-8")
        found = blocks(page)
    assert [(b.lang, b.line, b.code) for b in found] == [("python", 3, "a = 1"), ("text", 7, "no"), ("python", 10, "b = 2")]
    assert os.path.isdir(DOCS)
