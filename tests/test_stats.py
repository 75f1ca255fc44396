"""Resampling statistics: intervals cover what they should, tests reject what they should."""

from __future__ import annotations

import numpy as np
import pytest

from itlens.analysis.stats import (bootstrap_ci, match_rate_permutation_test, paired_bootstrap,
                                   paired_permutation_test, permutation_test_two_sample, wilson_interval)


def test_bootstrap_ci_brackets_the_mean_and_is_deterministic():
    rng = np.random.default_rng(0)
    x = rng.normal(5.0, 1.0, size=200)
    a = bootstrap_ci(x, n_resamples=500, seed=3)
    b = bootstrap_ci(x, n_resamples=500, seed=3)
    assert a == b
    assert a["low"] < a["estimate"] < a["high"]
    assert a["low"] > 4.6 and a["high"] < 5.4  # about mean +- 2 * 1/sqrt(200)
    assert a["n"] == 200


def test_bootstrap_ci_degenerate_inputs():
    assert bootstrap_ci([])["estimate"] is None
    assert bootstrap_ci([1.0]) == {"estimate": 1.0, "low": 1.0, "high": 1.0, "n": 1}
    assert bootstrap_ci([1, 1, 1])["low"] == 1.0


def test_paired_bootstrap_detects_a_consistent_drop_and_not_noise():
    rng = np.random.default_rng(1)
    base = (rng.random(300) < 0.8).astype(float)
    tuned = base.copy()
    flip = rng.choice(300, size=60, replace=False)
    tuned[flip] = 0.0  # the tuned model forgets some answers: accuracy drops
    res = paired_bootstrap(base, tuned, n_resamples=1000, seed=0)
    assert res["estimate"] == pytest.approx(tuned.mean() - base.mean())
    assert res["high"] < 0 and res["p_value"] < 0.01
    same = paired_bootstrap(base, base)
    assert same["estimate"] == 0 and same["p_value"] == 1.0
    with pytest.raises(ValueError):
        paired_bootstrap([1, 0], [1])


def test_permutation_tests():
    rng = np.random.default_rng(2)
    x, y = rng.normal(1.0, 1.0, 80), rng.normal(0.0, 1.0, 80)
    assert permutation_test_two_sample(x, y, n_resamples=999)["p_value"] < 0.01
    z = rng.normal(0.0, 1.0, 80)
    assert permutation_test_two_sample(z, y, n_resamples=999)["p_value"] > 0.05
    assert paired_permutation_test(y, y + 0.5 + rng.normal(0, 0.1, 80), n_resamples=999)["p_value"] < 0.01


def test_two_sample_clusters_move_as_units():
    """The same answers repeated under three seeds are no new evidence once clustered by question; unclustered,
    the repeats shrink the p-value (what F3's SFT-vs-LFT test did before)."""
    rng = np.random.default_rng(4)
    x, y = (rng.random(30) < 0.45).astype(float), (rng.random(30) < 0.25).astype(float)
    one = permutation_test_two_sample(x, y, alternative="greater", clusters_x=range(30), clusters_y=range(30),
                                      n_resamples=999)
    three = permutation_test_two_sample(np.tile(x, 3), np.tile(y, 3), alternative="greater",
                                        clusters_x=list(range(30)) * 3, clusters_y=list(range(30)) * 3,
                                        n_resamples=999)
    assert three["p_value"] == one["p_value"] and three["statistic"] == pytest.approx(one["statistic"])
    assert (three["clusters_x"], three["clusters_y"], three["n_x"]) == (30, 30, 90)
    pooled = permutation_test_two_sample(np.tile(x, 3), np.tile(y, 3), alternative="greater", n_resamples=999)
    assert pooled["p_value"] < one["p_value"] / 3
    # few clusters: every split is enumerated, so the p-value is exact
    exact = permutation_test_two_sample([1.0, 1.0, 1.0], [0.0, 0.0], alternative="greater",
                                        clusters_x=["a", "a", "b"], clusters_y=["a", "c"])
    assert exact["p_value"] == pytest.approx(1 / 6)  # 4 units, 2 in x: only {a, b} of C(4, 2) is as extreme
    with pytest.raises(ValueError, match="clusters"):
        permutation_test_two_sample([1.0, 0.0], [0.0], clusters_x=["a"])


