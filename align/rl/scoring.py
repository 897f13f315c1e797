"""Group advantages and reward statistics of a generation batch, whatever the sampler: shared by Flow-GRPO (SDE
rollouts) and the forward-process objectives (ODE rollouts). The host class provides ``args`` (OnlineArguments),
``accelerator``, ``reward_fn``, ``metrics`` (a MetricLog) and ``logged_images``; its micro-batches have ``prompts``, ``images``,
``rewards`` and ``advantages``."""

from __future__ import annotations

import math
from typing import Any

import torch

from ..losses.grpo import group_advantages, rewards_tensor
from .rollouts import score_images


class GroupScoring:
    """Advantages over groups that may straddle processes, reward / advantage statistics, images for wandb."""

    args: Any
    accelerator: Any
    reward_fn: Any
    metrics: Any
    logged_images: list

    def _score(self, batch: Any, local_totals: list, local_per: dict[str, list]) -> None:
        """Score one micro-batch as soon as it is sampled: its ``rewards`` (NaN where a reward does not apply) and
        ``rewards_per_func``, appended to this process's totals and per-reward lists for :meth:`_set_advantages`."""
        totals, per = score_images(self.reward_fn, batch.prompts, batch.images, batch.columns)
        batch.rewards = rewards_tensor(totals)
        batch.rewards_per_func = per
        local_totals += totals
        for k, v in per.items():
            local_per.setdefault(k, []).extend(v)

    def _set_advantages(self, chunks: list, local_totals: list, local_per: dict[str, list]) -> torch.Tensor:
        """Fill each micro-batch's ``advantages`` (this process's slice of the global ones); returns the global
        rewards (identical on every rank)."""
        from accelerate.utils import gather_object

        # Groups can straddle processes (RepeatSampler lays them out consecutively over the global batch): gather
        # every process's rewards in rank order, compute the advantages globally, keep this process's slice.
        all_totals = gather_object(list(local_totals))
        rewards = rewards_tensor(all_totals)
        adv = group_advantages(rewards, self.args.num_generations, self.args.scale_mode, self.args.adv_clip_max)
        rank, n = self.accelerator.process_index, len(local_totals)
        local_adv = adv[rank * n:(rank + 1) * n]
        offset = 0
        for batch in chunks:
            batch.advantages = local_adv[offset:offset + len(batch)].clone()
            offset += len(batch)
        self._log_rewards(rewards, adv, {k: gather_object(list(v)) for k, v in local_per.items()})
        return rewards

    def _log_rewards(self, rewards: torch.Tensor, adv: torch.Tensor, per: dict[str, list]) -> None:
        """Statistics of the GLOBAL generation batch (identical on every rank)."""
        def stats(t: torch.Tensor) -> tuple[float, float]:
            t = t[~torch.isnan(t)]
            return (float(t.mean()) if t.numel() else math.nan,
                    float(t.std(unbiased=False)) if t.numel() > 1 else math.nan)

        m: dict[str, float] = {}
        m["reward"], m["reward_std"] = stats(rewards)
        for name, vals in per.items():
            m[f"rewards/{name}/mean"], m[f"rewards/{name}/std"] = stats(rewards_tensor(vals))
        groups = rewards.view(-1, self.args.num_generations)
        zero_std = [(g[~torch.isnan(g)].std(unbiased=False) if (~torch.isnan(g)).sum() > 1 else torch.tensor(0.0)) < 1e-8
                    for g in groups]
        m["frac_reward_zero_std"] = float(sum(bool(z) for z in zero_std)) / len(zero_std)
        m["advantages/abs_mean"] = float(adv.abs().mean())
        m["advantages/max"] = float(adv.max())
        m["advantages/min"] = float(adv.min())
        self.metrics.add(m)

    def _keep_images(self, chunks: list) -> None:
        if not self.args.num_images_to_log or not self.accelerator.is_main_process:
            return
        images = []
        for batch in chunks:
            for i, (im, p) in enumerate(zip(batch.images, batch.prompts)):
                r = float(batch.rewards[i])
                images.append((im, f"{p[:60]} | r={r:.3f} | A={float(batch.advantages[i]):+.2f}"))
        self.logged_images = images[: self.args.num_images_to_log]
