"""Optimizer step benchmark: ``python benchmarks/step.py [--quick] [--json PATH] ...``.

A thin wrapper over :func:`adabelief.experiments.bench.main` (also ``adabelief bench ...``); see that
module for what is measured.
"""

from __future__ import annotations

import sys

from adabelief.experiments.bench import main

if __name__ == "__main__":
    sys.exit(main())
