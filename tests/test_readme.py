"""The README's library examples run as written and print what the README says they print.

A ```python block followed by a ```text block that starts with the line `# output` is run in a fresh
interpreter (the package as installed, torch on one thread) and its standard output must equal the
text block, line for line, after that marker line.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"```python\n((?:(?!```).)*)```\s*\n```text\n# output\n((?:(?!```).)*)```", re.S)


def examples() -> list[tuple[str, str]]:
    return BLOCK.findall(README.read_text())


def test_the_readme_has_checked_examples() -> None:
    assert examples(), "no ```python block followed by a ```text block starting with '# output'"


@pytest.mark.parametrize("index", range(len(examples())))
def test_readme_example_prints_what_the_readme_says(index: int, tmp_path: Path) -> None:
    code, expected = examples()[index]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", "import torch; torch.set_num_threads(1)\n" + code],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines() == expected.strip().splitlines()
