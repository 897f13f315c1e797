"""Objective-neutral online RL: what every online objective (Flow-GRPO; the forward-process objectives DiffusionNFT,
AWM, DGPO) shares, apart from its loss.

- ``seeds``: counter-derived random generators (a resumed run draws the same numbers);
- ``prompts``: the prompt stream (TRL's RepeatSampler layout over processes) and pre-encoding of finite prompt sets;
- ``rollouts``: sampling a batch (SDE with per-step log-probs for likelihood objectives), decoding and scoring;
- ``forward``: ODE rollouts that keep only x0 and the timestep grid (the forward-process objectives);
- ``adapters``: a frozen LoRA adapter beside the trained one (NFT's old policy, an EMA, a sampling snapshot);
- ``backward``: one backward per trained timestep (``loss``, ``backward``, ``micro_step`` of an objective);
- ``scoring``: group advantages across processes and the reward statistics;
- ``rewards``: building the configured reward (one registry reward or a weighted combination);
- ``source``: the rollout source (buffer, counters, prompt stream) whose state goes into every checkpoint;
- ``monitor``: the held-out monitor, the over-optimisation guard and the early stop.

An objective plugs in by giving the rollout source a ``rollout(policy, prompts, columns, index)`` callable that
returns a list of micro-batches, and by computing its own loss on them.
"""
