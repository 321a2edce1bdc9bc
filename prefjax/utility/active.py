"""Active learning of Thurstonian utilities.

Start from a random (near) d-regular comparison graph; then repeatedly propose a batch of new pairs from
the intersection of (a) the pairs with the closest fitted utilities and (b) the pairs whose tasks have the
fewest comparisons so far, refit after each batch, and stop when two successive fits agree (Spearman rank
correlation >= threshold) or the budget is spent.

Candidates are never enumerated over all n^2 pairs: tasks are sorted by mu and each is paired with its
``window`` neighbours on either side, so a million tasks cost ``window`` million candidates.

The learner's state is plain data (:class:`ActiveState`, numpy arrays + scalars, ``to_dict``/``from_dict``).
The random stream of round ``r`` is ``np.random.default_rng([seed, r])``, so a learner rebuilt from a saved
state proposes exactly what the original would have.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np
from scipy.stats import spearmanr

from prefjax.utility.thurstonian import ThurstonianFit, fit_thurstonian


@dataclasses.dataclass(frozen=True)
class ActiveConfig:
    """Knobs of the active learner. ``fit_options`` are passed to :func:`fit_thurstonian` (as a tuple of
    ``(name, value)`` pairs, so the config stays hashable)."""

    seed: int = 0
    degree: int = 4
    frac_closest: float = 0.2
    frac_least: float = 0.3
    window: int = 10
    spearman_threshold: float = 0.99
    relax_factor: float = 1.5
    fit_options: tuple = ()


@dataclasses.dataclass
class ActiveState:
    """Everything needed to resume: the comparisons so far, the last two fits, the round counter."""

    n_tasks: int
    round: int = 0
    i: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))
    j: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))
    wins_i: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.float64))
    wins_j: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.float64))
    mu: np.ndarray | None = None
    sigma: np.ndarray | None = None
    spearman: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.float64))
    done: bool = False

    def to_dict(self) -> dict[str, np.ndarray]:
        """Numpy arrays only (scalars as 0-d arrays; a missing fit as empty arrays)."""
        empty = np.zeros(0, np.float64)
        return {"n_tasks": np.int64(self.n_tasks), "round": np.int64(self.round), "i": self.i, "j": self.j,
                "wins_i": self.wins_i, "wins_j": self.wins_j,
                "mu": empty if self.mu is None else self.mu, "sigma": empty if self.sigma is None else self.sigma,
                "spearman": self.spearman, "done": np.bool_(self.done)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ActiveState":
        mu, sigma = np.asarray(d["mu"]), np.asarray(d["sigma"])
        return cls(n_tasks=int(d["n_tasks"]), round=int(d["round"]), i=np.asarray(d["i"]),
                   j=np.asarray(d["j"]), wins_i=np.asarray(d["wins_i"]), wins_j=np.asarray(d["wins_j"]),
                   mu=mu if mu.size else None, sigma=sigma if sigma.size else None,
                   spearman=np.asarray(d["spearman"]), done=bool(d["done"]))


def regular_graph(n_tasks: int, degree: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random graph where (almost) every task has ``degree`` partners: ``degree // 2`` random Hamiltonian
    cycles plus a random perfect matching when ``degree`` is odd; duplicate edges are dropped."""
    if degree < 1 or degree >= n_tasks:
        raise ValueError(f"degree must be in 1..{n_tasks - 1}, got {degree}")
    ii, jj = [], []
    for _ in range(degree // 2):
        p = rng.permutation(n_tasks)
        ii.append(p), jj.append(np.roll(p, -1))
    if degree % 2:
        p = rng.permutation(n_tasks)
        m = n_tasks // 2 * 2
        ii.append(p[0:m:2]), jj.append(p[1:m:2])
    i, j = np.concatenate(ii), np.concatenate(jj)
    _, first = np.unique(_pair_key(i, j, n_tasks), return_index=True)
    first = np.sort(first)
    return i[first], j[first]


def _pair_key(i, j, n):
    i, j = np.asarray(i, np.int64), np.asarray(j, np.int64)
    return np.minimum(i, j) * n + np.maximum(i, j)


class ActiveLearner:
    """Propose pairs, take their outcomes, refit. See the module docstring."""

    def __init__(self, n_tasks: int, config: ActiveConfig = ActiveConfig(), state: ActiveState | None = None):
        if n_tasks < 3:
            raise ValueError(f"n_tasks must be >= 3, got {n_tasks}")
        self.config = config
        self.state = state if state is not None else ActiveState(n_tasks=int(n_tasks))
        if self.state.n_tasks != n_tasks:
            raise ValueError(f"state has n_tasks={self.state.n_tasks}, learner was given {n_tasks}")
        self.fit: ThurstonianFit | None = None

    @property
    def n_tasks(self) -> int:
        return self.state.n_tasks

    @property
    def done(self) -> bool:
        """True once two successive fits agreed (Spearman >= threshold)."""
        return self.state.done

    def _rng(self) -> np.random.Generator:
        return np.random.default_rng([self.config.seed, self.state.round])

    def propose(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Up to ``k`` new pairs ``(i, j)``. The first call (no comparisons yet) returns the whole initial
        d-regular graph, whatever ``k``. Pairs already compared are not proposed again."""
        st, cfg, rng = self.state, self.config, self._rng()
        n = st.n_tasks
        if st.mu is None:
            return regular_graph(n, cfg.degree, rng)
        order = np.argsort(st.mu, kind="stable")
        w = min(cfg.window, n - 1)
        a = np.concatenate([order[:-o] for o in range(1, w + 1)])
        b = np.concatenate([order[o:] for o in range(1, w + 1)])
        new = ~np.isin(_pair_key(a, b, n), _pair_key(st.i, st.j, n))
        a, b = a[new], b[new]
        if a.size == 0:
            return a, b
        gap = np.abs(st.mu[a] - st.mu[b])
        count = np.bincount(st.i, minlength=n) + np.bincount(st.j, minlength=n)
        fc, fl = cfg.frac_closest, cfg.frac_least
        while True:
            close = gap <= np.quantile(gap, fc)
            few = count <= np.quantile(count, fl)
            pick = np.flatnonzero(close & few[a] & few[b])
            if pick.size >= k or (fc >= 1 and fl >= 1):
                break
            fc, fl = min(1.0, fc * cfg.relax_factor), min(1.0, fl * cfg.relax_factor)
        if pick.size > k:
            pick = np.sort(rng.choice(pick, size=k, replace=False))
        # random orientation, so no task sits on one side systematically
        flip = rng.random(pick.size) < 0.5
        i, j = np.where(flip, b[pick], a[pick]), np.where(flip, a[pick], b[pick])
        return i.astype(np.int64), j.astype(np.int64)

    def update(self, i, j, wins_i, wins_j) -> ThurstonianFit:
        """Add the outcomes of a batch and refit (warm-started from the last fit)."""
        st = self.state
        i, j = np.asarray(i, np.int64), np.asarray(j, np.int64)
        wins_i, wins_j = np.asarray(wins_i, np.float64), np.asarray(wins_j, np.float64)
        if not (len(i) == len(j) == len(wins_i) == len(wins_j)):
            raise ValueError(f"update: mismatched lengths i={len(i)} j={len(j)} wins_i={len(wins_i)} "
                             f"wins_j={len(wins_j)}")
        st.i, st.j = np.concatenate([st.i, i]), np.concatenate([st.j, j])
        st.wins_i, st.wins_j = np.concatenate([st.wins_i, wins_i]), np.concatenate([st.wins_j, wins_j])
        init = None if st.mu is None else (st.mu, st.sigma)
        fit = fit_thurstonian(st.i, st.j, st.wins_i, st.wins_j, st.n_tasks, init=init,
                              **dict(self.config.fit_options))
        if st.mu is not None:
            rho = float(spearmanr(st.mu, fit.mu)[0])
            st.spearman = np.append(st.spearman, rho)
            st.done = rho >= self.config.spearman_threshold
        st.mu, st.sigma = fit.mu, fit.sigma
        st.round += 1
        self.fit = fit
        return fit


def run_active(oracle_fn: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]], n_tasks: int, *,
               budget: int, batch_size: int, config: ActiveConfig = ActiveConfig(),
               state: ActiveState | None = None, max_rounds: int | None = None,
               stop_on_agreement: bool = True) -> ActiveLearner:
    """Drive an :class:`ActiveLearner` with ``oracle_fn(i, j) -> (wins_i, wins_j)`` until the fits agree,
    ``budget`` pairs were compared, or ``max_rounds`` rounds ran (counted from the given ``state``)."""
    learner = ActiveLearner(n_tasks, config, state)
    rounds = 0
    while len(learner.state.i) < budget and (max_rounds is None or rounds < max_rounds):
        if stop_on_agreement and learner.done:
            break
        k = min(batch_size, budget - len(learner.state.i))
        i, j = learner.propose(k)
        if learner.state.mu is None:
            i, j = i[:budget], j[:budget]
        if len(i) == 0:
            break
        learner.update(i, j, *oracle_fn(i, j))
        rounds += 1
    return learner
