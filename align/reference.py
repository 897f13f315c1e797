"""The frozen reference model of DPO (and of the KL term of the combined objective).

Three modes, chosen from how the policy is trained:

- ``adapter_off`` (LoRA, no ``init_adapter``): the reference is the SAME transformer with its adapters disabled.
  Exact (the base weights are untouched by LoRA training) and costs no memory.
- ``adapter_switch`` (LoRA starting from an SFT adapter): the reference is base + the SFT adapter, loaded a second
  time as a frozen adapter named ``ref``; the forward switches the active adapter from ``default`` to ``ref``.
  One extra LoRA of memory; the exported DPO adapter stays a single adapter that replaces the SFT one.
- ``copy`` (full fine-tune): a frozen deep copy made once (``trl``'s ``create_reference_model``), then prepared for
  the same distributed backend as the policy (ZeRO-3: its own DeepSpeed engine, partitioned; FSDP2: sharded per
  block). Optionally kept on CPU between uses (``offload=True``, single process / DDP only).

PEFT trap: ``enable_adapters()``/``set_adapter()`` set ``requires_grad=True`` on every active LoRA tensor and False on
the others, so the requires_grad flags are snapshotted before each reference forward and restored after it.
Call the reference AFTER the policy forward of a step: FSDP2 sets up its mixed-precision gradient dtypes lazily, on
the first forward. If that forward is the adapters-off reference (no trainable parameter in sight), the LoRA
gradients later arrive in bf16 where fp32 is expected and backward fails.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from typing import Callable, Iterator

import torch
from torch import nn

from qwen_image.sampling import Conditioning, predict_velocity

logger = logging.getLogger(__name__)

REF_ADAPTER_NAME = "ref"
REFERENCE_MODES = ("adapter_off", "adapter_switch", "copy")


class ReferenceModel:
    """Velocity of the frozen reference. Build with :meth:`from_policy` before the trainer wraps the policy."""

    def __init__(
        self,
        policy: nn.Module,
        mode: str,
        module: nn.Module | None = None,
        policy_adapter: str = "default",
        offload: bool = False,
        velocity_fn: Callable = predict_velocity,
    ):
        if mode not in REFERENCE_MODES:
            raise ValueError(f"reference mode must be one of {REFERENCE_MODES}, got {mode!r}")
        if mode == "copy" and module is None:
            raise ValueError("reference mode 'copy' needs the frozen module")
        if offload and mode != "copy":
            logger.info("reference offload ignored: the %s reference shares the policy's weights", mode)
        # ``policy`` is the unwrapped transformer: DDP wraps it, fully_shard and DeepSpeed keep the same object,
        # so it stays valid after the trainer prepares the model.
        self.policy = policy
        self.mode = mode
        self.module = module
        self.policy_adapter = policy_adapter
        self.offload = offload and mode == "copy"
        self.device: torch.device | None = None
        self.velocity_fn = velocity_fn  # the bundle's predict_velocity (the model family's velocity call)

    # ----------------------------------------------------------------------------------------------- building
    @classmethod
    def from_policy(
        cls,
        transformer: nn.Module,
        finetune: str,
        init_adapter: str | None = None,
        offload: bool = False,
        velocity_fn: Callable = predict_velocity,
    ) -> "ReferenceModel":
        """The reference for a policy set up by ``align.modeling.prepare_transformer`` (same ``finetune`` and
        ``init_adapter``). Must run before the model is wrapped or partitioned."""
        if finetune == "lora":
            if not getattr(transformer, "_hf_peft_config_loaded", False):
                raise ValueError("finetune='lora' but the transformer has no LoRA adapter; call prepare_transformer first.")
            if init_adapter:
                _load_frozen_adapter(transformer, init_adapter, REF_ADAPTER_NAME)
                return cls(transformer, "adapter_switch", offload=offload, velocity_fn=velocity_fn)
            return cls(transformer, "adapter_off", offload=offload, velocity_fn=velocity_fn)
        if finetune != "full":
            raise ValueError(f"finetune must be 'lora' or 'full', got {finetune!r}")
        if any(hasattr(p, "ds_id") for p in transformer.parameters()):
            raise ValueError("the policy is already ZeRO-3 partitioned; build the reference before the trainer prepares the model.")
        return cls(transformer, "copy", module=_frozen_copy(transformer), offload=offload, velocity_fn=velocity_fn)

    def prepare(self, accelerator=None, fsdp_mesh=None, mp_policy=None) -> "ReferenceModel":
        """Place a ``copy`` reference for the policy's backend (no-op for the adapter modes).

        With an ``accelerate.Accelerator``: DeepSpeed -> its own ZeRO engine (TRL's ``prepare_deepspeed``), FSDP ->
        per-block ``fully_shard``, otherwise moved to the device. ``fsdp_mesh`` shards with raw FSDP2 (no Accelerator).
        """
        if accelerator is not None:
            self.device = accelerator.device
        if self.mode != "copy":
            return self
        dist_type = str(getattr(getattr(accelerator, "state", None), "distributed_type", "")) if accelerator else ""
        if fsdp_mesh is not None or dist_type.endswith("FSDP"):
            from torch.distributed.fsdp import MixedPrecisionPolicy

            if mp_policy is None and accelerator is not None:
                mp_policy = accelerator.state.fsdp_plugin.mixed_precision_policy
            mesh = fsdp_mesh if fsdp_mesh is not None else getattr(accelerator, "torch_device_mesh", None)
            if self.device is not None:
                self.module.to(self.device)
            shard_transformer(self.module, mesh=mesh, mp_policy=mp_policy or MixedPrecisionPolicy())
        elif dist_type.endswith("DEEPSPEED"):
            from trl.models.utils import prepare_deepspeed

            self.module = prepare_deepspeed(self.module, accelerator)
        elif self.device is not None and not self.offload:
            self.module.to(self.device)
        return self

    # ----------------------------------------------------------------------------------------------- using
    @contextlib.contextmanager
    def active(self) -> Iterator[nn.Module]:
        """Yield a module whose forward is the reference's (grad flags and adapters restored on exit)."""
        if self.mode == "copy":
            device = self.device or _device_of(self.policy)
            if self.offload:
                self.module.to(device)
            try:
                yield self.module
            finally:
                self._reshard()
                if self.offload:
                    self.module.to("cpu")
            return
        flags = [(p, p.requires_grad) for p in self.policy.parameters()]
        try:
            if self.mode == "adapter_off":
                self.policy.disable_adapters()
            else:
                self.policy.set_adapter(REF_ADAPTER_NAME)
            yield self.policy
        finally:
            if self.mode == "adapter_off":
                self.policy.enable_adapters()
            else:
                self.policy.set_adapter(self.policy_adapter)
            for p, flag in flags:
                p.requires_grad_(flag)

    @torch.no_grad()
    def velocity(
        self,
        latents: torch.Tensor,
        sigma: torch.Tensor | float,
        cond: Conditioning,
        img_shapes: list,
        negative: Conditioning | None = None,
        true_cfg_scale: float = 1.0,
    ) -> torch.Tensor:
        """Reference velocity with the same call as ``qwen_image.sampling.predict_velocity`` (for DPO and KL terms)."""
        with self.active() as module:
            v = self.velocity_fn(module, latents, sigma, cond, img_shapes, negative, true_cfg_scale)
        return v.detach()

    def _reshard(self) -> None:
        # FSDP2's root keeps its parameters unsharded after a forward without backward (reshard_after_forward=False
        # by default on the root): free them now, or the copy stays gathered for the rest of the step.
        if self.mode == "copy" and hasattr(self.module, "reshard"):
            self.module.reshard()


def shard_transformer(transformer: nn.Module, mesh=None, mp_policy=None, reshard_after_forward: bool = True) -> nn.Module:
    """FSDP2: ``fully_shard`` every repeated block (the classes the diffusers model declares in
    ``_repeated_blocks``: ``QwenImageTransformerBlock``, ...), then the root (LoRA must be added before)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp_policy = mp_policy or MixedPrecisionPolicy()
    block_names = set(getattr(transformer, "_repeated_blocks", None) or ("QwenImageTransformerBlock",))
    for block in transformer.modules():
        if type(block).__name__ in block_names:
            fully_shard(block, mesh=mesh, mp_policy=mp_policy)
    fully_shard(transformer, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward)
    return transformer


def _frozen_copy(transformer: nn.Module) -> nn.Module:
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        # trl refuses under ZeRO-3 (it cannot copy partitioned params); ours are not partitioned yet (checked
        # above), so the same deep copy is correct here.
        ref = copy.deepcopy(transformer)
        ref.requires_grad_(False)
        return ref.eval()
    import warnings

    with warnings.catch_warnings():  # "importing from trl.experimental" is noise for one stable helper
        warnings.simplefilter("ignore")
        from trl.experimental.utils import create_reference_model
    return create_reference_model(transformer)


def _load_frozen_adapter(transformer: nn.Module, path: str, adapter_name: str) -> None:
    from .adapters import load_lora_file

    active = list(transformer.active_adapters())
    flags = [(p, p.requires_grad) for p in transformer.parameters()]
    load_lora_file(transformer, path, adapter_name)
    transformer.set_adapter(active)
    for p, flag in flags:
        p.requires_grad_(flag)
    for name, p in transformer.named_parameters():
        if f".{adapter_name}." in name:
            p.requires_grad_(False)
            # The policy's adapter trains in fp32 (cast in add_lora); keep the reference's identical.
            p.data = p.data.float()


def _device_of(module: nn.Module) -> torch.device:
    p = next(module.parameters())
    return getattr(p, "device", torch.device("cpu"))
