from tasc.eval.promotion import PromotionPolicy, Scorecard, decide

P = PromotionPolicy(min_speedup=1.1, max_metric_drop=0.01, metric_floor=0.2)


def test_first_version_needs_the_floor():
    assert decide(Scorecard(100.0, 0.5), None, P).promote
    d = decide(Scorecard(100.0, 0.1), None, P)
    assert not d.promote and "floor" in d.reason


def test_first_version_must_not_lose_to_greedy():
    d = decide(Scorecard(100.0, 0.5, baseline_metric=0.6), None, P)
    assert not d.promote and "plain greedy" in d.reason


def test_faster_and_as_good_wins():
    d = decide(Scorecard(120.0, 0.495), Scorecard(100.0, 0.50), P)
    assert d.promote and abs(d.speedup - 1.2) < 1e-9


def test_too_slow_or_worse_loses():
    assert not decide(Scorecard(105.0, 0.6), Scorecard(100.0, 0.5), P).promote
    d = decide(Scorecard(200.0, 0.48), Scorecard(100.0, 0.5), P)
    assert not d.promote and "metric drops" in d.reason


def test_decision_tags():
    tags = decide(Scorecard(120.0, 0.5), Scorecard(100.0, 0.5), P).to_tags()
    assert tags["tasc.promotion.promote"] == "True"


def test_first_version_floor_is_inclusive_and_no_floor_is_reported():
    assert decide(Scorecard(100.0, 0.2), None, P).promote  # at the floor is not below it
    d = decide(Scorecard(100.0, 0.0), None, PromotionPolicy())
    assert d.promote and "no metric floor is set (metric_floor=0)" in d.reason
    d = decide(Scorecard(100.0, 0.0), None, PromotionPolicy(metric_floor=0.05))
    assert not d.promote and "below the floor 0.0500" in d.reason


def test_describe_is_one_line_with_the_verdict_and_numbers():
    from tasc.eval.promotion import describe

    d = decide(Scorecard(200.0, 0.48), Scorecard(100.0, 0.5), P)
    assert describe(d, "3") == "kept as challenger: 2.00x chars/s vs v3, metric -0.020; metric drops 0.0200 (> 0.01)"
    first = describe(decide(Scorecard(100.0, 0.5, baseline_metric=0.6), None, P), None)
    assert first.startswith("kept as challenger: metric -0.100 vs plain greedy; first version:") and "\n" not in first
