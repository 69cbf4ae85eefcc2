"""``import adabelief`` (and ``import adabelief.integrations``) import no training framework."""

from __future__ import annotations

import subprocess
import sys

FRAMEWORKS = ("timm", "transformers", "accelerate", "lightning", "pytorch_lightning", "torchvision")


def test_the_package_and_the_integrations_package_import_no_framework():
    check = (
        "import sys, adabelief, adabelief.integrations\n"
        f"loaded = [m for m in {FRAMEWORKS!r} if m in sys.modules]\n"
        "loaded += [m for m in sys.modules if m.startswith('adabelief.integrations.')]\n"
        "print(loaded)\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", check], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
