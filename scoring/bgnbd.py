"""The BG/NBD model of Fader, Hardie and Lee (2005), fitted by maximum likelihood.

"Counting your customers the easy way: an alternative to the Pareto/NBD model",
Marketing Science 24(2). Each customer buys at a Poisson rate λ ~ Gamma(r, α) while alive
and drops out after any purchase with probability p ~ Beta(a, b). The summary per customer
is ``x`` (repeat purchases), ``t_x`` (time of the last purchase since the first) and ``T``
(time from the first purchase to the end of the calibration period). We implement it here
because the ``lifetimes`` package is unmaintained.

Time is in weeks, as in the paper, so the fitted parameters are comparable with it
(``scoring.features.bgnbd_columns`` converts the feature store's days).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy.optimize import minimize
from scipy.special import betaln, gammaln, hyp2f1

FloatArray = npt.NDArray[np.float64]

DAYS_PER_WEEK = 7.0


class BgNbdFitError(RuntimeError):
    """The likelihood maximisation did not converge."""


@dataclass(frozen=True)
class BgNbdParams:
    """Fitted BG/NBD parameters (time unit: weeks)."""

    r: float
    alpha: float
    a: float
    b: float
    log_likelihood: float
    n_customers: int

    def as_dict(self) -> dict[str, float]:
        """The four parameters, for the registry's meta."""
        return {"r": self.r, "alpha": self.alpha, "a": self.a, "b": self.b}


def _as_arrays(
    x: npt.ArrayLike, t_x: npt.ArrayLike, big_t: npt.ArrayLike
) -> tuple[FloatArray, FloatArray, FloatArray]:
    xs = np.asarray(x, dtype=np.float64)
    txs = np.asarray(t_x, dtype=np.float64)
    ts = np.asarray(big_t, dtype=np.float64)
    if not xs.shape == txs.shape == ts.shape:
        raise ValueError("x, t_x and T must have the same shape")
    if (xs < 0).any() or (txs < 0).any() or (txs > ts + 1e-9).any():
        raise ValueError("need x >= 0 and 0 <= t_x <= T")
    return xs, txs, ts


def log_likelihood(
    r: float, alpha: float, a: float, b: float, x: FloatArray, t_x: FloatArray, big_t: FloatArray
) -> FloatArray:
    """Per-customer BG/NBD log-likelihood (FHL 2005, equation 6)."""
    common = gammaln(r + x) - gammaln(r) + r * np.log(alpha)
    alive = betaln(a, b + x) - betaln(a, b) - (r + x) * np.log(alpha + big_t)
    repeat = x > 0
    # The "dropped out after the last purchase" term exists only after a repeat purchase;
    # np.where keeps betaln away from b + x - 1 < b for x = 0.
    dead = np.where(
        repeat,
        betaln(a + 1.0, np.where(repeat, b + x - 1.0, b))
        - betaln(a, b)
        - (r + x) * np.log(alpha + t_x),
        -np.inf,
    )
    result: FloatArray = common + np.logaddexp(alive, dead)
    return result


def fit(
    x: npt.ArrayLike, t_x: npt.ArrayLike, big_t: npt.ArrayLike, *, penalty: float = 0.0
) -> BgNbdParams:
    """Maximise the BG/NBD likelihood of the summaries (time in weeks).

    Optimises the log-parameters with L-BFGS-B from the paper's CDNOW estimates, so the
    result is deterministic. ``penalty`` adds an L2 term on the log-parameters (0 = pure MLE).
    """
    xs, txs, ts = _as_arrays(x, t_x, big_t)

    def objective(log_params: FloatArray) -> float:
        r, alpha, a, b = np.exp(log_params)
        total = float(log_likelihood(r, alpha, a, b, xs, txs, ts).sum())
        return -total / len(xs) + penalty * float(np.square(log_params).sum())

    start = np.log(np.array([0.243, 4.414, 0.793, 2.426]))
    result = minimize(
        objective, start, method="L-BFGS-B", bounds=[(-10.0, 10.0)] * 4, options={"maxiter": 500}
    )
    if not result.success:
        raise BgNbdFitError(f"BG/NBD fit did not converge: {result.message}")
    r, alpha, a, b = (float(v) for v in np.exp(result.x))
    ll = float(log_likelihood(r, alpha, a, b, xs, txs, ts).sum())
    return BgNbdParams(r, alpha, a, b, ll, len(xs))


