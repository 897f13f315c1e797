"""A LoRA whose adapters-on output differs from adapters-off, for tests that compare policy and reference, and how
far a trained LoRA moved."""


def perturbed_lora(q, targets=("to_q", "to_k", "to_v", "to_out.0"), seed: int = 1, scale: float = 0.05):
    """Add a LoRA to ``q.transformer`` and move lora_B off zero (gaussian init leaves adapters-on == off)."""
    from peft import LoraConfig

    q.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=list(targets)))
    lora_b_off_zero(q.transformer, seed, scale)
    return q


def lora_b_off_zero(model, seed: int = 1, scale: float = 0.05):
    """Move every lora_B of ``model`` off zero (seeded), so the adapter changes the output; returns the trainable
    parameters."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return [p for p in model.parameters() if p.requires_grad]


def lora_b_moved(state: dict) -> float:
    """The largest |lora_B| of a LoRA state dict: PEFT starts lora_B at zero, so > 0 means the adapter trained."""
    return max(float(v.abs().max()) for k, v in state.items() if "lora_B" in k)
