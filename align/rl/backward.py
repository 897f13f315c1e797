"""One backward per trained timestep: what every online objective whose loss is a mean over trained timesteps
(Flow-GRPO's SDE steps, the forward-process objectives' noise levels) does with its per-timestep terms.

Back-propagating each timestep's term scaled by 1 / (number of trained timesteps) gives the gradient of the mean,
while autograd holds one timestep's graph at a time instead of all of them; ``loss`` builds the mean as one graph
(DeepSpeed, whose engine takes a single backward per micro-step, and the tests).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch

# (policy loss, KL or None, detached statistics) of one trained timestep
TimestepTerms = tuple[torch.Tensor, torch.Tensor | None, dict]


class PerTimestepBackward:
    """Mixin giving an online objective ``loss``, ``backward`` and ``micro_step`` over its trained timesteps.

    The host provides ``accelerator``, ``need_kl`` and four methods: ``_on_device(batch)`` (the rollout batch on
    the training device), ``trained_timesteps(batch, micro_step)`` (one item per trained timestep, drawn from the
    run seed and ``micro_step``), ``timestep_terms(model, batch, item)`` (:data:`TimestepTerms` of one item) and
    ``_record(stats, policy_loss, kl)`` (its metrics, from the per-timestep statistics and the two means)."""

    accelerator: Any
    need_kl: bool

    def trained_timesteps(self, batch: Any, micro_step: int) -> list:
        raise NotImplementedError

    def timestep_terms(self, model: torch.nn.Module, batch: Any, item: Any) -> TimestepTerms:
        raise NotImplementedError

    def _on_device(self, batch: Any) -> Any:
        raise NotImplementedError

    def _record(self, stats: list[dict], policy_loss: float, kl: float | None) -> None:
        raise NotImplementedError

    def loss(self, model: torch.nn.Module, batch: Any, micro_step: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(policy loss, KL or None), each averaged over the trained timesteps, as ONE graph (all timesteps'
        activations live until backward). Training uses ``backward``; this form serves DeepSpeed and the tests."""
        batch = self._on_device(batch)
        policy_losses, kls, stats = [], [], []
        for item in self.trained_timesteps(batch, micro_step):
            pl, kl, st = self.timestep_terms(model, batch, item)
            policy_losses.append(pl)
            stats.append(st)
            if kl is not None:
                kls.append(kl)
        policy_loss = torch.stack(policy_losses).mean()
        kl = torch.stack(kls).mean() if kls else None
        self._record(stats, float(policy_loss.detach()), None if kl is None else float(kl.detach()))
        return policy_loss, kl

    def backward(
        self,
        model: torch.nn.Module,
        batch: Any,
        backward: Callable[[torch.Tensor], None],
        *,
        policy_weight: float = 1.0,
        kl_weight: float = 0.0,
        scale: float = 1.0,
        no_sync: Callable[[], Any] = contextlib.nullcontext,
        micro_step: int = 0,
    ) -> float:
        """Back-propagate ``scale * (policy_weight * L_policy + kl_weight * KL)`` (both means over the trained
        timesteps) one trained timestep at a time; returns the value of the weighted loss (unscaled).

        ``backward`` is the accelerator's; every timestep but the last runs under ``no_sync()`` (DDP / FSDP then
        reduce the accumulated gradient once). Peak activation memory is one timestep's, whatever their count.
        """
        batch = self._on_device(batch)
        items = self.trained_timesteps(batch, micro_step)
        n = len(items)
        total, policy_sum, kl_sum, stats = 0.0, 0.0, 0.0, []
        for idx, item in enumerate(items):
            with no_sync() if idx < n - 1 else contextlib.nullcontext():
                pl, kl, st = self.timestep_terms(model, batch, item)
                loss_j = policy_weight * pl + (kl_weight * kl if kl is not None else 0.0)
                backward(loss_j * (scale / n))
            total += float(loss_j.detach()) / n
            policy_sum += float(pl.detach()) / n
            if kl is not None:
                kl_sum += float(kl.detach()) / n
            stats.append(st)
        self._record(stats, policy_sum, kl_sum if self.need_kl else None)
        return total

    def micro_step(self, source, model: torch.nn.Module, policy_weight: float, kl_weight: float, scale: float,
                   no_sync) -> float:
        """Roll out if due (``source``: the run's ``RolloutSource``), back-propagate this micro-step's term per
        timestep, advance the counter; returns the weighted loss value."""
        policy = self.accelerator.unwrap_model(model)
        batch = source.batch(policy)
        total = self.backward(model, batch, self.accelerator.backward, policy_weight=policy_weight,
                              kl_weight=kl_weight, scale=scale, no_sync=no_sync, micro_step=source.micro_step)
        source.advance()
        return total
