"""Pure aggregation of a Label Studio JSON export: one vote per rater per task, majority, agreement.

No server and no I/O here, so every rule is unit-testable:
- Label Studio does not enforce ``maximum_annotations`` or distinct raters on API posts, and the SDK retries
  POSTs: a rater may have several annotations on one task. Only the rater's LATEST annotation counts (by
  ``updated_at``/``created_at``, then id); the others are reported as duplicates.
- A latest annotation that was cancelled (skipped) or has no usable result gives no vote, and is counted.
- Tasks with more distinct raters than configured are kept (every rater's vote counts) and reported.
- Pairs: the winner needs a strict majority, more than half of the votes (an exact tie for first place: a tie;
  a plurality without a majority, e.g. L, L, R, both-bad: no majority) and at least ``min_votes`` votes (else:
  too few votes). A "both bad" or an "about the same" (tie) majority drops the pair (counted).
- Per rater: how often their vote matched the task's majority (tasks with a majority only): the rater who
  disagrees most is the first thing a lead checks.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

from .agreement import fleiss_kappa, krippendorff_alpha, nan_to_none, percent_agreement
from .configs import BOTH_BAD, PAIRWISE_FROM, RATING_A, RATING_B, RATING_FROM, TIE, VERDICT

PAIR_CATEGORIES = ("left", "right", BOTH_BAD, TIE)


def rater_id(completed_by: Any) -> Any:
    """``completed_by`` is a plain int in the JSON export, a dict in some API answers."""
    if isinstance(completed_by, dict):
        return completed_by.get("id", completed_by.get("email"))
    return completed_by


def _results(ann: dict) -> list[dict]:
    return [r for r in (ann.get("result") or []) if isinstance(r, dict)]


def pair_vote(ann: dict) -> str | None:
    """"left" | "right" | "both_bad" | "tie" | None (no usable choice) for one annotation.

    The choice row (``verdict``: a key or a button) wins over an image click (``pref``) in the same annotation:
    it is the deliberate answer, and the only one that can say "tie" or "both bad". Older projects' "both bad"
    checkbox (``both_bad``) still counts."""
    selected = verdict = None
    for r in _results(ann):
        value = r.get("value") or {}
        if r.get("from_name") == VERDICT and value.get("choices"):
            choice = value["choices"][0]
            verdict = choice if choice in PAIR_CATEGORIES else verdict
        if r.get("from_name") == BOTH_BAD and value.get("choices"):
            verdict = verdict or BOTH_BAD
        if r.get("type") == "pairwise" and r.get("from_name", PAIRWISE_FROM) == PAIRWISE_FROM:
            if value.get("selected") in ("left", "right"):
                selected = value["selected"]
    return verdict or selected


def rating_of(ann: dict, from_name: str = RATING_FROM) -> float | None:
    for r in _results(ann):
        if r.get("type") == "rating" and r.get("from_name") == from_name:
            v = (r.get("value") or {}).get("rating")
            if isinstance(v, (int, float)):
                return float(v)
    return None


@dataclass
class TaskVotes:
    task_id: int
    data: dict
    votes: dict = field(default_factory=dict)        # rater -> value (latest, usable)
    latest: dict = field(default_factory=dict)       # rater -> latest annotation
    skipped: int = 0                                  # raters whose latest annotation was cancelled or empty
    duplicates: int = 0                               # annotations beyond the first per rater
    raters: int = 0                                   # distinct raters with any annotation


def collect(task: dict, extract: Callable[[dict], Any]) -> TaskVotes:
    """Keep each rater's latest annotation on ``task`` and turn it into a vote with ``extract``."""
    tv = TaskVotes(task_id=task.get("id"), data=task.get("data") or {})
    by_rater: dict[Any, list[dict]] = {}
    for ann in task.get("annotations") or []:
        by_rater.setdefault(rater_id(ann.get("completed_by")), []).append(ann)
    for rater, anns in by_rater.items():
        anns.sort(key=lambda a: (a.get("updated_at") or a.get("created_at") or "", a.get("id") or 0))
        tv.duplicates += len(anns) - 1
        latest = anns[-1]
        tv.latest[rater] = latest
        value = None if latest.get("was_cancelled") else extract(latest)
        if value is None:
            tv.skipped += 1
        else:
            tv.votes[rater] = value
    tv.raters = len(by_rater)
    return tv


def _common_report(tvs: list[TaskVotes], max_raters: int) -> dict:
    hist = Counter()
    per_rater = Counter()
    for tv in tvs:
        n = len(tv.votes)
        hist[str(n) if n <= max_raters else f">{max_raters}"] += 1
        per_rater.update(tv.votes.keys())
    return {
        "tasks": len(tvs),
        "annotations": sum(len(tv.latest) + tv.duplicates for tv in tvs),
        "votes": sum(len(tv.votes) for tv in tvs),
        "skipped_annotations": sum(tv.skipped for tv in tvs),
        "duplicate_annotations": sum(tv.duplicates for tv in tvs),
        "tasks_with_duplicates": sum(1 for tv in tvs if tv.duplicates),
        "tasks_over_limit": sum(1 for tv in tvs if tv.raters > max_raters),
        "max_raters": max_raters,
        "tasks_by_votes": {k: hist.get(k, 0) for k in [str(i) for i in range(max_raters + 1)] + [f">{max_raters}"]},
        "votes_per_rater": dict(sorted(per_rater.items(), key=lambda kv: str(kv[0]))),
    }


