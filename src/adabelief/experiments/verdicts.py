"""Verdicts on the paper's three claims, computed from the analysed studies (no Markdown here).

For each claim, every experiment that informs it contributes paired comparisons (over seeds) of
AdaBelief against the claim's rivals in that experiment (:meth:`Experiment.rivals`: Adam for
speed and GANs, SGD for generalization, Adam and AdamW for the Transformer), on the claim's
metric.  Only comparisons over two seeds or more count: with one seed nothing is tested, except
that a divergence always counts.

A comparison's word comes from :attr:`PairedComparison.verdict`: *better* / *worse* by the paired
test at p < 0.05, *worse (diverged)* when AdaBelief diverged on more seeds than the rival (a
diverged run loses its pair, so a divergence is never a draw).  A *budget-limited* comparison
(:meth:`ExperimentResult.budget_limited`: one of the two optimizers was still improving when its
budget ended) is shown with that label, and its better / worse does not count in the claim's
verdict; the verdict then names how many budget-limited comparisons it left out.  This module is
the one place these rules live: the Markdown, the CSV and the CLI all show its words.

* ``supported``: AdaBelief significantly better somewhere and worse nowhere;
* ``consistent (no significant difference)``: no significant difference anywhere;
* ``mixed``: worse somewhere (significantly, or by diverging), but not everywhere;
* ``not supported``: worse in every comparison;
* ``not tested``: no comparison with two seeds or more and no divergence.

A claim where AdaBelief diverged and its rival did not is therefore never *supported*,
*consistent* or *not tested*.

Claim 3 (GAN stability) also looks at the spread of the score across seeds: a supported or
consistent verdict becomes ``mixed`` when AdaBelief's spread exceeds Adam's in most GAN
experiments, or when it diverges more often than Adam.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from adabelief.experiments.analysis import REFERENCE, ExperimentResult
from adabelief.experiments.paper_results import (
    Measured,
    PaperComparison,
    PaperExperiment,
    compare_with_paper,
    paper_experiment,
)
from adabelief.experiments.spec import CLAIMS, Experiment, Metric
from adabelief.experiments.stats import PairedComparison, sign_test_seeds_needed

__all__ = [
    "CLAIM_RULES",
    "ClaimAssessment",
    "ClaimRule",
    "Evidence",
    "Loss",
    "PaperTable",
    "QuickFullRow",
    "Stability",
    "assess_claims",
    "claim_verdict",
    "collect",
    "comparison_word",
    "counts_as",
    "losses",
    "metric_named",
    "paper_table",
    "quick_vs_full",
    "seed_note",
    "selection_words",
    "tally",
    "verdict_legend",
]


@dataclass(frozen=True)
class ClaimRule:
    """Which metrics a claim is judged on (the first decides, the others are shown)."""

    key: str
    metrics: tuple[str, ...]
    measured_by: str


CLAIM_RULES: dict[str, ClaimRule] = {
    "convergence": ClaimRule(
        "convergence",
        ("speed",),
        "each experiment's speed metric: steps to reach the optimum (toy), the mean training "
        "loss over the whole run, i.e. the area under the training-loss curve (classify, lm, "
        "transformer), or a user task's score; lower is faster for the built-in ones",
    ),
    "generalization": ClaimRule(
        "generalization",
        ("score", "generalization_gap"),
        "each experiment's held-out score: test accuracy (classify), test perplexity (lm, "
        "transformer) or a user task's score, compared with SGD (with Adam and AdamW for the "
        "Transformer, as in the paper's BLEU table); the final train - test accuracy gap is "
        "shown in the matrix but does not enter the verdict",
    ),
    "gan": ClaimRule(
        "gan",
        ("score",),
        "the final sample quality (test noise) of each GAN and its spread across seeds (sample "
        "standard deviation; smaller = more stable), plus divergences. The verdict compares "
        "with Adam, the paper's GAN baseline; it is downgraded to *mixed* when AdaBelief's "
        "spread exceeds Adam's in most experiments or it diverges more often",
    ),
}


@dataclass(frozen=True)
class Evidence:
    """AdaBelief against one other optimizer on one metric of one experiment."""

    result: ExperimentResult
    metric: Metric
    other: str
    comparison: PairedComparison
    budget_limited: bool = False

    @property
    def word(self) -> str:
        """The comparison's verdict as shown (see :func:`comparison_word`)."""
        return comparison_word(self.comparison, self.budget_limited)


