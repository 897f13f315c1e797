"""Options of the forward-process online objectives (DiffusionNFT, AWM, DGPO): one mixin per method (shared by the
standalone and the combined trainers' configs) and the three standalone configs. Defaults are the published ones
(align/losses/{nft,awm,dgpo}.py name them); docs/online-rl.md says when to use which.

What breaks a method's assumptions is refused in one line: NFT and AWM train on CFG-free samples of the policy
itself (``true_cfg_scale: 1``); NFT keeps an ``old`` LoRA adapter beside the trained one (LoRA only); a clipped
objective trained more than once on a buffer keeps a snapshot adapter of the sampling policy (LoRA only); DGPO's
groups must be whole within a micro-step across processes (the group score is reduced per trained timestep), and its
EMA reference is another LoRA adapter (LoRA only).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qwen_image.errors import UserError

from ..losses.awm import (
    AWM_ADVANTAGE_MAX,
    AWM_CLIP_RANGE,
    AWM_EMA_DECAY_CAP,
    AWM_EMA_DECAY_RATE,
    AWM_GHUBER_POWER,
    AWM_KL_COEF_OCR,
    AWM_NUM_TRAIN_TIMESTEPS,
    AWM_TIMESTEP_FRACTION,
    AWM_WEIGHTINGS,
)
from ..losses.dgpo import (
    DGPO_BETA_DPO,
    DGPO_BETA_DPO_EMA_REF,
    DGPO_CLIP_RANGE,
    DGPO_CLIP_RANGE_EMA_REF,
    DGPO_EMA_REF_DECAY_CAP,
    DGPO_EMA_REF_DECAY_RATE,
    DGPO_KL_COEF,
    DGPO_KL_COEF_EMA_REF,
)
from ..losses.grpo import num_train_timesteps
from ..losses.nft import (
    NFT_DECAY_CAP,
    NFT_DECAY_RATE,
    NFT_KL_COEF,
    NFT_MIX_BETA,
    NFT_OCR_DECAY_CAP,
    NFT_OCR_DECAY_DELAY,
    NFT_OCR_DECAY_RATE,
)
from .base import QwenImageTrainingConfig
from .grpo import OnlineArguments

ONLINE_METHODS = ("grpo", "nft", "awm", "dgpo")
FORWARD_METHODS = ("nft", "awm", "dgpo")
DGPO_REFERENCES = ("frozen", "ema")
OLD_DECAYS = ("linear", "delayed_linear")
# Published old-policy schedules: (delay, rate, cap)
OLD_DECAY_DEFAULTS = {"linear": (0, NFT_DECAY_RATE, NFT_DECAY_CAP),
                      "delayed_linear": (NFT_OCR_DECAY_DELAY, NFT_OCR_DECAY_RATE, NFT_OCR_DECAY_CAP)}


def buffer_is_on_policy(args) -> bool:
    """Every micro-batch is trained before the optimizer step that follows its rollout (no buffer reuse): the
    sampling policy is then the current one and a ratio against it is exactly 1."""
    return args.num_iterations == 1 and args.gradient_accumulation_steps % args.steps_per_generation == 0


def extra_adapter_count(method: str, args) -> int:
    """LoRA adapters a method keeps beside the trained one (for the memory estimate)."""
    snapshot = 0 if buffer_is_on_policy(args) else 1
    if method == "nft":
        return 1
    if method == "awm":
        return int(args.awm_ema_kl_coef > 0) + snapshot
    if method == "dgpo":
        return int(args.dgpo_reference == "ema") + snapshot
    return 0


def _refuse_cfg(method: str, scale: float) -> None:
    if scale > 1:
        raise UserError(f"{method} trains on CFG-free samples of the policy itself: set true_cfg_scale: 1 "
                        f"(got {scale})")


@dataclass
class NFTArguments:
    """DiffusionNFT's own fields."""

    nft_beta: float = field(default=NFT_MIX_BETA, metadata={"help": "Mix coefficient of the implicit velocities v_old +- beta (v - v_old): 1.0 the paper's default, 0.1 its OCR config and the published Qwen-Image LoRA recipe."})
    old_decay: str = field(default="linear", metadata={"help": "EMA schedule of the old (sampling) adapter, old <- d old + (1 - d) trained after every old_update_interval optimizer steps: linear d = min(rate step, cap) (0.001, 0.5: the paper's default) | delayed_linear d = 0 for delay steps then min(rate (step - delay), cap) (75, 0.0075, 0.999: the OCR config and the Qwen-Image recipe)."})
    old_decay_rate: float | None = field(default=None, metadata={"help": "Override the schedule's rate (default: the published one)."})
    old_decay_cap: float | None = field(default=None, metadata={"help": "Override the schedule's cap (default: the published one)."})
    old_decay_delay: int | None = field(default=None, metadata={"help": "Override delayed_linear's delay in old-adapter updates (default 75)."})
    old_update_interval: int = field(default=1, metadata={"help": "Optimizer steps between two updates of the old adapter (the Qwen-Image recipe refreshes it every 2)."})

    def old_schedule(self) -> tuple[int, float, float]:
        delay, rate, cap = OLD_DECAY_DEFAULTS[self.old_decay]
        return (delay if self.old_decay_delay is None else self.old_decay_delay,
                rate if self.old_decay_rate is None else self.old_decay_rate,
                cap if self.old_decay_cap is None else self.old_decay_cap)

    def _validate_nft(self) -> None:
        if self.finetune != "lora":  # type: ignore[attr-defined]
            raise UserError("DiffusionNFT keeps an 'old' LoRA adapter beside the trained one: set finetune: lora "
                            "(full fine-tuning is not supported)")
        _refuse_cfg("DiffusionNFT", self.true_cfg_scale)  # type: ignore[attr-defined]
        if self.nft_beta <= 0:
            raise UserError(f"nft_beta must be > 0, got {self.nft_beta}")
        if self.old_decay not in OLD_DECAYS:
            raise UserError(f"old_decay must be one of {OLD_DECAYS}, got {self.old_decay!r}")
        delay, rate, cap = self.old_schedule()
        if delay < 0 or rate < 0 or not 0 <= cap < 1:
            raise UserError(f"the old adapter's schedule needs delay >= 0, rate >= 0 and 0 <= cap < 1, got "
                            f"{delay}, {rate}, {cap}")
        if self.old_update_interval < 1:
            raise UserError(f"old_update_interval must be >= 1, got {self.old_update_interval}")