def _agreement(units: list[list], categories, max_raters: int, metric: str) -> dict:
    full = [u for u in units if len(u) == max_raters]
    counts = [[u.count(c) for c in categories] for u in full]
    return {
        "fleiss_kappa": nan_to_none(fleiss_kappa(counts)) if counts and max_raters >= 2 else None,
        "fleiss_items": len(full),
        "krippendorff_alpha": nan_to_none(krippendorff_alpha(units, metric=metric)),
        "alpha_metric": metric,
        "alpha_items": sum(1 for u in units if len(u) >= 2),
        "percent_agreement": nan_to_none(percent_agreement(units)),
    }


def _rater_agreement(pairs: list[tuple]) -> dict:
    """{rater: {"tasks", "agree", "rate"}} from (rater, agreed) pairs, the least agreeing rater first."""
    tasks, agree = Counter(), Counter()
    for rater, agreed in pairs:
        tasks[rater] += 1
        agree[rater] += bool(agreed)
    per = {r: {"tasks": tasks[r], "agree": agree[r], "rate": round(agree[r] / tasks[r], 4)} for r in tasks}
    return dict(sorted(per.items(), key=lambda kv: (kv[1]["rate"], str(kv[0]))))


def aggregate_pairs(tasks: list[dict], max_raters: int = 3, min_votes: int = 2) -> tuple[list[dict], dict]:
    """Rows ``pair_id, task_id, prompt, chosen_side, votes, n_votes, agreement, ..., raters, rater_choices`` (each
    rater's vote as ``chosen`` / ``rejected`` / ``both_bad``) and a report."""
    tvs = [collect(t, pair_vote) for t in tasks]
    rows, outcomes, agreed = [], Counter(), []
    for tv in tvs:
        counts = Counter(tv.votes.values())
        ranked = counts.most_common()
        n_votes = sum(counts.values())
        if len(ranked) > 1 and ranked[1][1] == ranked[0][1]:
            outcomes["ties"] += 1
            continue
        if not ranked or ranked[0][1] < min_votes:
            outcomes["too_few_votes"] += 1
            continue
        winner, votes = ranked[0]
        if 2 * votes <= n_votes:  # a plurality is not a majority: half the raters did not pick this side
            outcomes["no_majority"] += 1
            continue
        agreed += [(rater, vote == winner) for rater, vote in tv.votes.items()]
        if winner == BOTH_BAD:
            outcomes["both_bad"] += 1
            continue
        if winner == TIE:   # the raters said "about the same": no preference to learn from
            outcomes["judged_same"] += 1
            continue
        outcomes["kept"] += 1
        loser = "right" if winner == "left" else "left"
        side = {"left": "a", "right": "b"}
        ratings = {s: sorted(v for a in tv.latest.values() if not a.get("was_cancelled")
                             for v in [rating_of(a, RATING_A if s == "a" else RATING_B)] if v is not None)
                   for s in ("a", "b")}
        # Each rater's own vote, relative to the majority: what a reward model's per-rater accuracy (and its
        # ceiling, one rater against the others) is measured on.
        raters = sorted(tv.votes, key=str)
        as_chosen = {winner: "chosen", loser: "rejected", BOTH_BAD: BOTH_BAD}
        rows.append({
            "pair_id": str(tv.data.get("pair_id", tv.task_id)),
            "task_id": tv.task_id,
            "prompt": tv.data.get("prompt", ""),
            "chosen_side": side[winner],
            "rejected_side": side[loser],
            "votes": votes,
            "n_votes": n_votes,
            "agreement": votes / n_votes,
            "ratings_chosen": ratings[side[winner]],
            "ratings_rejected": ratings[side[loser]],
            "raters": [str(r) for r in raters],
            "rater_choices": [as_chosen[tv.votes[r]] for r in raters],
        })
    report = _common_report(tvs, max_raters)
    report["kind"] = "pairs"
    report["outcomes"] = {k: outcomes.get(k, 0) for k in ("kept", "ties", "no_majority", "both_bad", "judged_same",
                                                       "too_few_votes")}
    report["vote_totals"] = {c: sum(Counter(tv.votes.values())[c] for tv in tvs) for c in PAIR_CATEGORIES}
    report["agreement"] = _agreement([list(tv.votes.values()) for tv in tvs], PAIR_CATEGORIES, max_raters,
                                     "nominal")
    report["rater_agreement"] = _rater_agreement(agreed)
    return rows, report


def aggregate_ratings(tasks: list[dict], max_raters: int = 3, max_rating: int = 5) -> tuple[list[dict], dict]:
    """Rows ``candidate_id, task_id, prompt, ratings, n_ratings, mean_rating`` (tasks with >= 1 rating)."""
    tvs = [collect(t, rating_of) for t in tasks]
    rows, agreed = [], []
    for tv in tvs:
        if not tv.votes:
            continue
        for rater, stars in tv.votes.items():   # "agrees": within one star of the others' median
            others = sorted(v for r, v in tv.votes.items() if r != rater)
            if others:
                mid = len(others) // 2
                median = others[mid] if len(others) % 2 else (others[mid - 1] + others[mid]) / 2
                agreed.append((rater, abs(stars - median) <= 1))
        ratings = [tv.votes[r] for r in sorted(tv.votes, key=str)]
        rows.append({
            "candidate_id": str(tv.data.get("candidate_id", tv.task_id)),
            "task_id": tv.task_id,
            "prompt": tv.data.get("prompt", ""),
            "ratings": ratings,
            "n_ratings": len(ratings),
            "mean_rating": sum(ratings) / len(ratings),
        })
    report = _common_report(tvs, max_raters)
    report["kind"] = "ratings"
    report["outcomes"] = {"rated": len(rows), "unrated": len(tvs) - len(rows)}
    report["agreement"] = _agreement([list(tv.votes.values()) for tv in tvs],
                                     [float(i) for i in range(1, max_rating + 1)], max_raters, "interval")
    report["rater_agreement"] = _rater_agreement(agreed)
    return rows, report
