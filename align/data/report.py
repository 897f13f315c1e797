"""The one kept/dropped report of every pass over rows: the rater filter (``ratings.filter_by_ratings``), the row
checks (``loading.validate_rows``), the preference checks (``preference.load_preference_dataset``) and the image
filters of the data tools (``datatools.filtering.filter_dataset``).

A pass calls :meth:`RowReport.keep` or :meth:`RowReport.drop` once per input row. A reason is ``"<check>"`` or
``"<check>: <detail>"``; counts are kept per check name. :meth:`summary` is the one line that gets printed,
``str()`` adds a few example rows per reason and the warnings, :meth:`to_dict` is what a run keeps on disk and
:meth:`metrics` what it logs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence


def check_name(reason: str) -> str:
    """The check a reason string belongs to: the text before its first ``:``."""
    return reason.split(":", 1)[0].strip()


@dataclass
class RowReport:
    """What a pass over rows kept and dropped, and why.

    ``dropped[check]``: rows dropped by that check, each dropped row counted once, under its first reason (so the
    values add up to ``total - kept``). ``counts[check]``: rows failing that check at all; equal to ``dropped``
    for passes that stop at a row's first problem, larger where every cheap check runs (the image filters).
    ``reasons[i]``: every reason of dropped input row ``i``. ``examples``: a few rows named per check.
    """

    what: str = "data"  # what the rows are: the first word(s) of the summary
    total: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    reasons: dict[int, list[str]] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    kept_indices: list[int] = field(default_factory=list)
    settings: str = ""
    # Rows kept but worth a look (duplicate file_name, 1x1 or extreme-aspect images): counted, not dropped.
    warnings: dict[str, int] = field(default_factory=dict)
    warning_examples: dict[str, list[str]] = field(default_factory=dict)

    # ------------------------------------------------------------------------------------------ recording
    def keep(self, index: int) -> None:
        self.kept_indices.append(index)
        self.kept = len(self.kept_indices)

    def drop(self, index: int, reasons: str | Sequence[str], row: str | None = None, n_examples: int = 3) -> None:
        """Row ``index`` is dropped for ``reasons`` (one string or several, the first is the one it counts
        under); ``row`` names it in the examples (default ``row <index>``)."""
        reasons = [reasons] if isinstance(reasons, str) else list(reasons)
        if not reasons:
            raise ValueError("a dropped row needs a reason")
        first = check_name(reasons[0])
        self.dropped[first] = self.dropped.get(first, 0) + 1
        for name in dict.fromkeys(check_name(r) for r in reasons):
            self.counts[name] = self.counts.get(name, 0) + 1
        self.reasons[index] = reasons
        shown = self.examples.setdefault(first, [])
        if len(shown) < n_examples:
            shown.append(row or f"row {index}")

    def warn(self, reason: str, row: str, n_examples: int = 3) -> None:
        self.warnings[reason] = self.warnings.get(reason, 0) + 1
        shown = self.warning_examples.setdefault(reason, [])
        if len(shown) < n_examples:
            shown.append(row)

    def merge(self, other: "RowReport") -> "RowReport":
        """Chain a later pass (run on this pass's kept rows) into one report. Row indices of ``other`` are mapped
        back to this pass's input when this pass recorded which rows it kept."""
        def to_input(i: int) -> int:
            return self.kept_indices[i] if self.kept_indices and i < len(self.kept_indices) else i

        out = RowReport(what=self.what, total=self.total,
                        settings="; ".join(s for s in (self.settings, other.settings) if s))
        for src in (self, other):
            for attr in ("dropped", "counts", "warnings"):
                for reason, n in getattr(src, attr).items():
                    getattr(out, attr)[reason] = getattr(out, attr).get(reason, 0) + n
            for attr in ("examples", "warning_examples"):
                for reason, rows in getattr(src, attr).items():
                    getattr(out, attr).setdefault(reason, []).extend(rows)
        out.reasons = {**self.reasons, **{to_input(i): r for i, r in other.reasons.items()}}
        out.kept_indices = [to_input(i) for i in other.kept_indices]
        out.kept = other.kept
        return out

    # ------------------------------------------------------------------------------------------ reading
    @property
    def num_dropped(self) -> int:
        return self.total - self.kept

    @property
    def dropped_indices(self) -> list[int]:
        return sorted(self.reasons)

    def dropped_text(self) -> str:
        """``3 low_score, 1 tie``: the dropped rows per reason, most first (empty when none)."""
        return ", ".join(f"{n} {why}" for why, n in sorted(self.dropped.items(), key=lambda kv: (-kv[1], kv[0])))

    def summary(self) -> str:
        """The one line: ``<what>: kept K/T (P%); dropped: ...; warnings: ...; <settings>``."""
        pct = f" ({100.0 * self.kept / self.total:.1f}%)" if self.total else ""
        line = f"{self.what}: kept {self.kept}/{self.total}{pct}; dropped: {self.dropped_text() or 'none'}"
        if self.warnings:
            line += "; warnings (kept): " + ", ".join(f"{n} {why}" for why, n in sorted(self.warnings.items()))
        return line + (f"; {self.settings}" if self.settings else "")

    def __str__(self) -> str:
        lines = [self.summary()]
        for reason in sorted({*self.dropped, *self.counts}):
            n, failed = self.dropped.get(reason, 0), self.counts.get(reason, 0)
            eg = ", ".join(self.examples.get(reason, []))
            lines.append(f"  dropped {n} {reason}" + (f" ({failed} row{'s' * (failed != 1)} failed it in all)" if failed != n else "")
                         + (f" (e.g. {eg})" if eg else ""))
        for reason, n in sorted(self.warnings.items()):
            eg = ", ".join(self.warning_examples.get(reason, []))
            lines.append(f"  warning: {n} {reason} (kept)" + (f" (e.g. {eg})" if eg else ""))
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """For the run's JSON report (row indices as keys become strings there)."""
        return {"what": self.what, "total": self.total, "kept": self.kept, "dropped": dict(self.dropped),
                "counts": dict(self.counts), "examples": self.examples, "settings": self.settings,
                "warnings": dict(self.warnings), "warning_examples": self.warning_examples,
                "dropped_indices": self.dropped_indices, "reasons": {i: self.reasons[i] for i in self.dropped_indices}}

    def metrics(self, prefix: str = "data/") -> dict[str, float]:
        out = {f"{prefix}rows_total": float(self.total), f"{prefix}rows_kept": float(self.kept)}
        out.update({f"{prefix}dropped_{k}": float(v) for k, v in sorted(self.dropped.items())})
        out.update({f"{prefix}warning_{k}": float(v) for k, v in sorted(self.warnings.items())})
        return out
