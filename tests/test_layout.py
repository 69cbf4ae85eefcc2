"""The layers: ``import adabelief`` loads the core only (no runner, benchmark, Keras or JAX), and
the kernel modules do not import the dispatcher or each other."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import adabelief

KERNELS = Path(adabelief.__file__).parent / "kernels"


def test_import_adabelief_loads_only_the_core():
    code = (
        "import json, sys, adabelief; "
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('adabelief', 'keras', 'jax', 'optax', 'tensorflow', 'ray', 'matplotlib'))))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    loaded = json.loads(done.stdout)
    assert not [m for m in loaded if m.startswith("adabelief.experiments")], loaded
    assert not [m for m in loaded if m.split(".")[0] in ("keras", "jax", "optax", "ray")], loaded
    assert "adabelief.keras" not in loaded and "adabelief.optax" not in loaded
    assert "adabelief.integrations" not in loaded


def _adabelief_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("adabelief"):
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("adabelief"))
    return names


def test_kernels_do_not_call_back_up():
    """Only the dispatcher imports the path modules; no kernel imports the dispatcher, the
    optimizer or another path."""
    paths = {"single_tensor", "foreach", "tensor_math", "cpu"}
    for name in paths:
        imports = _adabelief_imports(KERNELS / f"{name}.py")
        for other in paths | {"dispatch"}:
            assert not any(i.endswith(f"kernels.{other}") for i in imports), (name, other)
        assert "adabelief.optimizer" not in imports, name


def test_the_core_never_imports_the_runner():
    core = Path(adabelief.__file__).parent
    for path in [*core.glob("*.py"), *KERNELS.glob("*.py")]:
        imports = _adabelief_imports(path)
        assert not [i for i in imports if i.startswith("adabelief.experiments")], path.name
