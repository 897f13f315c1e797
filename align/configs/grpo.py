"""Online-RL options: ``OnlineArguments`` (what every online objective shares: prompts, groups, rewards, rollout
batching, the held-out monitor), ``GRPOArguments`` (Flow-GRPO's own fields on top; both are mixins shared by the
standalone and the combined trainers' configs) and ``GRPOConfig`` (GRPOTrainer's config)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

from ..losses.grpo import KL_FORMS, POLICY_LOSSES, TRUST_REGION_FORMS, sde_window_for
from .base import QwenImageTrainingConfig

SCALE_REWARDS = ("group", "batch", "none", "true", "false")


@dataclass
class OnlineArguments:
    """Fields every online objective shares (prompts, groups, rewards, rollout batching, the held-out monitor; TRL's
    names where the idea is the same; defaults from flow_grpo). Mixed into trainer configs; ``grpo_batch_size`` is
    the number of rollouts per process per micro-step whatever the online method."""

    num_generations: int = field(default=8, metadata={"help": "Images per prompt (the group for advantages); flow_grpo: 16-24."})
    scale_rewards: str = field(default="group", metadata={"help": "group: divide by the group std; batch: by the batch std; none: only centre."})
    adv_clip_max: float = field(default=5.0, metadata={"help": "Advantages are clipped to [-adv_clip_max, adv_clip_max]."})
    num_iterations: int = field(default=1, metadata={"help": "Optimisation passes over each rollout buffer (PPO epochs)."})
    steps_per_generation: int | None = field(default=None, metadata={"help": "Micro-batches per rollout buffer (default: gradient_accumulation_steps)."})
    reward_funcs: list[str] = field(default_factory=lambda: ["ocr"], metadata={"help": "Reward names from the rewards registry (rewards.available_rewards())."})
    reward_weights: list[float] | None = field(default=None, metadata={"help": "One weight per reward (default 1 each)."})
    reward_kwargs: dict | str | None = field(default=None, metadata={"help": "Options per reward, e.g. {\"clip\": {\"model_path\": \"/models/clip\"}} (a dict or JSON)."})
    reward_no_signal_limit: int = field(default=3, metadata={"help": "Stop the run when the reward gives no signal (every image None/NaN, or one score for all) for this many rollout batches in a row; 0: never. Beside other training terms (combined objective) one score for all only warns."})
    train_prompts: list[str] = field(default_factory=list, metadata={"help": "Inline prompts (instead of dataset_name)."})
    num_inference_steps: int = field(default=10, metadata={"help": "Sampler steps of a rollout (flow_grpo trains with 10, evaluates with 40-50)."})
    timestep_fraction: float = field(default=0.99, metadata={"help": "Fraction of the SDE steps trained per batch: int(T * fraction), a random subset."})
    true_cfg_scale: float = field(default=4.0, metadata={"help": "True CFG at rollout and training (1 = no CFG: faster, acts as CFG distillation)."})
    negative_prompt: str = field(default=" ", metadata={"help": "Negative prompt for true CFG."})
    release_text_encoder: bool = field(default=True, metadata={"help": "Encode every training prompt and the negative prompt once (kept on CPU), then free the text encoder (8 B params on the real model) before training."})
    num_images_to_log: int = field(default=8, metadata={"help": "Rollout images (with rewards) sent to wandb at each log step; 0 = none."})
    # --- over-optimisation monitors (align/rl/monitor.py); measured every eval_steps
    monitor_prompts: list[str] = field(default_factory=list, metadata={"help": "Held-out prompts (never trained on) rendered with the ODE sampler at fixed seeds every eval_steps; needs eval_strategy: steps."})
    monitor_dataset_name: str | None = field(default=None, metadata={"help": "Held-out prompts as a file/dataset (prompt + reward columns), instead of monitor_prompts."})
    monitor_seeds: int = field(default=4, metadata={"help": "Seeds per held-out prompt (diversity is measured across them)."})
    monitor_reward_funcs: list[str] | None = field(default=None, metadata={"help": "Rewards for the held-out evaluation (default: reward_funcs); a judge the policy is not trained on sees hacking first."})
    monitor_num_inference_steps: int | None = field(default=None, metadata={"help": "ODE steps of the held-out renders (default: num_inference_steps)."})
    early_stop_patience: int = field(default=0, metadata={"help": "Stop when the held-out reward fell this many evaluations in a row while the training reward rose, and keep the best held-out checkpoint (0 = never stop)."})
    grpo_batch_size: int | None = field(default=None, metadata={"help": "Rollouts per process per micro-step (sampled and trained together); default: per_device_train_batch_size. The combined trainer's DPO pairs keep per_device_train_batch_size."})

    @property
    def has_monitor(self) -> bool:
        return bool(self.monitor_prompts or self.monitor_dataset_name)

    def _monitor_defaults(self) -> None:
        """Before TrainingArguments.__post_init__: the early stop keeps the best held-out checkpoint, through the
        Trainer's own best-model tracking (checkpoints at every evaluation)."""
        def value(v):
            return str(getattr(v, "value", v)).lower()

        if self.monitor_seeds < 1:
            raise ValueError(f"monitor_seeds must be >= 1, got {self.monitor_seeds}")
        if self.early_stop_patience < 0:
            raise ValueError(f"early_stop_patience must be >= 0, got {self.early_stop_patience}")
        if self.early_stop_patience and not self.has_monitor:
            raise ValueError("early_stop_patience needs held-out prompts: set monitor_prompts or monitor_dataset_name.")
        if self.has_monitor and value(self.eval_strategy) == "no":  # type: ignore[attr-defined]
            raise ValueError("monitor_prompts are evaluated on the Trainer's schedule: set eval_strategy: steps and "
                             "eval_steps: N.")
        if self.early_stop_patience:
            self.load_best_model_at_end = True
            self.metric_for_best_model = self.metric_for_best_model or "eval_reward"
            if self.greater_is_better is None:
                self.greater_is_better = True
            every_eval = self.eval_steps or self.logging_steps  # type: ignore[attr-defined]
            if value(self.save_strategy) == "no":  # type: ignore[attr-defined]
                self.save_strategy = "steps"
                self.save_steps = every_eval
            elif value(self.save_strategy) == "steps" and self.save_steps != every_eval:  # type: ignore[attr-defined]
                # The best held-out checkpoint can only be kept if one is written at every evaluation.
                logging.getLogger(__name__).warning(
                    f"early_stop_patience keeps the best held-out checkpoint: saving at every evaluation "
                    f"(save_steps {self.save_steps:g} -> {every_eval:g})")  # type: ignore[attr-defined]
                self.save_steps = every_eval

    def _validate_online(self) -> None:
        if self.num_generations < 2:
            raise ValueError(f"num_generations must be >= 2 (advantages compare images of the same prompt), got {self.num_generations}")
        if str(self.scale_rewards).lower() not in SCALE_REWARDS:
            raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS[:3]}, got {self.scale_rewards!r}")
        if self.num_iterations < 1:
            raise ValueError(f"num_iterations must be >= 1, got {self.num_iterations}")
        if not 0 < self.timestep_fraction <= 1:
            raise ValueError(f"timestep_fraction must be in (0, 1], got {self.timestep_fraction}")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_funcs):
            raise ValueError(f"{len(self.reward_weights)} reward_weights for {len(self.reward_funcs)} reward_funcs")
        if isinstance(self.reward_kwargs, str):
            try:
                self.reward_kwargs = json.loads(self.reward_kwargs) if self.reward_kwargs.strip() else None
            except json.JSONDecodeError as err:
                raise ValueError(f"reward_kwargs is not valid JSON: {err}") from None
        if self.grpo_batch_size is not None and self.grpo_batch_size < 1:
            raise ValueError(f"grpo_batch_size must be >= 1, got {self.grpo_batch_size}")
        if self.steps_per_generation is None:
            self.steps_per_generation = self.gradient_accumulation_steps  # type: ignore[attr-defined]
        if self.steps_per_generation < 1:
            raise ValueError(f"steps_per_generation must be >= 1, got {self.steps_per_generation}")
        global_batch = self.generation_batch_size
        if global_batch % self.num_generations:
            name = "grpo_batch_size" if self.grpo_batch_size else "per_device_train_batch_size"
            raise ValueError(
                f"the generation batch ({name} * processes * steps_per_generation = {global_batch}) "
                f"must be a multiple of num_generations ({self.num_generations})."
            )

    @property
    def rollout_batch_size(self) -> int:
        """Rollouts per process per micro-step."""
        return self.grpo_batch_size or self.per_device_train_batch_size  # type: ignore[attr-defined]

    @property
    def generation_batch_size(self) -> int:
        return self.rollout_batch_size * self.world_size * self.steps_per_generation  # type: ignore[attr-defined]

    @property
    def scale_mode(self) -> str:
        return {"true": "group", "false": "none"}.get(str(self.scale_rewards).lower(), str(self.scale_rewards).lower())


