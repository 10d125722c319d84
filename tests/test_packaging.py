"""What the package claims about itself: the torch floor it is tested at, typing, private imports."""
from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_torch_floor_is_the_version_ci_installs() -> None:
    floor = re.search(r'"torch>=([0-9.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    ci = re.search(r"torch==([0-9.]+)", (ROOT / ".ci" / "run").read_text()).group(1)
    def version(text: str) -> tuple[int, ...]:
        parts = [int(p) for p in text.split("+")[0].split(".")[:3]]
        return tuple(parts + [0] * (3 - len(parts)))

    assert version(floor) == version(ci), f"pyproject claims torch>={floor} but CI tests {ci}"
    assert version(torch.__version__) >= version(floor)


def test_py_typed_ships_in_the_package() -> None:
    assert resources.files("mrml").joinpath("py.typed").is_file()
    assert '"mrml" = ["py.typed"]' in (ROOT / "pyproject.toml").read_text()


def test_only_the_dispatch_mode_is_imported_from_private_torch_modules() -> None:
    private = re.compile(r"^\s*(from|import)\s+torch(\.\w+)*\._\w+", re.M)
    hits = {str(p.relative_to(ROOT)): private.findall(p.read_text())
            for p in (ROOT / "src" / "mrml").rglob("*.py") if private.search(p.read_text())}
    assert list(hits) == [str(Path("src/mrml/memory.py"))], hits
    assert "from torch.utils._python_dispatch import TorchDispatchMode" in (ROOT / "src/mrml/memory.py").read_text()