@dataclass
class AWMArguments:
    """AWM's own fields."""

    awm_weighting: str = field(default="ghuber", metadata={"help": "ghuber: generalised-Huber weighting of the flow-matching error (large errors count less) | uniform: the plain error."})
    awm_ghuber_power: float = field(default=AWM_GHUBER_POWER, metadata={"help": "Power p of the generalised Huber weighting."})
    awm_num_timesteps: int = field(default=AWM_NUM_TRAIN_TIMESTEPS, metadata={"help": "Stratified timesteps trained per micro-batch (one per stratum of the grid, shared by its samples)."})
    awm_clip_range: float = field(default=AWM_CLIP_RANGE, metadata={"help": "PPO clip range of the ratio (only off-policy buffers have a ratio other than 1)."})
    awm_advantage_max: float = field(default=AWM_ADVANTAGE_MAX, metadata={"help": "Advantages clipped to +-adv_clip_max are rescaled onto +-awm_advantage_max."})
    awm_ema_kl_coef: float = field(default=0.0, metadata={"help": "Weight of the EMA-KL mean((v - v_ema)^2) to an EMA adapter of the policy (1.0 when used in the paper; 0 = no EMA adapter)."})
    awm_ema_decay_rate: float = field(default=AWM_EMA_DECAY_RATE, metadata={"help": "EMA adapter decay min(rate step, cap): the rate."})
    awm_ema_decay_cap: float = field(default=AWM_EMA_DECAY_CAP, metadata={"help": "EMA adapter decay: the cap."})

    def _validate_awm(self) -> None:
        _refuse_cfg("AWM", self.true_cfg_scale)  # type: ignore[attr-defined]
        if self.awm_weighting not in AWM_WEIGHTINGS:
            raise UserError(f"awm_weighting must be one of {AWM_WEIGHTINGS}, got {self.awm_weighting!r}")
        if self.awm_ghuber_power <= 0 or self.awm_clip_range <= 0 or self.awm_advantage_max <= 0:
            raise UserError("awm_ghuber_power, awm_clip_range and awm_advantage_max must be > 0")
        if self.awm_ema_kl_coef < 0 or not 0 <= self.awm_ema_decay_cap < 1 or self.awm_ema_decay_rate < 0:
            raise UserError("awm_ema_kl_coef and awm_ema_decay_rate must be >= 0, awm_ema_decay_cap in [0, 1)")
        trainable = num_train_timesteps(self.num_inference_steps, self.timestep_fraction) - 1  # type: ignore[attr-defined]
        if self.awm_num_timesteps < 1 or trainable < self.awm_num_timesteps:
            raise UserError(f"awm_num_timesteps {self.awm_num_timesteps} needs at least as many trainable steps: "
                            f"num_inference_steps {self.num_inference_steps} with timestep_fraction "  # type: ignore[attr-defined]
                            f"{self.timestep_fraction} leave {max(trainable, 0)} (step 0 is never trained)")  # type: ignore[attr-defined]
        if self.finetune != "lora" and (self.awm_ema_kl_coef > 0 or not buffer_is_on_policy(self)):  # type: ignore[attr-defined]
            raise UserError("AWM's EMA-KL and off-policy buffers (num_iterations > 1, or steps_per_generation not "
                            "dividing gradient_accumulation_steps) keep an extra LoRA adapter: set finetune: lora")


