"""Elo ratings, Bradley-Terry strengths and win rates from pairwise human (or judge) comparisons.

Accepted rows (dicts, or a ``datasets.Dataset``):

* ``{"chosen": "model-x", "rejected": "model-y"}`` (also ``chosen_model`` / ``rejected_model``), or
* ``{"model_a": "x", "model_b": "y", "winner": "model_a" | "model_b" | "a" | "b" | "tie" | <a model name>}``,
* or ``(winner, loser)`` tuples.

Ties count half a win for each side. Elo is sequential (order matters, as in an arena); Bradley-Terry is the
order-free maximum-likelihood fit of the same model, reported on the Elo scale.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from typing import Any, Iterable

__all__ = ["to_games", "expected_score", "elo_ratings", "win_rates", "win_matrix", "bradley_terry",
           "bootstrap_ratings", "leaderboard"]

_TIES = {"tie", "draw", "both", "neither", "equal", "tie (bothbad)", "0.5"}


def to_games(rows: Iterable[Any], model_a_key: str = "model_a", model_b_key: str = "model_b",
             winner_key: str = "winner") -> list[tuple[str, str, float]]:
    """Normalise rows to ``(a, b, score_a)`` games, score_a in {1, 0.5, 0}."""
    games = []
    for i, r in enumerate(rows):
        if isinstance(r, (tuple, list)):
            if len(r) == 2:
                games.append((str(r[0]), str(r[1]), 1.0))
                continue
            if len(r) == 3:
                games.append((str(r[0]), str(r[1]), float(r[2])))
                continue
            raise ValueError(f"row {i}: tuples are (winner, loser) or (a, b, score_a)")
        if "chosen" in r and "rejected" in r and isinstance(r["chosen"], str) and isinstance(r["rejected"], str):
            games.append((r["chosen"], r["rejected"], 1.0))
            continue
        if "chosen_model" in r and "rejected_model" in r:
            games.append((str(r["chosen_model"]), str(r["rejected_model"]), 1.0))
            continue
        if model_a_key in r and model_b_key in r and winner_key in r:
            a, b, w = str(r[model_a_key]), str(r[model_b_key]), r[winner_key]
            ws = str(w).strip().lower() if w is not None else "tie"
            if ws in (model_a_key.lower(), "a", "model_a", "left", "1") or str(w) == a and a != b:
                s = 1.0
            elif ws in (model_b_key.lower(), "b", "model_b", "right", "2") or str(w) == b:
                s = 0.0
            elif ws in _TIES:
                s = 0.5
            else:
                raise ValueError(f"row {i}: winner {w!r} is neither {a!r}, {b!r}, a/b nor a tie")
            games.append((a, b, s))
            continue
        raise ValueError(f"row {i}: need chosen/rejected names or {model_a_key}/{model_b_key}/{winner_key}: {r!r}")
    return games


def expected_score(r_a: float, r_b: float, scale: float = 400.0, base: float = 10.0) -> float:
    """Elo expected score of A against B: ``1 / (1 + base ** ((r_b - r_a) / scale))``."""
    return 1.0 / (1.0 + base ** ((r_b - r_a) / scale))


def elo_ratings(rows: Iterable[Any], k: float = 32.0, initial: float = 1000.0, scale: float = 400.0,
                base: float = 10.0, **keys) -> dict[str, float]:
    """Sequential Elo: for each game, ``R_a += k (S_a - E_a)``, ``R_b -= k (S_a - E_a)`` (both use the pre-game
    ratings). Everyone starts at ``initial``. Returns ``{name: rating}`` sorted best first."""
    games = to_games(rows, **keys) if not _is_games(rows) else rows
    r: dict[str, float] = defaultdict(lambda: float(initial))
    for a, b, s in games:
        e = expected_score(r[a], r[b], scale, base)
        r[a], r[b] = r[a] + k * (s - e), r[b] - k * (s - e)
    return dict(sorted(r.items(), key=lambda kv: -kv[1]))


def _is_games(rows) -> bool:
    return isinstance(rows, list) and all(isinstance(g, tuple) and len(g) == 3 and isinstance(g[2], float) for g in rows) \
        and bool(rows)


def win_rates(rows: Iterable[Any], **keys) -> dict[str, dict]:
    """``{name: {"wins", "losses", "ties", "games", "win_rate"}}`` with win_rate = (wins + ties/2) / games."""
    games = to_games(rows, **keys) if not _is_games(rows) else rows
    st: dict[str, dict] = defaultdict(lambda: {"wins": 0, "losses": 0, "ties": 0, "games": 0})
    for a, b, s in games:
        for name, sc in ((a, s), (b, 1.0 - s)):
            d = st[name]
            d["games"] += 1
            if sc == 1.0:
                d["wins"] += 1
            elif sc == 0.0:
                d["losses"] += 1
            else:
                d["ties"] += 1
    out = {}
    for name, d in st.items():
        d = dict(d)
        d["win_rate"] = (d["wins"] + 0.5 * d["ties"]) / d["games"]
        out[name] = d
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["win_rate"]))


def win_matrix(rows: Iterable[Any], **keys) -> tuple[list[str], list[list[float | None]]]:
    """(names, M) with M[i][j] = win rate of names[i] against names[j] (ties half), None when they never met."""
    games = to_games(rows, **keys) if not _is_games(rows) else rows
    names = sorted({g[0] for g in games} | {g[1] for g in games})
    idx = {n: i for i, n in enumerate(names)}
    w = [[0.0] * len(names) for _ in names]
    n = [[0] * len(names) for _ in names]
    for a, b, s in games:
        i, j = idx[a], idx[b]
        w[i][j] += s
        w[j][i] += 1.0 - s
        n[i][j] += 1
        n[j][i] += 1
    return names, [[(w[i][j] / n[i][j]) if n[i][j] else None for j in range(len(names))] for i in range(len(names))]


def bradley_terry(rows: Iterable[Any], initial: float = 1000.0, scale: float = 400.0, base: float = 10.0,
                  max_iter: int = 1000, tol: float = 1e-9, prior: float = 0.5, **keys) -> dict[str, float]:
    """Bradley-Terry maximum likelihood (Hunter's MM algorithm) on the Elo scale, mean rating = ``initial``.

    ``P(a beats b) = 1 / (1 + base ** ((R_b - R_a) / scale))``, the same curve as Elo. Ties count half a win each.
    ``prior``: each player gets ``2 * prior`` virtual games against a reference opponent of mean strength, half
    of them won; this keeps an undefeated (or winless) player finite. 0 gives the plain MLE.
    """
    games = to_games(rows, **keys) if not _is_games(rows) else rows
    names = sorted({g[0] for g in games} | {g[1] for g in games})
    if not names:
        return {}
    idx = {n: i for i, n in enumerate(names)}
    m = len(names)
    wins = [prior] * m
    pair_n: dict[tuple[int, int], float] = defaultdict(float)
    for a, b, s in games:
        i, j = idx[a], idx[b]
        wins[i] += s
        wins[j] += 1.0 - s
        pair_n[(min(i, j), max(i, j))] += 1.0
    p = [1.0] * m
    for _ in range(max_iter):
        denom = [2 * prior / (p[i] + 1.0) if prior else 0.0 for i in range(m)]  # virtual games vs strength 1
        for (i, j), nij in pair_n.items():
            d = nij / (p[i] + p[j])
            denom[i] += d
            denom[j] += d
        new = [wins[i] / denom[i] if denom[i] > 0 else p[i] for i in range(m)]
        g = math.exp(sum(math.log(max(x, 1e-300)) for x in new) / m)  # geometric-mean normalisation
        new = [x / g for x in new]
        delta = max(abs(math.log(max(a, 1e-300)) - math.log(max(b, 1e-300))) for a, b in zip(new, p))
        p = new
        if delta < tol:
            break
    ratings = {n: initial + scale * math.log(max(p[idx[n]], 1e-300), base) for n in names}
    return dict(sorted(ratings.items(), key=lambda kv: -kv[1]))


def bootstrap_ratings(rows: Iterable[Any], method: str = "elo", rounds: int = 200, ci: float = 0.95, seed: int = 0,
                      **kwargs) -> dict[str, dict]:
    """Bootstrap confidence intervals: resample games with replacement ``rounds`` times (Elo: also in a new random
    order each round, as LMSYS does) and take percentiles.

    Returns ``{name: {"rating": point estimate on all data, "median", "lower", "upper"}}`` sorted by rating.
    ``kwargs`` go to :func:`elo_ratings` / :func:`bradley_terry` (k, initial, scale, ...).
    """
    keys = {k: kwargs.pop(k) for k in ("model_a_key", "model_b_key", "winner_key") if k in kwargs}
    games = to_games(rows, **keys) if not _is_games(rows) else rows
    fn = {"elo": elo_ratings, "bt": bradley_terry, "bradley_terry": bradley_terry}.get(method)
    if fn is None:
        raise ValueError("method must be 'elo' or 'bt'")
    point = fn(games, **kwargs)
    rng = random.Random(seed)
    samples: dict[str, list[float]] = defaultdict(list)
    initial = kwargs.get("initial", 1000.0)
    for _ in range(rounds):
        boot = [games[rng.randrange(len(games))] for _ in games]
        r = fn(boot, **kwargs)
        for n in point:
            samples[n].append(r.get(n, initial))
    lo_q, hi_q = (1 - ci) / 2, 1 - (1 - ci) / 2

    def q(xs, p):
        xs = sorted(xs)
        pos = p * (len(xs) - 1)
        f = math.floor(pos)
        c = min(f + 1, len(xs) - 1)
        return xs[f] + (xs[c] - xs[f]) * (pos - f)

    out = {n: {"rating": point[n], "median": q(samples[n], 0.5), "lower": q(samples[n], lo_q),
               "upper": q(samples[n], hi_q)} for n in point}
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["rating"]))


def leaderboard(rows: Iterable[Any], k: float = 32.0, initial: float = 1000.0, bt: bool = True,
                bootstrap_rounds: int = 0, seed: int = 0, **keys) -> list[dict]:
    """One row per system, best Elo first: name, elo, (bt), wins, losses, ties, games, win_rate (+ elo_lower/upper)."""
    games = to_games(rows, **keys)
    elo = elo_ratings(games, k=k, initial=initial)
    wr = win_rates(games)
    btr = bradley_terry(games, initial=initial) if bt else {}
    ci = bootstrap_ratings(games, "elo", rounds=bootstrap_rounds, seed=seed, k=k, initial=initial) \
        if bootstrap_rounds else {}
    out = []
    for name, rating in elo.items():
        row = {"name": name, "elo": rating, **wr[name]}
        if bt:
            row["bt"] = btr[name]
        if ci:
            row["elo_lower"], row["elo_upper"] = ci[name]["lower"], ci[name]["upper"]
        out.append(row)
    return out