_DECIDED = ("better", "worse")


def comparison_word(comparison: PairedComparison, budget_limited: bool = False) -> str:
    """The verdict of one comparison as the report shows it: the paired verdict, labelled
    ``(budget-limited)`` when it is better / worse and an optimizer was still improving."""
    word = comparison.verdict
    return f"{word} (budget-limited)" if budget_limited and word in _DECIDED else word


def counts_as(comparison: PairedComparison, budget_limited: bool = False) -> str:
    """What a comparison counts as in a claim's verdict: ``better``, ``worse``, ``even`` (no
    significant difference, or a budget-limited better / worse) or ``untested``."""
    word = comparison.verdict
    if word == "worse (diverged)":
        return "worse"
    if comparison.n < 2:
        return "untested"
    if word in _DECIDED and not budget_limited:
        return word
    return "even"


@dataclass(frozen=True)
class StabilityRow:
    """Spread (std over seeds) of one GAN experiment's score per optimizer."""

    result: ExperimentResult
    stds: dict[str, float]
    rank: int | None
    ranked: int


@dataclass(frozen=True)
class Stability:
    """Claim 3's stability check over the GAN experiments."""

    rows: tuple[StabilityRow, ...]
    smaller_than_adam: int
    lowest: int
    reference_diverged: int
    adam_diverged: int

    @property
    def stable(self) -> bool:
        """Spread at most Adam's in at least half the experiments, and no more divergences."""
        return (
            self.smaller_than_adam * 2 >= len(self.rows)
            and self.reference_diverged <= self.adam_diverged
        )


@dataclass(frozen=True)
class ClaimAssessment:
    """One claim's verdict and the evidence behind it."""

    claim: str
    verdict: str
    summary: str
    rule: ClaimRule
    evidence: tuple[Evidence, ...]
    stability: Stability | None = None

    @property
    def statement(self) -> str:
        """The claim as the paper makes it."""
        return CLAIMS[self.claim]


@dataclass(frozen=True)
class Loss:
    """A comparison where another optimizer's mean beat AdaBelief's."""

    result: ExperimentResult
    metric: Metric
    other: str
    comparison: PairedComparison

    @property
    def significant(self) -> bool:
        """Whether the paired test calls AdaBelief worse, or AdaBelief diverged more often."""
        return self.comparison.verdict in ("worse", "worse (diverged)")

    @property
    def diverged(self) -> bool:
        """Whether AdaBelief diverged on seeds where the other optimizer did not."""
        return self.comparison.a_diverged > 0


def metric_named(experiment: Experiment, attribute_or_name: str) -> Metric | None:
    """``experiment.score`` / ``.selection`` / ``.speed`` by attribute, or a metric by name."""
    if attribute_or_name in ("score", "selection", "speed"):
        value = getattr(experiment, attribute_or_name)
        return value if isinstance(value, Metric) else None
    return next((m for m in experiment.metrics if m.name == attribute_or_name), None)


def verdict_legend() -> str:
    """One paragraph saying how the verdict words are decided (the rules of this module)."""
    from adabelief.experiments.stats import ALPHA

    return (
        f"Verdicts: *better*/*worse* = paired two-sided t-test over seeds at p < {ALPHA} (the "
        "sign test where the paired differences are equal up to rounding or a run diverged); "
        "*worse (diverged)* = AdaBelief diverged on more seeds than its rival, a loss whatever "
        "the p-value; *budget-limited* = an optimizer was still improving when its budget "
        "ended, so that comparison's better/worse is shown but not counted; *supported* = "
        "better somewhere and worse nowhere; *consistent* = no significant difference anywhere "
        "(which is what 'like Adam' / 'like SGD' predicts, but also what too few seeds "
        "produce); *mixed* = worse somewhere (significantly or by diverging); *not supported* "
        "= worse everywhere; *not tested* = no comparison with two seeds or more and no "
        "divergence."
    )