@dataclass
class DGPOArguments:
    """DGPO's own fields. ``dgpo_beta_dpo`` and ``dgpo_clip_range`` left unset take the published value of the
    chosen reference (``dgpo_reference``)."""

    dgpo_reference: str = field(default="frozen", metadata={"help": "The reference of the group score s_G: frozen = the base model (adapter off; beta_dpo 10-100) | ema = an EMA of the trained LoRA adapter, kept as a second adapter (beta_dpo 2000-5000; LoRA only). The KL term (beta) compares with the frozen base either way."})
    dgpo_beta_dpo: float | None = field(default=None, metadata={"help": f"Scale of the group's DPO-style score s_G inside the sigmoid weight (unset: {DGPO_BETA_DPO:g} with the frozen reference, {DGPO_BETA_DPO_EMA_REF:g} with the EMA one)."})
    dgpo_clip_range: float | None = field(default=None, metadata={"help": f"PPO-style clip of exp(err_old - err) in the direction of the advantage; only off-policy buffers clip (unset: {DGPO_CLIP_RANGE:g} with the frozen reference, {DGPO_CLIP_RANGE_EMA_REF:g} with the EMA one)."})
    dgpo_ema_decay_rate: float = field(default=DGPO_EMA_REF_DECAY_RATE, metadata={"help": "dgpo_reference ema: after the n-th optimizer step (n from 0) ema <- d ema + (1 - d) trained with d = min(rate n, cap): the rate."})
    dgpo_ema_decay_cap: float = field(default=DGPO_EMA_REF_DECAY_CAP, metadata={"help": "dgpo_reference ema: the cap of the decay (0.3: the EMA trails the policy by a few optimizer steps)."})

    @property
    def dgpo_ema_reference(self) -> bool:
        return self.dgpo_reference == "ema"

    def _validate_dgpo(self) -> None:
        if self.dgpo_reference not in DGPO_REFERENCES:
            raise UserError(f"dgpo_reference must be one of {DGPO_REFERENCES}, got {self.dgpo_reference!r}")
        ema = self.dgpo_ema_reference
        if self.dgpo_beta_dpo is None:
            self.dgpo_beta_dpo = DGPO_BETA_DPO_EMA_REF if ema else DGPO_BETA_DPO
        if self.dgpo_clip_range is None:
            self.dgpo_clip_range = DGPO_CLIP_RANGE_EMA_REF if ema else DGPO_CLIP_RANGE
        if self.dgpo_beta_dpo <= 0 or self.dgpo_clip_range < 0:
            raise UserError("dgpo_beta_dpo must be > 0 and dgpo_clip_range >= 0")
        if self.dgpo_ema_decay_rate < 0 or not 0 <= self.dgpo_ema_decay_cap < 1:
            raise UserError(f"dgpo_ema_decay_rate must be >= 0 and dgpo_ema_decay_cap in [0, 1), got "
                            f"{self.dgpo_ema_decay_rate} and {self.dgpo_ema_decay_cap}")
        spg, bs, n = self.steps_per_generation, self.rollout_batch_size, self.num_generations  # type: ignore[attr-defined]
        if spg > 1 and bs % n:
            raise UserError(f"DGPO scores whole groups per micro-step: with steps_per_generation {spg} > 1 the "
                            f"rollouts per micro-step ({bs}) must be a multiple of num_generations ({n})")
        if self.finetune != "lora" and ema:  # type: ignore[attr-defined]
            raise UserError("DGPO's EMA reference is a second LoRA adapter beside the trained one: set finetune: "
                            "lora (full fine-tuning is not supported), or dgpo_reference: frozen")
        if self.finetune != "lora" and not buffer_is_on_policy(self):  # type: ignore[attr-defined]
            raise UserError("DGPO with an off-policy buffer (num_iterations > 1, or steps_per_generation not "
                            "dividing gradient_accumulation_steps) keeps a snapshot LoRA adapter: set finetune: lora")


