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


def test_speeds_from_two_runs_are_compared_through_each_runs_plain_greedy():
    """The champion was measured on a quiet machine, the challenger with the machine 2.5x
    slower: in absolute chars/s the better challenger looks slower; against plain greedy in
    its own run it is 1.5x faster, and a worse one is rejected however fast its machine was."""
    champion = Scorecard(200.0, 0.5, reference_chars_per_s=100.0)  # 2.0x greedy
    loaded = Scorecard(120.0, 0.5, reference_chars_per_s=40.0)  # 3.0x greedy, busy machine
    d = decide(loaded, champion, P)
    assert d.promote and abs(d.speedup - 1.5) < 1e-9 and "its own benchmark run" in d.reason
    quiet_but_worse = Scorecard(300.0, 0.5, reference_chars_per_s=200.0)  # 1.5x greedy, fast machine
    d = decide(quiet_but_worse, champion, P)
    assert not d.promote and abs(d.speedup - 0.75) < 1e-9
    # Without a same-run reference on both sides the absolute speeds are all there is, and the
    # reason says so.
    d = decide(Scorecard(240.0, 0.5), champion, P)
    assert d.promote and abs(d.speedup - 1.2) < 1e-9 and "absolute chars/s" in d.reason
