"""A frozen LoRA adapter beside the trained one on the same transformer (PEFT multi-adapter): DiffusionNFT's
``old`` policy (samples the rollouts, EMA of the trained adapter), AWM's EMA-KL adapter, DGPO's EMA reference
(``ema_ref``: the group score's reference with ``dgpo_reference: ema``), and the sampling-policy snapshot the clipped objectives compare with when a rollout buffer is trained more than once.

``active()`` runs a forward through it instead of the trained adapter (no grad); ``update(decay)`` moves it
towards the trained adapter, ``old <- decay old + (1 - decay) trained`` (``decay`` 0 copies exactly). Its tensors
and its update counter are a checkpoint state (``state_dict`` / ``load_state_dict``), so a resumed run continues
from the same old policy. The weights stay fp32 like the trained adapter's: equal weights give bit-identical
forwards, in bf16 too.

PEFT trap: switching the active adapter sets ``requires_grad`` on the newly active LoRA tensors and clears it on
the others; ``active()`` restores the trained adapter's flags on exit. Use it AFTER the trained forward of a step
(as the reference does) and before backward: gradient checkpointing recomputes with whatever adapter is active.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Any, Iterator

import torch
from torch import nn

from ..losses.nft import ema_update_
from ..modeling import ADAPTER_NAME


def _tuner_layers(transformer: nn.Module) -> list[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in transformer.modules() if isinstance(m, BaseTunerLayer)]


def _adapter_params(transformer: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """The LoRA tensors of adapter ``name`` keyed by their name with the adapter part removed (so two adapters' keys
    match): ``...to_q.lora_A.old.weight`` -> ``...to_q.lora_A.weight``."""
    marker = f".{name}."
    return {k.replace(marker, "."): p for k, p in transformer.named_parameters() if "lora_" in k and marker in k}


class ShadowAdapter:
    """A frozen copy of the trained LoRA adapter named ``name`` (see the module docstring). Build it on the bare
    transformer (before the trainer wraps it), after the trained adapter exists; it starts equal to it."""

    def __init__(self, transformer: nn.Module, name: str, trained: str = ADAPTER_NAME):
        if not getattr(transformer, "_hf_peft_config_loaded", False) or trained not in transformer.peft_config:
            raise ValueError(f"a {name!r} adapter needs the trained LoRA adapter {trained!r} on the transformer")
        if name in transformer.peft_config:
            raise ValueError(f"the transformer has an adapter named {name!r} already")
        self.transformer = transformer
        self.name = name
        self.trained = trained
        self.updates = 0  # how many times update() ran (the EMA schedules' step)
        flags = [(p, p.requires_grad) for p in transformer.parameters()]
        config = transformer.peft_config[trained]
        with warnings.catch_warnings():  # PEFT warns that a second adapter joins the first: that is the point
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            transformer.add_adapter(copy.deepcopy(config), adapter_name=name)
        transformer.set_adapter(trained)
        for p, flag in flags:
            p.requires_grad_(flag)
        self.layers = _tuner_layers(transformer)
        self.params = _adapter_params(transformer, name)
        self.trained_params = _adapter_params(transformer, trained)
        if self.params.keys() != self.trained_params.keys():
            raise ValueError(f"adapter {name!r} does not mirror {trained!r}: {sorted(self.params.keys() ^ self.trained_params.keys())[:3]}")
        for key, p in self.params.items():  # frozen, in the trained adapter's dtype (fp32 after cast_training_params)
            p.requires_grad_(False)
            p.data = p.data.to(self.trained_params[key].dtype)
        self.copy_from_trained()

    # ----------------------------------------------------------------------------------------------- using
    @contextlib.contextmanager
    def active(self) -> Iterator[nn.Module]:
        """Yield the transformer with this adapter active instead of the trained one (grad flags restored on exit)."""
        flags = [(p, p.requires_grad) for p in self.trained_params.values()]
        try:
            for layer in self.layers:
                layer.set_adapter([self.name])
            yield self.transformer
        finally:
            for layer in self.layers:
                layer.set_adapter([self.trained])
            for p, flag in flags:
                p.requires_grad_(flag)
            for p in self.params.values():
                p.requires_grad_(False)

    @torch.no_grad()
    def copy_from_trained(self) -> None:
        ema_update_(self.params.values(), [self.trained_params[k] for k in self.params], 0.0)

    @torch.no_grad()
    def update(self, decay: float) -> None:
        """``self <- decay self + (1 - decay) trained`` (in place) and count the update."""
        ema_update_(self.params.values(), [self.trained_params[k] for k in self.params], decay)
        self.updates += 1

    @torch.no_grad()
    def deviation(self) -> float:
        """Root-mean-square difference between the trained adapter's and this adapter's LoRA tensors."""
        total, count = 0.0, 0
        for k, p in self.params.items():
            d = (self.trained_params[k].detach().double() - p.double())
            total += float((d**2).sum())
            count += d.numel()
        return (total / max(count, 1)) ** 0.5

    # ----------------------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "weights": {k: p.detach().cpu().clone() for k, p in self.params.items()}}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        weights = state["weights"]
        if weights.keys() != self.params.keys():
            raise ValueError(f"the checkpoint's {self.name!r} adapter does not match this model's LoRA layers")
        for k, p in self.params.items():
            p.copy_(weights[k].to(device=p.device, dtype=p.dtype))
        self.updates = int(state["updates"])