def selection_words(experiment: Experiment) -> str:
    """Which data picked the trials and epochs of ``experiment``, in the report's words."""
    if experiment.selection.name != experiment.score.name:
        return f"validation data ({experiment.selection.label})"
    return f"the reported metric itself ({experiment.score.label}), not held-out validation data"


def claim_verdict(evidence: Iterable[Evidence]) -> str:
    """Summarise paired comparisons into a verdict word (see the module notes)."""
    evidence = list(evidence)
    counted = [counts_as(e.comparison, e.budget_limited) for e in evidence]
    tested = [c for c in counted if c != "untested"]
    left_out = sum(1 for e in evidence if e.budget_limited and e.comparison.verdict in _DECIDED)
    if not tested:
        if any(e.comparison.n == 1 for e in evidence):
            return "not tested (one seed: nothing to test)"
        return "not tested"
    worse, better = tested.count("worse"), tested.count("better")
    if worse == 0:
        verdict = "supported" if better else "consistent (no significant difference)"
    elif worse == len(tested):
        verdict = "not supported"
    else:
        verdict = "mixed"
    if left_out:
        verdict += (
            f" ({left_out} budget-limited comparison{'s' if left_out > 1 else ''} not counted)"
        )
    return verdict


_WORDS = (
    "better",
    "better (budget-limited)",
    "no significant difference",
    "worse (budget-limited)",
    "worse",
    "worse (diverged)",
    "too few seeds",
)


def tally(evidence: list[Evidence]) -> str:
    """``"2 better, 1 no significant difference"`` over the comparisons."""
    words = [e.word for e in evidence]
    parts = [f"{words.count(word)} {word}" for word in _WORDS if words.count(word)]
    return ", ".join(parts) if parts else "no comparisons"


def divergences(evidence: list[Evidence]) -> tuple[int, int, int]:
    """Diverged runs of AdaBelief (each experiment once) and of its rivals, and runs compared
    per side: ``(adabelief, rivals, adabelief runs)``."""
    reference = rivals = runs = 0
    seen: set[int] = set()
    for e in evidence:
        if id(e.result) not in seen:
            seen.add(id(e.result))
            row = e.result.get(REFERENCE)
            if row is not None:
                flags = row.diverged_at(e.result.seeds)
                reference += sum(flags)
                runs += sum(1 for s in e.result.seeds if s in row.chosen.records)
        other = e.result.get(e.other)
        if other is not None:
            rivals += sum(other.diverged_at(e.result.seeds))
    return reference, rivals, runs


def seed_note(evidence: Iterable[Evidence]) -> str | None:
    """Where the sign test decided a comparison but has too few seeds to ever reach p < 0.05:
    the sentence that says so, and how many seeds it would need (None when nowhere)."""
    needed = sign_test_seeds_needed()
    short = [
        e
        for e in evidence
        if e.comparison.sign_test_only and 0 < e.comparison.wins + e.comparison.losses < needed
    ]
    if not short:
        return None
    names = ", ".join(dict.fromkeys(f"{e.result.name} vs {e.other}" for e in short))
    fewest = min(e.comparison.wins + e.comparison.losses for e in short)
    return (
        f"The sign test decided {names}: with {fewest} decided pair{'s' if fewest > 1 else ''} "
        f"it cannot go below p = {2 / 2**fewest:.3g}, so it can never call a difference "
        f"significant at p < 0.05; that needs {needed} seeds or more (`--seeds {needed}`)."
    )


