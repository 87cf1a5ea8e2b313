"""The documentation cannot drift from the code: every ```python block of README.md and of docs/*.md runs as
written (each in a fresh namespace, on the CPU), the kernel table of docs/kernels.md gives the ops' own
signatures, every relative link and every repository path the pages name exists, and the README stays a short
page for users."""

from __future__ import annotations

import glob
import inspect
import re
import traceback
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
KERNELS_PAGE = ROOT / "docs" / "kernels.md"
README_MAX_BYTES = 10 * 1024
#: the backend-policy names, documented under "Backends" rather than in the kernel table
BACKEND_POLICY = {"current_backend", "use_backend"}


def relative(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line of the opening fence, code) of every ```python block in ``text``."""
    blocks, start, lines = [], None, []
    for number, line in enumerate(text.splitlines(), 1):
        if start is None:
            if line.strip() == "```python":
                start, lines = number, []
        elif line.strip() == "```":
            blocks.append((start, "\n".join(lines)))
            start = None
        else:
            lines.append(line)
    if start is not None:
        raise ValueError(f"the ```python block opened at line {start} is never closed")
    return blocks


def run_block(fence: int, code: str, filename: str) -> None:
    """Run one block in a fresh namespace, its lines numbered as in the file; fail naming both lines."""
    try:
        exec(compile("\n" * fence + code, filename, "exec"), {"__name__": "__readme__"})
    except Exception as err:
        lines = [frame.lineno for frame in traceback.extract_tb(err.__traceback__) if frame.filename == filename]
        failing = err.lineno if isinstance(err, SyntaxError) else lines[-1]
        pytest.fail(f"{filename}:{fence}: the python block opened there fails at line {failing}: "
                    f"{type(err).__name__}: {err}", pytrace=False)


BLOCKS = [(page, fence, code) for page in PAGES for fence, code in python_blocks(page.read_text())]


@pytest.mark.slow
@pytest.mark.parametrize("page,fence,code", BLOCKS, ids=[f"{relative(p)}:{fence}" for p, fence, _ in BLOCKS])
def test_python_block_runs(page, fence, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # whatever a snippet writes stays out of the repository
    run_block(fence, code, str(page))


def test_a_failing_block_is_reported_with_its_lines():
    text = "intro\n```python\nx = 1\nundefined_name\n```\n"
    assert python_blocks(text) == [(2, "x = 1\nundefined_name")]
    with pytest.raises(pytest.fail.Exception, match=r"^snippet.md:2: .* fails at line 4: NameError"):
        run_block(*python_blocks(text)[0], "snippet.md")


def plain_signature(function) -> str:
    signature = inspect.signature(function)
    return str(signature.replace(parameters=[p.replace(annotation=p.empty) for p in signature.parameters.values()],
                                 return_annotation=signature.empty))


def test_kernels_table_lists_every_op_with_its_signature():
    import growlib

    ops = {name for name, home in growlib._HOMES.items() if home.startswith("growlib.kernels.")} - BACKEND_POLICY
    rows = dict(re.findall(r"^\| `(\w+)` \| `(\(.*?\))` \|", KERNELS_PAGE.read_text(), re.M))
    assert sorted(rows) == sorted(ops)
    for name, documented in rows.items():
        assert documented == plain_signature(getattr(growlib, name)), name


def test_readme_is_at_most_10_kb():
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes; move detail into docs/ (at most {README_MAX_BYTES})"


def test_readme_setup_keeps_exactly_two_commands():
    section = README.read_text().split("\n## Set-up\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [line.split("#", 1)[0].strip() for line in block.splitlines() if not line.lstrip().startswith("#")]
    assert [c for c in commands if c] == ["make demo", "make test"]


# -- links and paths ------------------------------------------------------------------------------------------

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
#: a path into the repository named in the text: growlib/..., tests/..., perf/..., docs/...
REPO_PATH = re.compile(r"(?<![\w./<-])((?:growlib|tests|perf|docs)/[\w./*-]*)")


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of every line outside fenced code blocks."""
    lines, fenced = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append((number, line))
    return lines


def anchors(text: str) -> set[str]:
    """GitHub's anchors for the headings of a Markdown page."""
    seen: dict[str, int] = {}
    for _, line in prose_lines(text):
        heading = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).lower()).replace(" ", "-")
            count = seen.get(slug, 0)
            seen[slug] = count + 1
    return {slug if n == 0 else f"{slug}-{n}" for slug, count in seen.items() for n in range(count)}


def broken_links(page: Path) -> list[str]:
    """Every relative link of ``page`` whose file (or heading anchor) does not exist, as 'line: target (why)'."""
    text, broken = page.read_text(), []
    for number, line in prose_lines(text):
        for target in LINK.findall(line):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            if not resolved.exists():
                broken.append(f"{number}: {target} (no such file)")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved.read_text()):
                broken.append(f"{number}: {target} (no such heading)")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=relative)
def test_relative_links_point_to_existing_files(page):
    assert broken_links(page) == [], f"{relative(page)} has broken links"


def test_a_broken_link_is_found(tmp_path):
    (tmp_path / "there.md").write_text("# A heading\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](there.md) [ok](there.md#a-heading) [web](https://example.org/x) [self](#top)\n"
                    "# Top\n[gone](missing.md)\n[bad anchor](there.md#nowhere)\n```\n[in code](skipped.md)\n```\n")
    assert broken_links(page) == ["3: missing.md (no such file)", "4: there.md#nowhere (no such heading)"]


def missing_paths(text: str) -> list[str]:
    """Repository paths named in ``text`` (globs allowed, templates like ``test_<op>.py`` skipped) that do not
    exist."""
    missing = []
    for match in REPO_PATH.finditer(text):
        path = match.group(1).rstrip(".")
        if text[match.end():match.end() + 1] in "<{":
            continue
        if not glob.glob(str(ROOT / path)):
            missing.append(path)
    return sorted(set(missing))


@pytest.mark.parametrize("page", PAGES, ids=relative)
def test_every_repository_path_named_exists(page):
    assert missing_paths(page.read_text()) == [], f"{relative(page)} names paths that do not exist"


def test_a_missing_path_is_found():
    text = "`growlib/no_such_module.py`, growlib/schema.py, `perf/results/ptxas-*.md`, tests/kernels/test_<op>.py"
    assert missing_paths(text) == ["growlib/no_such_module.py"]


def test_readme_links_every_docs_page():
    linked = {(README.parent / target.partition("#")[0]).resolve() for target in LINK.findall(README.read_text())}
    assert DOCS, "docs/ has no pages"
    assert [relative(page) for page in DOCS if page.resolve() not in linked] == []
