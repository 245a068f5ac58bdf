"""The promotion rule: pure, so it is tested on numbers alone.

A challenger replaces the champion when it is at least ``min_speedup`` times as fast (chars/s
of its TASC method over the champion's, measured on the same test split) and its task
metric drops by no more than ``max_metric_drop`` (absolute). With no champion yet, the
first challenger is promoted when its metric is not below ``metric_floor`` and it does not
lose to plain greedy decoding of the base model by more than ``max_metric_drop``. A floor of
0 (the default) means no floor; the reason then says so, so a first champion with a metric
of 0 is visibly one that no floor was set for.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class PromotionPolicy:
    min_speedup: float = 1.05
    max_metric_drop: float = 0.01
    metric_floor: float = 0.0  # lowest metric a first version needs; 0 (or less): no floor


@dataclass(frozen=True)
class Scorecard:
    """What a registered version is judged on."""

    chars_per_s: float
    metric: float
    split: str = "test"
    corpus_version: str = ""
    baseline_metric: float | None = None  # plain greedy of the base model, same split
    # chars/s of plain greedy on the base model in the same benchmark run: speeds measured in
    # different runs (the champion's earlier, the challenger's now) are compared through it,
    # since a shared machine's absolute speed moves 2-3x with its load.
    reference_chars_per_s: float | None = None


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    speedup: float | None
    metric_delta: float | None

    def to_tags(self) -> dict[str, str]:
        return {f"tasc.promotion.{k}": str(v) for k, v in asdict(self).items()}


def relative_speedup(challenger: Scorecard, champion: Scorecard) -> float:
    """How much faster the challenger is. Where both scorecards carry the base model's plain
    greedy speed from their own benchmark run, each speed is taken relative to it, so the
    machine's load in either run cancels; otherwise the absolute chars/s are compared."""
    if challenger.reference_chars_per_s and champion.reference_chars_per_s:
        mine = challenger.chars_per_s / challenger.reference_chars_per_s
        theirs = champion.chars_per_s / champion.reference_chars_per_s
        return mine / theirs if theirs else float("inf")
    return challenger.chars_per_s / champion.chars_per_s if champion.chars_per_s else float("inf")


def decide(challenger: Scorecard, champion: Scorecard | None, policy: PromotionPolicy = PromotionPolicy()) -> Decision:
    """Compare a challenger with the current champion (or the floor when there is none)."""
    if champion is None:
        drop = None if challenger.baseline_metric is None else challenger.metric - challenger.baseline_metric
        if challenger.metric < policy.metric_floor:
            return Decision(False, f"first version: metric {challenger.metric:.4f} is below the floor "
                                   f"{policy.metric_floor:.4f}", None, drop)
        if drop is not None and drop < -policy.max_metric_drop:
            return Decision(False, f"first version: metric {challenger.metric:.4f} is {-drop:.4f} below plain "
                                   f"greedy ({challenger.baseline_metric:.4f}), tolerance {policy.max_metric_drop}",
                            None, drop)
        if policy.metric_floor > 0:
            floor = f"passes the floor {policy.metric_floor:.4f}"
        else:
            floor = "accepted: no metric floor is set (metric_floor=0)"
        return Decision(True, f"first version: metric {challenger.metric:.4f} {floor}", None, drop)
    if champion.corpus_version and challenger.corpus_version and champion.corpus_version != challenger.corpus_version:
        note = f" (champion measured on corpus {champion.corpus_version}, challenger on {challenger.corpus_version})"
    else:
        note = ""
    speedup = relative_speedup(challenger, champion)
    if challenger.reference_chars_per_s and champion.reference_chars_per_s:
        how = " (each against plain greedy in its own benchmark run)"
    else:
        how = " (absolute chars/s of two runs: no same-run reference on both)"
    delta = challenger.metric - champion.metric
    if delta < -policy.max_metric_drop:
        return Decision(False, f"metric drops {-delta:.4f} (> {policy.max_metric_drop}){note}", speedup, delta)
    if speedup < policy.min_speedup:
        return Decision(False, f"speedup {speedup:.3f}x{how} is below {policy.min_speedup}x{note}", speedup, delta)
    return Decision(True, f"speedup {speedup:.3f}x{how} >= {policy.min_speedup}x and metric change {delta:+.4f} "
                          f"within {policy.max_metric_drop}{note}", speedup, delta)


def describe(decision: Decision, against: str | None) -> str:
    """The decision as one line for a person reading the registry (the version's description):
    the verdict, the numbers it was made on, then the rule's own reason. ``against`` is the
    champion version it was judged against (None: there was none, the first version)."""
    verdict = "promoted" if decision.promote else "kept as challenger"
    numbers = []
    if decision.speedup is not None:
        numbers.append(f"{decision.speedup:.2f}x chars/s" + (f" vs v{against}" if against else ""))
    if decision.metric_delta is not None:
        numbers.append(f"metric {decision.metric_delta:+.3f}" + ("" if against else " vs plain greedy"))
    return f"{verdict}: {', '.join(numbers) + '; ' if numbers else ''}{decision.reason}"


def scorecard_markdown(card: Scorecard, model: str, version: str) -> str:
    """The scorecard of ``model`` version ``version`` as a markdown table."""
    rows = [("chars/s (the registered method, higher is faster)", f"{card.chars_per_s:.1f}"),
            ("task metric", f"{card.metric:.4f}"),
            ("task metric of plain greedy decoding, base model",
             "-" if card.baseline_metric is None else f"{card.baseline_metric:.4f}"),
            ("measured on split", card.split), ("corpus version", card.corpus_version or "-")]
    lines = [f"# Scorecard of {model} v{version}", "",
             "What the promotion rule compares against the champion's scorecard.", "",
             "| measure | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]
    return "\n".join(lines) + "\n"
