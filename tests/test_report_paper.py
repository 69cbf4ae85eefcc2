"""The report's side-by-side tables: the paper's value per optimizer beside measured mean ± std."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import pytest

from adabelief.experiments.cli import main
from adabelief.experiments.paper_results import compare_with_paper
from adabelief.experiments.tasks import TASKS, PlanOptions
from test_experiments_data import write_fake_ptb

pytestmark = pytest.mark.usefixtures("restore_torch_globals")


def test_other_quantities_are_shown_but_not_compared() -> None:
    (row, *_) = compare_with_paper(
        "iwslt14/transformer", {"adabelief": (12.5, 0.5)}, measured_metric="test perplexity"
    )
    assert row.optimizer == "adabelief" and row.paper == 35.85 and row.difference is None
    assert "test perplexity 12.50 ± 0.50" in row.statement
    assert "BLEU 35.85" in row.statement and "not compared" in row.statement
    compared = compare_with_paper("iwslt14/transformer", {"adabelief": (36.0, 0.1)})[0]
    assert compared.difference == pytest.approx(0.15)


def test_experiments_name_their_paper_setting(tmp_path: Path) -> None:
    write_fake_ptb(tmp_path)
    (lstm,) = TASKS["lm"].experiments(PlanOptions(quick=True, data_dir=tmp_path))
    assert lstm.paper_key == "ptb/lstm-1" and lstm.paper["adabelief"] == 84.21
    (bundled,) = TASKS["lm"].experiments(PlanOptions(quick=True))
    assert bundled.paper_key == "" and bundled.paper == {}
    (transformer,) = TASKS["transformer"].experiments(PlanOptions(quick=True, tiny=True))
    assert transformer.paper_key == "iwslt14/transformer" and not transformer.paper_comparable


def test_report_sets_ptb_results_beside_the_paper(tmp_path: Path) -> None:
    write_fake_ptb(tmp_path / "ptb")
    out = tmp_path / "run"
    argv = ["run", "lm", "--data", str(tmp_path / "ptb"), "--quick", "--tiny", "--seeds", "2"]
    argv += ["--optimizers", "adabelief,adam", "--out", str(out)]
    argv += ["--jobs", "1", "--threads", "1", "--no-progress", "--no-plots"]
    assert main(argv) == 0
    records = json.loads((out / "results.json").read_text())
    values = [r["metrics"]["test_ppl"] for r in records if r["optimizer"] == "adabelief"]
    mean, std = statistics.fmean(values), statistics.stdev(values)
    report = (out / "report.md").read_text()
    assert "**Beside the paper** (1-layer LSTM on Penn Treebank)" in report
    (line,) = [x for x in report.splitlines() if x.startswith("| adabelief | 84.21 |")]
    cells = [cell.strip() for cell in line.strip("|").split("|")]
    measured = re.match(r"([\d.e+-]+) ± ([\d.e+-]+) \(2 runs\)", cells[2])
    assert measured is not None
    assert float(measured[1]) == pytest.approx(mean, rel=1e-3)
    assert float(measured[2]) == pytest.approx(std, rel=2e-2)
    assert float(cells[3]) == pytest.approx(mean - 84.21, abs=0.006)
    direction = "higher" if mean > 84.21 else "lower"
    assert f"{abs(mean - 84.21):.2f} {direction}" in cells[4]
    assert "| sgd | 85.07 | - | - | not run here; the paper reports 85.07 |" in report
    assert "The paper reports the test perplexity after 200 epochs" in report
