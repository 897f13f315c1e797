"""Each term's share of the combined objective's gradient (opt-in diagnostic, ``log_term_grad_norms``).

The combined trainer back-propagates its offline terms (DPO, its KL, KTO, SFT) in one backward and the online term
(its policy loss and rollout KL) one trained timestep at a time, all into the same ``.grad``. The loss values say
nothing about how hard each term pulls: Flow-GRPO's log-probabilities are per-element means, so its gradient can be
a hundredth of Flow-DPO's at ``beta`` 100 while its loss reads ~0 either way. This module records the gradient each
part adds (the difference of ``.grad`` before and after its backward), summed over the micro-steps of an optimiser
step, and logs the norms (``grad_norm/offline``, ``grad_norm/<method>``, before clipping) averaged over the logging
window: the number to look at when choosing ``w_online``.

One process only: under DDP the last backward all-reduces the summed gradient, so a difference taken after it mixes
the other processes' offline gradients in. Memory: two copies of the trainable parameters' gradients (a LoRA's).
"""

from __future__ import annotations

import math

import torch


class TermGradientNorms:
    """Per-part gradient norms: ``begin`` before a micro-step's first backward, ``mark(name)`` after each part's
    backward, ``end_of_step`` after the micro-step that completes an optimiser step, ``pop_metrics`` at logging."""

    def __init__(self, params) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.before: list[torch.Tensor] | None = None
        self.step_sums: dict[str, list[torch.Tensor]] = {}
        self.window: dict[str, list[float]] = {}

    def _grads(self) -> list[torch.Tensor]:
        return [torch.zeros_like(p, dtype=torch.float32) if p.grad is None else p.grad.detach().float().clone()
                for p in self.params]

    def begin(self) -> None:
        if self.before is None:  # later micro-steps of the step start where the previous one's last mark left off
            self.before = self._grads()

    @torch.no_grad()
    def mark(self, name: str) -> None:
        after = self._grads()
        sums = self.step_sums.setdefault(name, [torch.zeros_like(a) for a in after])
        for total, a, b in zip(sums, after, self.before):
            total.add_(a - b)
        self.before = after

    @torch.no_grad()
    def end_of_step(self) -> None:
        for name, sums in self.step_sums.items():
            norm = math.sqrt(sum(float(s.pow(2).sum()) for s in sums))
            self.window.setdefault(name, []).append(norm)
        self.step_sums = {}
        self.before = None

    def pop_metrics(self) -> dict[str, float]:
        out = {f"grad_norm/{name}": sum(v) / len(v) for name, v in self.window.items() if v}
        self.window = {}
        return out
