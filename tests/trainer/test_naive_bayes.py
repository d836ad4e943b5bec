"""The plug-in naive Bayes decoder: with plenty of train presentations it reaches the Bayes decoder that knows
the true parameters, on the same test presentations; an absent unit counts for nothing."""

from __future__ import annotations

import numpy as np
import pytest

from trainer.naive_bayes import fit_naive_bayes, log_likelihood, predict_naive_bayes


def poisson_case(n: int, seed: int, n_classes: int = 5, n_units: int = 12) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Counts of independent Poisson units with class-dependent rates (some units near silent)."""
    rng = np.random.default_rng(seed)
    rates = rng.gamma(1.0, 1.0, (n_classes, n_units))
    rates[:, :2] = 0.01  # units that are silent in most presentations
    y = rng.integers(0, n_classes, n)
    return rng.poisson(rates[y]).astype(float), y, rates


def gauss_case(n: int, seed: int, n_classes: int = 5, n_units: int = 12):
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 0.4, (n_classes, n_units))
    sd = rng.uniform(0.5, 2.0, n_units)
    y = rng.integers(0, n_classes, n)
    return means[y] + sd * rng.normal(size=(n, n_units)), y, means, sd


def test_poisson_plug_in_reaches_the_true_rate_decoder_given_enough_data():
    xtr, ytr, rates = poisson_case(4000, seed=0)
    rng = np.random.default_rng(1)  # test presentations from the same rates
    yte = rng.integers(0, 5, 4000)
    xte = rng.poisson(rates[yte]).astype(float)
    ideal = float(((xte @ np.log(rates).T - rates.sum(1)).argmax(1) == yte).mean())
    model = fit_naive_bayes(xtr, ytr, 5, shrink=1.0, kind="poisson")
    acc = float((predict_naive_bayes(model, xte) == yte).mean())
    assert ideal > 0.5  # far above chance (0.2): the case is informative
    assert acc >= ideal - 0.02, f"plug-in {acc:.3f} vs true-rate Bayes {ideal:.3f}"
    assert np.isfinite(log_likelihood(model, xte)).all()  # silent units cost no infinity


def test_poisson_plug_in_with_few_presentations_is_below_the_true_rate_decoder():
    """The gap the pretrained model is there to close: 3 presentations per class are not enough to learn rates."""
    rates = poisson_case(1, seed=0)[2]
    xtr, ytr, _ = poisson_case(15, seed=0)
    rng = np.random.default_rng(1)
    yte = rng.integers(0, 5, 4000)
    xte = rng.poisson(rates[yte]).astype(float)
    ideal = float(((xte @ np.log(rates).T - rates.sum(1)).argmax(1) == yte).mean())
    acc = float((predict_naive_bayes(fit_naive_bayes(xtr, ytr, 5, 1.0, "poisson"), xte) == yte).mean())
    assert acc < ideal - 0.02


def test_gaussian_plug_in_reaches_the_true_parameter_decoder_given_enough_data():
    _, _, means, sd = gauss_case(1, seed=3)
    xtr, ytr, _, _ = gauss_case(6000, seed=3)
    rng = np.random.default_rng(4)
    yte = rng.integers(0, 5, 4000)
    xte = means[yte] + sd * rng.normal(size=(4000, means.shape[1]))
    true = (-(((xte[:, None, :] - means[None]) / sd) ** 2).sum(2)).argmax(1)
    ideal = float((true == yte).mean())
    acc = float((predict_naive_bayes(fit_naive_bayes(xtr, ytr, 5, 1.0, "gauss"), xte) == yte).mean())
    assert ideal > 0.5
    assert acc >= ideal - 0.02, f"plug-in {acc:.3f} vs true-parameter Bayes {ideal:.3f}"


@pytest.mark.parametrize("kind", ["poisson", "gauss"])
def test_an_absent_unit_counts_for_nothing(kind):
    """A presentation with NaN units is decoded as by a decoder that never had those units."""
    x, y, *_ = poisson_case(600, seed=5) if kind == "poisson" else gauss_case(600, seed=5)
    model = fit_naive_bayes(x, y, 5, 1.0, kind)
    probe = x[:50].copy()
    probe[:, [3, 7]] = np.nan
    keep = [u for u in range(x.shape[1]) if u not in (3, 7)]
    sub = fit_naive_bayes(x[:, keep], y, 5, 1.0, kind)
    full_ll, sub_ll = log_likelihood(model, probe), log_likelihood(sub, probe[:, keep])
    np.testing.assert_allclose(full_ll - full_ll[:, :1], sub_ll - sub_ll[:, :1], rtol=1e-9, atol=1e-9)
