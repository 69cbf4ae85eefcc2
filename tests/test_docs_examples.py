"""Every ```python block in docs/ runs.

The blocks of one page run in order, in one fresh Python process and one namespace, as a reader
would paste them, in a temporary working directory. A traceback names the Markdown file and line.
A block that cannot run here (a cluster, CUDA, several processes, a feature that is still being
built) is marked by a comment on the line before its fence:

    <!-- no-test: the reason -->

Each such block is reported as a skipped test with its reason, and their number is pinned below,
so an exemption is always a visible, deliberate change. Shell blocks (```bash) are commands, not
examples, and are not run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
TESTS = Path(__file__).resolve().parent

#: How many python blocks in docs/ are marked no-test. Change it together with the markers.
EXPECTED_EXEMPTIONS = 3

_FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>[\w+-]*)")
_NO_TEST = re.compile(r"^\s*<!--\s*no-test:\s*(?P<reason>.*?)\s*-->\s*$")

# What the harness runs before a page's blocks. PyPI's torchvision (which timm brings, and which
# transformers and Lightning then import) needs tests/_torchvision_compat.py beside the CPU build
# of torch; the examples themselves are what a user with a matching torchvision writes.
_PRELUDE = f"""
import sys
sys.path.insert(0, {str(TESTS)!r})
from _torchvision_compat import import_torchvision
import_torchvision()
"""


@dataclass(frozen=True)
class Block:
    page: str  # relative to the repository root
    line: int  # 1-based line of the first code line
    code: str
    exempt_reason: str | None


def blocks(path: Path) -> list[Block]:
    """The python blocks of one Markdown file."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found: list[Block] = []
    index = 0
    while index < len(lines):
        opening = _FENCE.match(lines[index])
        if not opening or not opening["lang"]:
            index += 1
            continue
        indent, lang = opening["indent"], opening["lang"]
        start = index + 1
        end = start
        while end < len(lines) and not lines[end].strip().startswith("```"):
            end += 1
        if end == len(lines):
            raise AssertionError(f"{path}:{index + 1}: code fence is never closed")
        if lang == "python":
            previous = next((lines[i] for i in range(index - 1, -1, -1) if lines[i].strip()), "")
            marker = _NO_TEST.match(previous)
            if marker and not marker["reason"]:
                raise AssertionError(f"{path}:{index}: a no-test marker needs a reason")
            code = "\n".join(line[len(indent) :] for line in lines[start:end])
            found.append(
                Block(
                    page=str(path.relative_to(ROOT)),
                    line=start + 1,
                    code=code,
                    exempt_reason=marker["reason"] if marker else None,
                )
            )
        index = end + 1
    return found


def all_blocks() -> list[Block]:
    return [block for page in sorted(DOCS.rglob("*.md")) for block in blocks(page)]


def pages_with_examples() -> list[str]:
    return sorted({b.page for b in all_blocks() if b.exempt_reason is None})


def script_for(page: str) -> str:
    """A program that runs the page's blocks in order; each block is compiled with the
    Markdown file name and padded to its line number, so tracebacks point into the page."""
    parts = [_PRELUDE, "namespace = {'__name__': '__main__'}"]
    for block in all_blocks():
        if block.page == page and block.exempt_reason is None:
            source = "\n" * (block.line - 1) + block.code
            parts.append(f"exec(compile({source!r}, {block.page!r}, 'exec'), namespace)")
    return "\n".join(parts) + "\n"


@pytest.mark.parametrize("page", pages_with_examples())
def test_page_examples_run(page, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    env.setdefault("KERAS_BACKEND", "torch")
    script = tmp_path / "examples.py"
    script.write_text(script_for(page), encoding="utf-8")
    result = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"examples of {page} failed:\n{result.stderr[-6000:]}"


@pytest.mark.parametrize(
    "block",
    [b for b in all_blocks() if b.exempt_reason is not None],
    ids=lambda b: f"{b.page}:{b.line}",
)
def test_exempt_example(block):
    pytest.skip(f"{block.page}:{block.line} is not run: {block.exempt_reason}")


def test_exemptions_are_counted():
    exempt = [f"{b.page}:{b.line} ({b.exempt_reason})" for b in all_blocks() if b.exempt_reason]
    assert len(exempt) == EXPECTED_EXEMPTIONS, (
        f"{len(exempt)} python blocks in docs/ are marked no-test, expected "
        f"{EXPECTED_EXEMPTIONS}; update EXPECTED_EXEMPTIONS deliberately:\n" + "\n".join(exempt)
    )


def test_the_harness_finds_blocks_and_markers(tmp_path, monkeypatch):
    page = tmp_path / "page.md"
    page.write_text(
        "# t\n\n```python\nx = 1\n```\n\n<!-- no-test: needs a GPU -->\n"
        "```python\nimport cuda_only\n```\n\n```bash\nexit 1\n```\n\n"
        "- item\n\n    ```python\n    y = x + 1\n    ```\n",
        encoding="utf-8",
    )
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    found = blocks(page)
    assert [(b.line, b.code, b.exempt_reason) for b in found] == [
        (4, "x = 1", None),
        (9, "import cuda_only", "needs a GPU"),
        (19, "y = x + 1", None),
    ]