class _ForwardConfigMixin:
    """The common ``__post_init__`` of the standalone forward-process configs."""

    method = ""

    def __post_init__(self):
        self._monitor_defaults()  # type: ignore[attr-defined]  # before TrainingArguments.__post_init__
        super().__post_init__()  # type: ignore[misc]
        if self.beta < 0:  # type: ignore[attr-defined]
            raise UserError(f"beta must be >= 0, got {self.beta}")  # type: ignore[attr-defined]
        self._validate_online()  # type: ignore[attr-defined]
        getattr(self, f"_validate_{self.method}")()


_HELP_BETA = "Weight of the KL to the adapter-off reference mean((v - v_ref)^2)"


@dataclass
class NFTConfig(_ForwardConfigMixin, NFTArguments, OnlineArguments, QwenImageTrainingConfig):
    """DiffusionNFT (``qwen-image-align nft``). Defaults: the paper's (mix 1.0, linear old schedule, KL 1e-4, adv clip
    5, 10 CFG-free steps, 99 % of the timesteps trained, lr 3e-4, wd 1e-4, grad clip 1)."""

    method = "nft"
    beta: float = field(default=NFT_KL_COEF, metadata={"help": f"{_HELP_BETA} (NFT: 1e-4)."})
    true_cfg_scale: float = field(default=1.0, metadata={"help": "NFT samples CFG-free: must stay 1."})
    learning_rate: float = field(default=3e-4, metadata={"help": "The paper's LoRA learning rate."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping."})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay."})
    resolution: int = field(default=512, metadata={"help": "Rollout resolution in px."})


@dataclass
class AWMConfig(_ForwardConfigMixin, AWMArguments, OnlineArguments, QwenImageTrainingConfig):
    """AWM (``qwen-image-align awm``). Defaults: the paper's (ghuber p 0.25, 6 stratified timesteps of a 14-step grid
    cut at 90 %, KL 0.003 (OCR), advantages clipped to 5 and rescaled to 1, CFG-free, on-policy)."""

    method = "awm"
    beta: float = field(default=AWM_KL_COEF_OCR, metadata={"help": f"{_HELP_BETA} (AWM: 0.003 OCR, 0.001 GenEval)."})
    true_cfg_scale: float = field(default=1.0, metadata={"help": "AWM samples CFG-free: must stay 1."})
    num_inference_steps: int = field(default=14, metadata={"help": "ODE steps of a rollout (AWM: 14)."})
    timestep_fraction: float = field(default=AWM_TIMESTEP_FRACTION, metadata={"help": "The trained timesteps are strata of the first int(T * fraction) steps of the grid (step 0 left out)."})
    learning_rate: float = field(default=3e-4, metadata={"help": "LoRA learning rate."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping."})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay."})
    resolution: int = field(default=512, metadata={"help": "Rollout resolution in px."})


@dataclass
class DGPOConfig(_ForwardConfigMixin, DGPOArguments, OnlineArguments, QwenImageTrainingConfig):
    """DGPO (``qwen-image-align dgpo``). Defaults: the CFG-free frozen-reference mode (beta_dpo 100, clip 1e-3, KL
    0.02), 10 steps, 99 % of the timesteps trained. ``dgpo_reference: ema`` scores against an EMA adapter of the
    policy (beta_dpo 2000, clip 1e-5; the published KL weight is then 1e-3: set ``beta``)."""

    method = "dgpo"
    beta: float = field(default=DGPO_KL_COEF, metadata={"help": f"{_HELP_BETA} (DGPO: {DGPO_KL_COEF:g} with a frozen reference, {DGPO_KL_COEF_EMA_REF:g} in the EMA-reference config)."})
    true_cfg_scale: float = field(default=1.0, metadata={"help": "1 = CFG-free rollouts (> 1 samples with true CFG; training uses the conditional velocity)."})
    learning_rate: float = field(default=3e-4, metadata={"help": "LoRA learning rate."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping."})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay."})
    resolution: int = field(default=512, metadata={"help": "Rollout resolution in px."})
