"""Let torchvision import beside the CPU build of torch, for the integration tests.

timm imports torchvision, and so do transformers and Lightning when it is installed. On Linux,
PyPI's torchvision wheels are CUDA builds; beside ``torch==2.13.0+cpu`` their C++ operators
cannot load (the library links ``libtorch_cuda.so``). torchvision then runs without its
operators (``torchvision.extension._has_ops()`` is False), except that its import fails first:
torchvision 0.28 registers a fake kernel for ``torchvision::nms`` and ``torchvision::qnms``
without checking that they exist (pytorch/vision#9085). No torchvision wheel on PyPI pairs with
the CPU build of torch, and torch stays pinned.

:func:`import_torchvision` declares the schemas of those two operators, and only those, when
that is the failure, so that torchvision imports in its own no-operators mode. Its operators
still raise torchvision's "Couldn't load custom C++ ops" error if they are called. Nothing in
timm's optimizer factory, the Trainer or Lightning calls them.
"""

from __future__ import annotations

import sys

import torch

_MISSING_OPERATOR = "operator torchvision::nms does not exist"
_UNGUARDED_OPERATORS = ("nms", "qnms")
_NMS_SCHEMA = "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"


def import_torchvision() -> str:
    """Import torchvision (if installed); return how: ``"absent"``, ``"with operators"`` or
    ``"without operators"``."""
    try:
        import torchvision
    except ModuleNotFoundError:
        return "absent"
    except RuntimeError as error:
        if _MISSING_OPERATOR not in str(error):
            raise
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        for operator in _UNGUARDED_OPERATORS:
            torch.library.define(f"torchvision::{operator}", _NMS_SCHEMA)
        import torchvision
    import torchvision.extension

    return "with operators" if torchvision.extension._has_ops() else "without operators"