def _odds_dead(
    params: BgNbdParams, x: FloatArray, t_x: FloatArray, big_t: FloatArray
) -> FloatArray:
    # P(dropped out after the last purchase) / P(alive) given the history; 0 without repeats.
    repeat = x > 0
    ratio = params.a / np.where(repeat, params.b + x - 1.0, 1.0)
    odds: FloatArray = np.where(
        repeat, ratio * ((params.alpha + big_t) / (params.alpha + t_x)) ** (params.r + x), 0.0
    )
    return odds


def p_alive(
    params: BgNbdParams, x: npt.ArrayLike, t_x: npt.ArrayLike, big_t: npt.ArrayLike
) -> FloatArray:
    """P(still alive at ``T``) given the history (FHL 2005, equation 11 / the note's (2))."""
    xs, txs, ts = _as_arrays(x, t_x, big_t)
    result: FloatArray = 1.0 / (1.0 + _odds_dead(params, xs, txs, ts))
    return result


def expected_purchases(
    params: BgNbdParams,
    x: npt.ArrayLike,
    t_x: npt.ArrayLike,
    big_t: npt.ArrayLike,
    horizon: float,
) -> FloatArray:
    """E[purchases in (T, T + horizon] | history] (FHL 2005, equation 10)."""
    xs, txs, ts = _as_arrays(x, t_x, big_t)
    r, alpha, a, b = params.r, params.alpha, params.a, params.b
    z = horizon / (alpha + ts + horizon)
    hyper = hyp2f1(r + xs, b + xs, a + b + xs - 1.0, z)
    numerator = (
        (a + b + xs - 1.0)
        / (a - 1.0)
        * (1.0 - ((alpha + ts) / (alpha + ts + horizon)) ** (r + xs) * hyper)
    )
    result: FloatArray = numerator / (1.0 + _odds_dead(params, xs, txs, ts))
    return result


def p_purchase(
    params: BgNbdParams,
    x: npt.ArrayLike,
    t_x: npt.ArrayLike,
    big_t: npt.ArrayLike,
    horizon: float,
) -> FloatArray:
    """P(at least one purchase in (T, T + horizon] | history).

    Dropout happens only right after a purchase, so an alive customer stays alive until
    the next one; given alive, λ's posterior is Gamma(r + x, α + T), whence
    P(no purchase | alive) = ((α + T) / (α + T + horizon)) ** (r + x).
    """
    return serving_summaries(params, x, t_x, big_t, horizon)[0]


def serving_summaries(
    params: BgNbdParams,
    x: npt.ArrayLike,
    t_x: npt.ArrayLike,
    big_t: npt.ArrayLike,
    horizon: float,
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """P(purchase within ``horizon``), P(alive) and expected purchases if alive throughout.

    The third is P(alive) · E[λ | alive] · horizon with E[λ | alive] = (r + x) / (α + T):
    :func:`expected_purchases` without future dropout, an upper bound of it that needs no
    hypergeometric function. All three are cheap enough to compute at scoring time.
    """
    xs, txs, ts = _as_arrays(x, t_x, big_t)
    alive: FloatArray = 1.0 / (1.0 + _odds_dead(params, xs, txs, ts))
    none_if_alive = ((params.alpha + ts) / (params.alpha + ts + horizon)) ** (params.r + xs)
    rate = (params.r + xs) / (params.alpha + ts)
    return alive * (1.0 - none_if_alive), alive, alive * rate * horizon
