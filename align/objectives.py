"""The objective registry: every training objective declares here what the rest of the toolkit needs to know.

An objective is a name (``qwen-image-align NAME``), its config class, what it reads before any weights load
(``load_data(config)``), how its trainer is built (``build_trainer(config, qwen, data)``), the launch script that
``accelerate launch`` runs, and what a training step holds in memory (``memory(config)``, read by the memory
estimator). The CLI (``align/cli.py``), the run skeleton (``align.launch.train_main``) and the estimator
(``align/memory.py``) read this registry and nothing else: adding an objective is a config, a trainer and one
``register_objective`` call.

Objectives outside the package (your own, or a test's) are registered by importing their module first: name
modules or ``.py`` files in ``QWEN_IMAGE_ALIGN_PLUGINS`` (comma-separated) and every entry point of the CLI and of
``align/train.py`` imports them before looking a name up.

Fields are given as callables or as ``"module:attribute"`` strings resolved on first use, so that listing the
objectives (``--help``) imports no trainer.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwen_image.errors import UserError

from .plugins import Registry, load_plugins

GENERIC_SCRIPT = Path(__file__).resolve().parent / "train.py"


@dataclass(frozen=True)
class MemoryTerms:
    """What one training step of an objective holds, for the memory estimate.

    ``graphs``: images per autograd graph alive at once (SFT: the batch; Flow-DPO: chosen + rejected; an online
    term: one trained timestep of its rollout micro-batch); ``reference``: a frozen reference is kept (a full copy
    when fine-tuning all weights); ``decodes``: the VAE stays on the device to decode rollouts for the rewards;
    ``extra_adapters``: further LoRA adapters of the LoRA's size kept beside the trained one (e.g. an old policy);
    ``buffer_images``: rollouts whose final latents a forward-process objective keeps between its rollout and its
    updates (x0 only, counted at the latents' size); ``label``: the name printed in the estimate line."""

    label: str
    graphs: tuple[int, ...]
    reference: bool = False
    decodes: bool = False
    extra_adapters: int = 0
    buffer_images: int = 0


def _resolve(ref: Any) -> Any:
    if not isinstance(ref, str):
        return ref
    module, _, attribute = ref.partition(":")
    return getattr(importlib.import_module(module), attribute)


@dataclass(frozen=True)
class Objective:
    """One registered objective (see the module docstring). String fields are ``"module:attribute"`` references."""

    name: str
    config_class: Any
    load_data: Any
    build_trainer: Any
    memory: Any
    script: str | None = None  # a launch script file; None: align/train.py NAME
    description: str = ""
    aliases: tuple[str, ...] = field(default=())

    def resolved(self, attribute: str) -> Any:
        return _resolve(getattr(self, attribute))

    @property
    def script_path(self) -> Path:
        return Path(self.script) if self.script else GENERIC_SCRIPT

    def script_arguments(self) -> list[str]:
        """Arguments placed before the user's when ``accelerate launch`` runs the script."""
        return [] if self.script else [self.name]


_REGISTRY: Registry[Objective] = Registry("objective", same=lambda old, new: old == new)


def register_objective(objective: Objective, *, replace: bool = False) -> Objective:
    """Add an objective (``replace`` to redefine a name). Returns it, so it can be used as a module constant."""
    return _REGISTRY.register(objective.name, objective, replace)


def available_objectives() -> list[str]:
    load_plugins()
    return _REGISTRY.names()


def get_objective(name: str) -> Objective:
    load_plugins()
    return _REGISTRY.get(name)


def objective_of_config(config: Any) -> Objective:
    """The registered objective whose config class ``config`` is (an exact class match, then the nearest base)."""
    load_plugins()
    for cls in type(config).__mro__:
        for objective in _REGISTRY:
            if objective.resolved("config_class") is cls:
                return objective
    raise UserError(f"{type(config).__name__} is the config of no registered objective")


def memory_terms(config: Any) -> MemoryTerms:
    return objective_of_config(config).resolved("memory")(config)


# ------------------------------------------------------------------------------------------- built-in objectives
def sft_memory(config: Any) -> MemoryTerms:
    return MemoryTerms("sft", (config.per_device_train_batch_size,))


def dpo_memory(config: Any) -> MemoryTerms:
    pairs = 2 * config.per_device_train_batch_size  # chosen + rejected in one forward
    # The KTO term's rated images: a graph back-propagated together with the DPO one.
    kto = (config.kto_images_per_step,) if getattr(config, "w_kto", 0) > 0 else ()
    label = "dpo" + ("+kto" if kto else "")
    method = config.online_method
    if method == "grpo":
        return MemoryTerms(f"{label}+grpo", (pairs, *kto, config.rollout_batch_size), reference=True, decodes=True)
    if method is not None:
        online = forward_memory(config, method)
        return MemoryTerms(f"{label}+{method}", (pairs, *kto, config.rollout_batch_size), reference=True,
                           decodes=True, extra_adapters=online.extra_adapters, buffer_images=online.buffer_images)
    return MemoryTerms(label, (pairs, *kto), reference=True)


def kto_memory(config: Any) -> MemoryTerms:
    # One graph of the batch's images; the reference forward (and the mismatched estimate's forwards) have none.
    return MemoryTerms("kto", (config.per_device_train_batch_size,), reference=True)


def grpo_memory(config: Any) -> MemoryTerms:
    return MemoryTerms("grpo", (config.rollout_batch_size,), reference=config.beta > 0, decodes=True)


def forward_memory(config: Any, method: str | None = None) -> MemoryTerms:
    """DiffusionNFT / AWM / DGPO: one trained timestep of the rollout micro-batch per graph, the VAE for the
    rewards, the extra LoRA adapters (NFT's old; AWM's EMA; a sampling snapshot when a buffer is reused) and the
    x0 buffer of a generation batch."""
    from .configs.forward import extra_adapter_count

    method = method or config.method
    # standalone: a reference for the KL or DGPO's score; combined: the DPO term's reference is there anyway
    reference = (config.beta > 0 or method == "dgpo") if hasattr(config, "method") else True
    return MemoryTerms(method, (config.rollout_batch_size,), reference=reference, decodes=True,
                       extra_adapters=extra_adapter_count(method, config),
                       buffer_images=config.rollout_batch_size * config.steps_per_generation)


_ALIGN = Path(__file__).resolve().parent


def _builtin(name: str, config_class: str, memory: Any, description: str) -> Objective:
    # A built-in objective NAME lives in align/NAME.py: its launch script, with load_data and build_trainer.
    return register_objective(Objective(name, config_class, f"align.{name}:load_data", f"align.{name}:build_trainer",
                                        memory, script=str(_ALIGN / f"{name}.py"), description=description))


SFT = _builtin("sft", "align.configs.sft:SFTConfig", sft_memory,
               "supervised fine-tuning (flow matching) on rater-filtered images")
DPO = _builtin("dpo", "align.configs.combined:DPOGRPOConfig", dpo_memory,
               "Flow-DPO on preference pairs; with an online term (online: grpo|nft|awm|dgpo, w_online > 0) and/or "
               "a KTO term on ratings (w_kto > 0) the combined objective")
GRPO = _builtin("grpo", "align.configs.grpo:GRPOConfig", grpo_memory,
                "Flow-GRPO online RL on SDE rollouts (clip / guard / dppo)")
NFT = _builtin("nft", "align.configs.forward:NFTConfig", forward_memory,
               "DiffusionNFT online RL on CFG-free ODE rollouts (trained + old LoRA adapters)")
AWM = _builtin("awm", "align.configs.forward:AWMConfig", forward_memory,
               "AWM: advantage-weighted flow matching on on-policy ODE rollouts")
DGPO = _builtin("dgpo", "align.configs.forward:DGPOConfig", forward_memory,
                "DGPO: group-level preference optimisation on ODE rollouts")
KTO = _builtin("kto", "align.configs.kto:KTOConfig", kto_memory,
               "Diffusion-KTO on per-image ratings (desirable / undesirable images of a rating project)")
