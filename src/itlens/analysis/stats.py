"""Resampling statistics shared by the analyses, the judge and the study.

Every number the study reports with a confidence interval or a p-value goes through here, so the
tests behind a finding are stated once: percentile bootstrap CIs (scipy), a paired bootstrap for
"model vs base on the same items", permutation tests (scipy) and a stratified permutation test for
"does a value equal its designed source more often than chance". All functions are deterministic
for a seed and return plain dicts of floats (JSON-ready, ``None`` where undefined).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

DEFAULT_RESAMPLES = 2000


def _as_array(values: Sequence[float] | np.ndarray) -> np.ndarray:
    arr = np.asarray(values, dtype=float)
    if arr.ndim != 1:
        raise ValueError(f"expected a 1-D sequence of numbers, got shape {arr.shape}")
    return arr


def _mean(x, axis=-1):
    return np.mean(x, axis=axis)


def bootstrap_ci(values: Sequence[float], statistic: Callable = _mean, *, confidence: float = 0.95,
                 n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0, method: str = "percentile") -> dict:
    """``{estimate, low, high, n}``: ``statistic`` of ``values`` with a bootstrap CI.

    ``statistic`` must accept an ``axis`` keyword (numpy style). With fewer than 2 values, or
    constant values, the interval collapses onto the estimate.
    """
    from scipy.stats import bootstrap

    x = _as_array(values)
    if len(x) == 0:
        return {"estimate": None, "low": None, "high": None, "n": 0}
    est = float(statistic(x, axis=-1))
    if len(x) < 2 or np.all(x == x[0]):
        return {"estimate": est, "low": est, "high": est, "n": int(len(x))}
    res = bootstrap((x,), statistic, confidence_level=confidence, n_resamples=n_resamples, method=method,
                    vectorized=True, rng=np.random.default_rng(seed))
    return {"estimate": est, "low": float(res.confidence_interval.low),
            "high": float(res.confidence_interval.high), "n": int(len(x))}


def paired_bootstrap(a: Sequence[float], b: Sequence[float], *, confidence: float = 0.95,
                     n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> dict:
    """Change ``mean(b) - mean(a)`` over paired items (same questions), with a bootstrap CI.

    Items are resampled together, so the CI reflects per-question agreement between the two
    systems (much tighter than two independent CIs). ``p_value`` is a two-sided paired
    permutation (sign-flip) test of zero mean difference.
    """
    x, y = _as_array(a), _as_array(b)
    if len(x) != len(y):
        raise ValueError(f"paired samples differ in length: {len(x)} vs {len(y)}")
    if len(x) == 0:
        return {"estimate": None, "low": None, "high": None, "n": 0, "p_value": None}
    d = y - x
    est = float(d.mean())
    out = {"estimate": est, "low": est, "high": est, "n": int(len(d))}
    if len(d) >= 2 and not np.all(d == d[0]):
        from scipy.stats import bootstrap

        res = bootstrap((d,), _mean, confidence_level=confidence, n_resamples=n_resamples,
                        method="percentile", vectorized=True, rng=np.random.default_rng(seed))
        out["low"], out["high"] = float(res.confidence_interval.low), float(res.confidence_interval.high)
    out["p_value"] = paired_permutation_test(x, y, n_resamples=n_resamples, seed=seed)["p_value"]
    return out


def paired_permutation_test(a: Sequence[float], b: Sequence[float], *, alternative: str = "two-sided",
                            n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> dict:
    """Sign-flip test of ``mean(b - a) == 0`` (scipy ``permutation_type='samples'``)."""
    x, y = _as_array(a), _as_array(b)
    d = y - x
    if len(d) == 0 or np.all(d == 0):
        return {"statistic": 0.0 if len(d) else None, "p_value": 1.0 if len(d) else None, "n": int(len(d))}
    if len(d) < 2:  # scipy needs two observations per sample: enumerate the 2^n sign flips exactly
        return {"statistic": float(d.mean()), "p_value": _exact_sign_flip_p(d, alternative), "n": int(len(d))}
    from scipy.stats import permutation_test

    res = permutation_test((x, y), lambda u, v, axis: np.mean(v - u, axis=axis), permutation_type="samples",
                           vectorized=True, n_resamples=n_resamples, alternative=alternative,
                           rng=np.random.default_rng(seed))
    return {"statistic": float(res.statistic), "p_value": float(res.pvalue), "n": int(len(d))}


def _exact_sign_flip_p(d: np.ndarray, alternative: str) -> float:
    """Exact sign-flip p-value of ``mean(d) == 0`` over all 2^n flips (scipy's exact-test rule)."""
    signs = 1 - 2 * ((np.arange(2 ** len(d))[:, None] >> np.arange(len(d))) & 1)
    null = (signs * d).mean(axis=1)
    stat = float(d.mean())
    tol = abs(stat) * np.finfo(float).eps * 100  # as scipy: values equal up to rounding count as extreme
    p_greater = float(np.mean(null >= stat - tol))
    p_less = float(np.mean(null <= stat + tol))
    if alternative == "greater":
        return p_greater
    if alternative == "less":
        return p_less
    if alternative == "two-sided":
        return min(1.0, 2 * min(p_greater, p_less))
    raise ValueError(f"unknown alternative {alternative!r}")


def permutation_test_two_sample(x: Sequence[float], y: Sequence[float], *, alternative: str = "two-sided",
                                clusters_x: Sequence | None = None, clusters_y: Sequence | None = None,
                                n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> dict:
    """Test ``mean(x) - mean(y) == 0`` for two independent samples (scipy, label shuffling).

    ``clusters_x`` / ``clusters_y``: items that are not independent (one question answered under several
    seeds) carry the same cluster key and move between the samples as one unit; the statistic stays the
    difference of item means. Keys are per sample: a key in both samples names two units.
    """
    from scipy.stats import permutation_test

    u, v = _as_array(x), _as_array(y)
    if len(u) == 0 or len(v) == 0:
        return {"statistic": None, "p_value": None, "n_x": int(len(u)), "n_y": int(len(v))}
    if clusters_x is not None or clusters_y is not None:
        return _cluster_permutation_two_sample(u, v, clusters_x, clusters_y, alternative, n_resamples, seed)
    if min(len(u), len(v)) < 2:  # scipy needs two observations per sample: enumerate the n splits exactly
        pooled = np.concatenate([u, v])
        stat = float(u.mean() - v.mean())
        others = (pooled.sum() - pooled) / (len(pooled) - 1)  # mean of the rest when item i is the lone one
        null = pooled - others if len(u) == 1 else others - pooled
        tol = 1e-12 * max(1.0, abs(stat))
        p = {"greater": np.mean(null >= stat - tol), "less": np.mean(null <= stat + tol),
             "two-sided": np.mean(np.abs(null) >= abs(stat) - tol)}[alternative]
        return {"statistic": stat, "p_value": float(p), "n_x": int(len(u)), "n_y": int(len(v))}
    res = permutation_test((u, v), lambda p, q, axis: np.mean(p, axis=axis) - np.mean(q, axis=axis),
                           permutation_type="independent", vectorized=True, n_resamples=n_resamples,
                           alternative=alternative, rng=np.random.default_rng(seed))
    return {"statistic": float(res.statistic), "p_value": float(res.pvalue), "n_x": int(len(u)), "n_y": int(len(v))}


def _cluster_permutation_two_sample(u: np.ndarray, v: np.ndarray, clusters_x: Sequence | None,
                                    clusters_y: Sequence | None, alternative: str, n_resamples: int,
                                    seed: int) -> dict:
    """Two-sample test whose exchangeable units are clusters: each cluster's sum and size move together.

    Exact (every split of the clusters) when there are at most ``n_resamples`` splits, else Monte Carlo
    with the ``(1 + hits) / (1 + n_resamples)`` p-value.
    """
    from itertools import combinations
    from math import comb

    if alternative not in ("two-sided", "greater", "less"):
        raise ValueError(f"alternative must be two-sided, greater or less, not {alternative!r}")
    keys_x = list(clusters_x) if clusters_x is not None else list(range(len(u)))
    keys_y = list(clusters_y) if clusters_y is not None else list(range(len(v)))
    if len(keys_x) != len(u) or len(keys_y) != len(v):
        raise ValueError(f"clusters have {len(keys_x)} and {len(keys_y)} entries for {len(u)} and {len(v)} items")
    unit: dict = {}
    ids = np.array([unit.setdefault(("x", k), len(unit)) for k in keys_x]
                   + [unit.setdefault(("y", k), len(unit)) for k in keys_y])
    values = np.concatenate([u, v])
    sums = np.bincount(ids, weights=values, minlength=len(unit))
    sizes = np.bincount(ids, minlength=len(unit)).astype(float)
    k_total = len(unit)
    k_x = sum(1 for key in unit if key[0] == "x")
    stat = float(u.mean() - v.mean())
    if comb(k_total, k_x) <= n_resamples:  # every split, exactly
        masks = np.zeros((comb(k_total, k_x), k_total), dtype=bool)
        for row, chosen in enumerate(combinations(range(k_total), k_x)):
            masks[row, list(chosen)] = True
        exact = True
    else:
        rng = np.random.default_rng(seed)
        order = rng.permuted(np.tile(np.arange(k_total), (n_resamples, 1)), axis=1)
        masks = np.zeros((n_resamples, k_total), dtype=bool)
        np.put_along_axis(masks, order[:, :k_x], True, axis=1)
        exact = False
    in_x = masks @ sums / (masks @ sizes)
    in_y = (~masks) @ sums / ((~masks) @ sizes)
    null = in_x - in_y
    tol = 1e-12 * max(1.0, abs(stat))
    hits = {"greater": np.sum(null >= stat - tol), "less": np.sum(null <= stat + tol),
            "two-sided": np.sum(np.abs(null) >= abs(stat) - tol)}[alternative]
    p = hits / len(null) if exact else (1 + hits) / (1 + len(null))
    return {"statistic": stat, "p_value": float(p), "n_x": int(len(u)), "n_y": int(len(v)),
            "clusters_x": int(k_x), "clusters_y": int(k_total - k_x)}


def match_rate_permutation_test(values: Sequence, references: Sequence, strata: Sequence | None = None, *,
                                clusters: Sequence | None = None, n_resamples: int = DEFAULT_RESAMPLES,
                                seed: int = 0) -> dict:
    """Is ``values[i] == references[i]`` more frequent than chance?

    Chance is estimated by shuffling the references among items of the same stratum (for borrowing:
    the same attribute), which keeps both marginal distributions and breaks only the pairing. The
    p-value is one-sided, ``(1 + #{null >= observed}) / (1 + n_resamples)``.
    ``clusters``: items that share one reference (the same question answered under several seeds) are
    shuffled as one: references move between clusters, so repeated answers to one question do not
    count as independent evidence. Every item of a cluster must have the same reference and stratum.
    With one item per cluster the test is the plain one (same draws).
    Returns ``{observed, null_mean, null_low, null_high (95% of the null), p_value, n}``.
    """
    vals = list(values)
    refs = list(references)
    if len(vals) != len(refs):
        raise ValueError(f"values and references differ in length: {len(vals)} vs {len(refs)}")
    n = len(vals)
    if n == 0:
        return {"observed": None, "null_mean": None, "null_low": None, "null_high": None, "p_value": None, "n": 0}
    strata = list(strata) if strata is not None else [0] * n
    # Encode as integers so the resampling is vectorised.
    codes: dict = {}
    v = np.array([codes.setdefault(x, len(codes)) for x in vals])
    r = np.array([codes.setdefault(x, len(codes)) for x in refs])
    observed = float(np.mean(v == r))
    rng = np.random.default_rng(seed)
    # one unit per cluster (per item without clusters), holding the cluster's reference and stratum
    unit_of: dict = {}
    item_unit = np.array([unit_of.setdefault(c, len(unit_of)) for c in (clusters if clusters is not None
                                                                        else range(n))])
    if len(item_unit) != n:
        raise ValueError(f"clusters has {len(item_unit)} entries for {n} items")
    unit_ref = np.empty(len(unit_of), dtype=r.dtype)
    unit_stratum: list = [None] * len(unit_of)
    seen = np.zeros(len(unit_of), dtype=bool)
    for i, u in enumerate(item_unit):
        if seen[u] and (unit_ref[u] != r[i] or unit_stratum[u] != strata[i]):
            raise ValueError("items of one cluster differ in reference or stratum")
        unit_ref[u], unit_stratum[u], seen[u] = r[i], strata[i], True
    groups = {}
    for u, s in enumerate(unit_stratum):
        groups.setdefault(s, []).append(u)
    perm_units = np.empty((n_resamples, len(unit_of)), dtype=r.dtype)
    for idx in groups.values():
        idx = np.asarray(idx)
        block = np.tile(unit_ref[idx], (n_resamples, 1))
        perm_units[:, idx] = rng.permuted(block, axis=1)
    null = np.mean(perm_units[:, item_unit] == v[None, :], axis=1)
    p = (1 + int(np.sum(null >= observed - 1e-12))) / (1 + n_resamples)
    return {"observed": observed, "null_mean": float(null.mean()), "null_low": float(np.quantile(null, 0.025)),
            "null_high": float(np.quantile(null, 0.975)), "p_value": float(p), "n": n}


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> dict:
    """Share ``k/n`` with the Wilson score interval (good for small n and shares near 0 or 1)."""
    from scipy.stats import norm

    if n <= 0:
        return {"estimate": None, "low": None, "high": None, "n": 0}
    z = float(norm.ppf(0.5 + confidence / 2))
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return {"estimate": p, "low": float(max(0.0, centre - half)), "high": float(min(1.0, centre + half)), "n": int(n)}