def collect(results: list[ExperimentResult], claim: str, metric_of: str) -> list[Evidence]:
    """AdaBelief against each experiment's rivals for ``claim`` on metric ``metric_of``."""
    evidence = []
    for result in results:
        if claim not in result.experiment.claims:
            continue
        metric = metric_named(result.experiment, metric_of)
        if metric is None:
            continue
        for other in result.experiment.rivals(claim):
            comparison = result.compare(metric, other)
            if comparison is not None and comparison.n > 0:
                limited = result.budget_limited(other)
                evidence.append(Evidence(result, metric, other, comparison, limited))
    return evidence


def _rivals_text(evidence: list[Evidence]) -> str:
    return ", ".join(dict.fromkeys(e.other for e in evidence))


def _stability(results: list[ExperimentResult]) -> Stability | None:
    gan = [r for r in results if "gan" in r.experiment.claims and r.get(REFERENCE)]
    if not gan:
        return None
    rows = []
    smaller, lowest, ref_div, adam_div = 0, 0, 0, 0
    for result in gan:
        metric = result.experiment.score
        stds = {
            o.optimizer: result.summary(o.optimizer, metric.name).std for o in result.optimizers
        }
        finite = sorted(v for v in stds.values() if math.isfinite(v))
        ab_std = stds.get(REFERENCE, math.nan)
        rank = finite.index(ab_std) + 1 if math.isfinite(ab_std) else None
        lowest += rank == 1
        adam_std = stds.get("adam", math.nan)
        if math.isfinite(ab_std) and math.isfinite(adam_std):
            smaller += ab_std <= adam_std
        reference, adam = result.get(REFERENCE), result.get("adam")
        ref_div += reference.chosen.diverged if reference else 0
        adam_div += adam.chosen.diverged if adam else 0
        rows.append(StabilityRow(result, stds, rank, len(finite)))
    return Stability(tuple(rows), smaller, lowest, ref_div, adam_div)


def _assess(results: list[ExperimentResult], claim: str) -> ClaimAssessment:
    rule = CLAIM_RULES[claim]
    evidence = collect(results, claim, rule.metrics[0])
    verdict = claim_verdict(evidence)
    if not evidence:
        return ClaimAssessment(claim, verdict, "no paired runs", rule, ())
    summary = f"vs {_rivals_text(evidence)}: {tally(evidence)} (of {len(evidence)})"
    reference_div, rival_div, runs = divergences(evidence)
    if reference_div or rival_div:
        summary += (
            f"; diverged runs: AdaBelief {reference_div} of {runs}, "
            f"{_rivals_text(evidence)} {rival_div}"
        )
    stability = _stability(results) if claim == "gan" else None
    if stability is not None:
        # The budget-limited note after the word stays: "mixed (1 budget-limited ... counted)".
        for word in ("supported", "consistent (no significant difference)"):
            if verdict.startswith(word) and not stability.stable:
                verdict = "mixed" + verdict.removeprefix(word)
        n = len(stability.rows)
        summary = (
            f"quality {summary}; spread <= Adam's in {stability.smaller_than_adam} of {n}; "
            f"smallest spread in {stability.lowest} of {n}; divergences AdaBelief "
            f"{stability.reference_diverged}, Adam {stability.adam_diverged}"
        )
    return ClaimAssessment(claim, verdict, summary, rule, tuple(evidence), stability)


def assess_claims(results: list[ExperimentResult]) -> list[ClaimAssessment]:
    """The verdict of each of the paper's claims, in the paper's order."""
    return [_assess(results, claim) for claim in CLAIMS]


def losses(results: list[ExperimentResult]) -> list[Loss]:
    """Every comparison (score and speed, against every optimizer) where AdaBelief's mean lost,
    significant ones first, then by p-value."""
    found = []
    for result in results:
        if result.get(REFERENCE) is None:
            continue
        metrics = [m for m in (result.experiment.score, result.experiment.speed) if m is not None]
        for metric in dict.fromkeys(metrics):
            for row in result.optimizers:
                comparison = result.compare(metric, row.optimizer)
                if comparison is None or comparison.n == 0:
                    continue
                lost = comparison.advantage < 0 or comparison.losses > comparison.wins
                if lost or comparison.a_diverged > comparison.b_diverged:
                    found.append(Loss(result, metric, row.optimizer, comparison))
    return sorted(
        found,
        key=lambda loss: (not loss.diverged, not loss.significant, loss.comparison.p_value),
    )