def test_match_rate_permutation_test_finds_designed_copying():
    rng = np.random.default_rng(3)
    vocab = [f"v{i}" for i in range(10)]
    refs = list(rng.choice(vocab, size=120))
    copied = [r if i % 2 == 0 else str(rng.choice(vocab)) for i, r in enumerate(refs)]  # half copy their ref
    res = match_rate_permutation_test(copied, refs, strata=[i % 3 for i in range(120)], n_resamples=999)
    assert res["observed"] > 0.5 and res["null_mean"] < 0.2 and res["p_value"] < 0.01
    random_vals = list(rng.choice(vocab, size=120))
    res0 = match_rate_permutation_test(random_vals, refs, n_resamples=999)
    assert res0["p_value"] > 0.05
    assert res0["null_low"] <= res0["null_mean"] <= res0["null_high"]


def test_wilson_interval():
    w = wilson_interval(0, 10)
    assert w["estimate"] == 0 and w["low"] == 0 and 0.2 < w["high"] < 0.35
    assert wilson_interval(5, 0)["estimate"] is None


def test_two_sample_permutation_with_one_observation_is_exact():
    """scipy needs two observations per sample; with one the n splits are enumerated exactly."""
    from itlens.analysis.stats import permutation_test_two_sample

    r = permutation_test_two_sample([1.0], [0.0, 0.0, 1.0], alternative="greater")
    assert r["statistic"] == pytest.approx(2 / 3) and r["p_value"] == 0.5  # 2 of the 4 splits reach 2/3
    r = permutation_test_two_sample([1.0, 1.0, 0.0], [0.0], alternative="two-sided")
    assert r["p_value"] == 1.0 and r["n_x"] == 3 and r["n_y"] == 1
    assert permutation_test_two_sample([1.0], [0.0], alternative="greater")["p_value"] == 0.5


def test_paired_permutation_with_one_pair_is_exact():
    """scipy needs two observations; one nonzero difference has 2 sign flips, enumerated exactly."""
    r = paired_permutation_test([0.0], [1.0])
    assert (r["statistic"], r["p_value"], r["n"]) == (1.0, 1.0, 1)
    assert paired_permutation_test([0.0], [1.0], alternative="greater")["p_value"] == 0.5
    assert paired_permutation_test([0.0], [1.0], alternative="less")["p_value"] == 1.0
    b = paired_bootstrap([1.0], [0.0])
    assert (b["estimate"], b["low"], b["high"], b["p_value"]) == (-1.0, -1.0, -1.0, 1.0)


def test_exact_sign_flip_p_equals_scipy_for_small_samples():
    """The exact enumeration follows scipy's exact rule, so n >= 2 (left to scipy) agrees with it."""
    from itlens.analysis.stats import _exact_sign_flip_p

    rng = np.random.default_rng(4)
    for n in (2, 3, 6):
        x = rng.normal(size=n)
        y = x + rng.normal(0.3, 1.0, n)
        for alt in ("two-sided", "greater", "less"):
            assert _exact_sign_flip_p(y - x, alt) == pytest.approx(
                paired_permutation_test(x, y, alternative=alt)["p_value"], abs=1e-12)


def test_match_rate_clusters_make_repeated_answers_one_unit():
    """The same answers repeated (one question under three seeds) are no new evidence with clusters;
    without them the test reads the copies as independent and its p-value shrinks."""
    rng = np.random.default_rng(3)
    refs = [f"r{int(x)}" for x in rng.integers(0, 6, 40)]
    vals = [r if i < 8 else f"r{int(x)}" for i, (r, x) in enumerate(zip(refs, rng.integers(0, 6, 40)))]
    strata = [i % 2 for i in range(40)]
    one = match_rate_permutation_test(vals, refs, strata=strata, n_resamples=1999)
    same = match_rate_permutation_test(vals, refs, strata=strata, clusters=list(range(40)), n_resamples=1999)
    assert same == one  # one item per cluster: the plain test, same draws
    k = 3
    rep = match_rate_permutation_test(vals * k, refs * k, strata=strata * k, n_resamples=1999)
    clustered = match_rate_permutation_test(vals * k, refs * k, strata=strata * k,
                                            clusters=[i for _ in range(k) for i in range(40)], n_resamples=1999)
    assert clustered["observed"] == one["observed"] == rep["observed"]
    assert abs(clustered["p_value"] - one["p_value"]) < 0.02 and rep["p_value"] < one["p_value"] / 2
    with pytest.raises(ValueError, match="cluster"):
        match_rate_permutation_test(["a", "b"], ["a", "c"], clusters=[0, 0])
