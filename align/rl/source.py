"""The rollout side of an online run, whatever the objective: which buffered micro-batch each micro-step trains on
and when to roll out anew (every ``steps_per_generation * num_iterations`` micro-steps, TRL's layout), the prompt
stream and the buffer. ``state_dict`` goes into every checkpoint (the base trainer saves it with the RNG states),
so a resumed run trains on the same rollouts in the same order as an uninterrupted one."""

from __future__ import annotations

from typing import Any, Callable, Protocol

import torch

from .prompts import PromptStream


class Rollout(Protocol):
    """A buffered micro-batch: anything with ``state()`` (what a checkpoint keeps) and a ``from_state`` classmethod."""

    def state(self) -> dict[str, Any]: ...


# rollout(policy, prompts, columns, generation index) -> one micro-batch per steps_per_generation
RolloutFn = Callable[[torch.nn.Module, list, dict, int], list]


class RolloutSource:
    """Buffer + counters + prompt stream for one online term. ``rollout`` produces the micro-batches of a generation
    batch (the objective's sampler: SDE with log-probs, ODE keeping x0, ...); ``batch_type`` restores them."""

    def __init__(self, rollout: RolloutFn, prompts, args: Any, process_index: int, batch_type: type):
        self.rollout = rollout
        self.args = args
        self.batch_type = batch_type
        self.prompts = PromptStream(prompts, args, process_index)
        self.micro_step = 0  # micro-steps trained so far
        self.rollout_index = 0  # generation batches rolled out so far
        self.buffer: list | None = None

    def batch(self, policy: torch.nn.Module):
        """The micro-batch of the current micro-step (rolling out a new buffer when one is due)."""
        every = self.args.steps_per_generation * self.args.num_iterations
        if self.micro_step % every == 0 or self.buffer is None:
            generation = self.prompts.next()
            self.buffer = self.rollout(policy, list(generation["prompt"]), generation, self.rollout_index)
            self.rollout_index += 1
            if len(self.buffer) != self.args.steps_per_generation:
                raise RuntimeError(f"got {len(self.buffer)} rollout micro-batches for "
                                   f"steps_per_generation={self.args.steps_per_generation}")
        return self.buffer[self.micro_step % self.args.steps_per_generation]

    def advance(self) -> None:
        self.micro_step += 1

    def state_dict(self) -> dict[str, Any]:
        return {"micro_step": self.micro_step, "rollout_index": self.rollout_index, "prompts": self.prompts.state_dict(),
                "buffer": None if self.buffer is None else [b.state() for b in self.buffer]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.micro_step = int(state["micro_step"])
        self.rollout_index = int(state["rollout_index"])
        self.prompts.load_state_dict(state["prompts"])
        self.buffer = None if state["buffer"] is None else [self.batch_type.from_state(b) for b in state["buffer"]]