@dataclass
class GRPOArguments(OnlineArguments):
    """Flow-GRPO's own fields (SDE rollouts, the ratio's clip / guard / trust region) on top of the shared ones."""

    epsilon: float = field(default=1e-4, metadata={"help": "Clip range of the ratio; tiny because log-probs are per-element means (flow_grpo 1e-4; 1e-5 for Fast). dppo: the per-step KL trust region eps_D (1e-5 in the paper)."})
    policy_loss: str = field(default="clip", metadata={"help": "clip (Flow-GRPO's clipped ratio) | guard (GRPO-Guard: normalised ratio, 1/|dt| step weights) | dppo (Flow-DPPO: exact per-step KL trust region instead of the clip). guard/dppo keep each step's rollout mean (more rollout memory)."})
    guard_reweight: bool = field(default=True, metadata={"help": "guard: weight each step's loss by 1/|dt| (the paper's reweighting)."})
    trust_region_form: str = field(default="paper", metadata={"help": "dppo: how the per-step trust region D_t is measured. paper: mean((mu-mu_old)^2) / (2 sigma_t^2 |dt|), the form the paper's eps_D = 1e-5 refers to; flow_grpo: without |dt| (|dt| times smaller, so 10-50x looser at the same eps); exact: summed over dims. Separate from kl_form (the reference KL)."})
    kl_form: str = field(default="flow_grpo", metadata={"help": "flow_grpo: mean((mu-mu_ref)^2)/(2 sigma_t^2), the form published betas assume; exact: ||mu-mu_ref||^2/(2 sigma_t^2 |dt|)."})
    noise_level: float = field(default=0.7, metadata={"help": "SDE noise level a (sigma_t = a sqrt(s/(1-s))); flow_grpo 0.7 (Qwen-Image 1.2 with a window)."})
    sde_window_size: int = field(default=0, metadata={"help": "Flow-GRPO-Fast: SDE (and training) only on this many steps; 0 = every step."})
    sde_window_range: list[int] | None = field(default=None, metadata={"help": "[lo, hi): where the window may start (default [0, steps/2))."})

    def _validate_grpo(self) -> None:
        self._validate_online()
        if self.policy_loss not in POLICY_LOSSES:
            raise ValueError(f"policy_loss must be one of {POLICY_LOSSES}, got {self.policy_loss!r}")
        if self.trust_region_form not in TRUST_REGION_FORMS:
            raise ValueError(f"trust_region_form must be one of {TRUST_REGION_FORMS}, got {self.trust_region_form!r}")
        if self.kl_form not in KL_FORMS:
            raise ValueError(f"kl_form must be one of {KL_FORMS}, got {self.kl_form!r}")
        if self.noise_level <= 0:
            raise ValueError(f"noise_level must be > 0 for GRPO rollouts, got {self.noise_level}")
        if self.epsilon <= 0:
            raise ValueError(f"epsilon must be > 0, got {self.epsilon}")
        if self.sde_window_size:
            sde_window_for(self.num_inference_steps, self.sde_window_size, self.sde_window_range)


@dataclass
class GRPOConfig(GRPOArguments, QwenImageTrainingConfig):
    """Flow-GRPO settings. Defaults follow flow_grpo (lr 3e-4 LoRA, eps 1e-4, a 0.7, 10 steps, 99% of steps trained)."""

    beta: float = field(default=0.0, metadata={"help": "KL weight to the frozen reference (flow_grpo: 0.04 OCR/GenEval, 0.01 PickScore; 0 = no reference forward)."})
    learning_rate: float = field(default=3e-4, metadata={"help": "flow_grpo's LoRA learning rate."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping."})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay (flow_grpo)."})
    resolution: int = field(default=512, metadata={"help": "Rollout resolution in px (flow_grpo trains Qwen-Image at 512)."})

    def __post_init__(self):
        self._monitor_defaults()
        super().__post_init__()
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        self._validate_grpo()
