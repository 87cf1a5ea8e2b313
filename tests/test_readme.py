"""The README cannot drift from the code: every ```python block in it runs as written (each in a fresh
namespace, on the CPU), and its table of kernel entry points gives the ops' own signatures."""

from __future__ import annotations

import inspect
import re
import traceback
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
#: the backend-policy names, documented under "Backends" rather than in the Kernels table
BACKEND_POLICY = {"current_backend", "use_backend"}


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


BLOCKS = python_blocks(README.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("fence,code", BLOCKS, ids=[f"README.md:{fence}" for fence, _ in BLOCKS])
def test_readme_python_block_runs(fence, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # whatever a snippet writes stays out of the repository
    run_block(fence, code, str(README))


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
    section = README.read_text().split("\n## Kernels\n", 1)[1].split("\n## ", 1)[0]
    rows = dict(re.findall(r"^\| `(\w+)` \| `(\(.*?\))` \|", section, re.M))
    assert sorted(rows) == sorted(ops)
    for name, documented in rows.items():
        assert documented == plain_signature(getattr(growlib, name)), name
