"""The command line answers before torch loads: `growlib --help` imports neither torch nor transformers,
`python -m growlib` works, and the light name lists agree with the registries that implement them.  (The help
time itself is measured by perf/bench_cli_help.py, not here.)"""

from __future__ import annotations

import subprocess
import sys

import pytest

import growlib
from growlib import names


@pytest.mark.subprocess
def test_parsing_and_help_import_neither_torch_nor_transformers():
    code = ("import sys, contextlib, io\n"
            "from growlib import cli\n"
            "parser = cli.build_parser()\n"
            "for argv in (['--help'], ['train', '--help'], ['compare', '--help'], ['check-kernels', '--help']):\n"
            "    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
            "        parser.parse_args(argv)\n"
            "print(sorted(m for m in ('torch', 'transformers', 'triton', 'numpy') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.subprocess
def test_python_dash_m_growlib_is_the_command_line():
    done = subprocess.run([sys.executable, "-m", "growlib", "--help"], capture_output=True, text=True)
    assert done.returncode == 0
    assert "{demo,train,compare,schedules,check-kernels,grow}" in done.stdout


def test_the_light_name_lists_are_what_the_registries_implement():
    from growlib.kernels.cases import all_cases
    from growlib.schedules import SCHEDULES
    from growlib.train.sizes import build_model

    assert tuple(SCHEDULES) == names.SCHEDULE_NAMES
    assert {case.op for case in all_cases()} == set(names.KERNEL_OPS)
    size = {"layers": 1, "hidden": 16, "heads": 2, "intermediate": 32}
    assert len({type(build_model(family, size, 64, 8)) for family in names.FAMILIES}) == len(names.FAMILIES)


def test_the_package_loads_its_names_on_first_use():
    assert growlib.coalesce is growlib.operators.multilevel.coalesce
    for name in growlib.__all__:  # every public name resolves to an object of that name
        assert getattr(growlib, name).__name__ == name
    namespace = {}
    exec("from growlib import *", namespace)
    assert {"LiGO", "coalesce", "schema_of", "map_optimizer_state"} <= set(namespace)
    try:
        growlib.no_such_thing
    except AttributeError as error:
        assert "no_such_thing" in str(error)
    else:
        raise AssertionError("an unknown name must raise AttributeError")