@dataclass(frozen=True)
class QuickFullRow:
    """One comparison at the quick budget beside the same comparison at the default budget."""

    experiment: str
    mode: str
    claim: str
    metric: str
    other: str
    quick: str
    full: str

    @property
    def agree(self) -> bool:
        """Whether both budgets count the comparison the same way."""
        return self.quick.split(" (")[0] == self.full.split(" (")[0]


def quick_vs_full(results: list[ExperimentResult]) -> list[QuickFullRow]:
    """For every experiment with a quick and a default-budget study in one mode, the claim
    comparisons side by side (the words of :func:`comparison_word`)."""
    rows = []
    groups: dict[tuple[str, str, str], dict[bool, ExperimentResult]] = {}
    for result in results:
        key = (result.experiment.task, result.experiment.name, result.mode)
        groups.setdefault(key, {}).setdefault(result.quick, result)
    for (task, name, mode), pair in groups.items():
        if len(pair) < 2:
            continue
        quick, full = pair[True], pair[False]
        for claim in quick.experiment.claims:
            rule = CLAIM_RULES.get(claim)
            if rule is None:
                continue
            quick_evidence = collect([quick], claim, rule.metrics[0])
            full_evidence = {e.other: e for e in collect([full], claim, rule.metrics[0])}
            for e in quick_evidence:
                other = full_evidence.get(e.other)
                rows.append(
                    QuickFullRow(
                        f"{task}/{name}",
                        mode,
                        claim,
                        e.metric.label,
                        e.other,
                        e.word,
                        other.word if other is not None else "not run",
                    )
                )
    return rows


def comparisons_available(results: list[ExperimentResult]) -> bool:
    """Whether any experiment has AdaBelief and another optimizer with a common seed."""
    for result in results:
        for row in result.optimizers:
            comparison = result.compare(result.experiment.score, row.optimizer)
            if comparison is not None and comparison.n > 0:
                return True
    return False


@dataclass(frozen=True)
class PaperTable:
    """An experiment's results beside the paper's: the setting, one row per optimizer and
    plain-words notes on how to read the two columns."""

    paper: PaperExperiment
    measured_label: str
    rows: list[PaperComparison]
    notes: list[str]


def paper_table(result: ExperimentResult) -> PaperTable | None:
    """The paper's value and the measured mean ± std (over seeds, of the reported score) per
    optimizer, for an experiment that names its paper setting (``None`` otherwise)."""
    experiment = result.experiment
    if not experiment.paper_key:
        return None
    paper = paper_experiment(experiment.paper_key)
    score = experiment.score.name
    measured = {}
    for row in result.optimizers:
        summary = result.summary(row.optimizer, score)
        mean = summary.mean if summary.n else None
        std = summary.std if summary.n > 1 and math.isfinite(summary.std) else None
        measured[row.optimizer] = Measured(mean, std, summary.n)
    label = experiment.score.label
    rows = compare_with_paper(
        paper.key, measured, measured_metric=None if experiment.paper_comparable else label
    )
    notes = [f"The paper reports the {paper.statistic} ({paper.source})."]
    if any(value.approximate for value in paper.values.values()):
        kind = "medians" if "median" in paper.statistic else "values"
        notes.append(
            f"The paper's {kind} marked 'about' are read off a figure, not printed numbers; "
            "the measured values are means over seeds."
        )
    if not experiment.paper_comparable:
        notes.append(
            f"Measured here is {label}, not the paper's {paper.metric}: the two are shown side "
            "by side and not compared."
        )
    if result.quick:
        notes.append(
            "Quick mode: far smaller than the paper's setting; the paper's values are context, "
            "not a target."
        )
    return PaperTable(paper, label, rows, notes)
