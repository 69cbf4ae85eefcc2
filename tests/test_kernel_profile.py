"""``benchmarks/kernel_profile.py``: its ablations still find what they remove in the shipped
kernel sources (no compiler needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from adabelief.kernels import cpu


def test_every_ablation_edits_the_shipped_sources(load_benchmark, tmp_path: Path):
    profile = load_benchmark("kernel_profile")
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    cpu.write_sources(shipped)
    for name in profile.ABLATIONS:
        folder = profile.ablated_sources(shipped, tmp_path, name)
        for file, old, new in profile.ABLATIONS[name]:
            text = (folder / file).read_text()
            assert old not in text and new in text, (name, file)
    both = profile.ablated_sources(shipped, tmp_path, "dither+division")
    assert all(
        new in (both / file).read_text()
        for edits in profile.ABLATIONS.values()
        for file, _, new in edits
    )


def test_an_unknown_ablation_or_a_stale_pattern_stops_the_run(load_benchmark, tmp_path: Path):
    profile = load_benchmark("kernel_profile")
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    cpu.write_sources(shipped)
    with pytest.raises(SystemExit, match="unknown; choose from dither, division"):
        profile.ablated_sources(shipped, tmp_path, "hash")
    (shipped / "dither.h").write_text("// a rewritten dither\n")
    with pytest.raises(SystemExit, match=r"dither\.h no longer contains"):
        profile.ablated_sources(shipped, tmp_path, "dither")
