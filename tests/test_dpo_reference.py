"""The frozen reference: LoRA adapters-off == base model exactly; base+SFT adapter when starting from one; full
fine-tune copy unchanged by training; PEFT's requires_grad side effects undone."""

import pytest
import torch

from align.configs import QwenImageTrainingConfig
from align.modeling import prepare_transformer
from align.reference import ReferenceModel
from qwen_image.latents import img_shapes
from qwen_image.sampling import Conditioning, predict_velocity
from qwen_image.tiny import tiny_transformer


class _Bundle:  # prepare_transformer only reads .transformer
    def __init__(self, transformer):
        self.transformer = transformer


def _config(tmp_path, **kw):
    return QwenImageTrainingConfig(output_dir=str(tmp_path), lora_rank=4, lora_alpha=8, report_to=[], **kw)


def _inputs(seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 16, 64, generator=g)  # 64x64 px -> 4x4 packed tokens
    cond = Conditioning(torch.randn(batch, 5, 32, generator=g), None)
    sigma = torch.rand(batch, generator=g)
    return latents, sigma, cond, img_shapes(batch, 64, 64)


def _perturb_lora(transformer, seed=1):
    # Gaussian init leaves lora_B = 0 (adapters on == off): move it or the checks are vacuous.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.5)


def _train_steps(transformer, n=3):
    params = [p for p in transformer.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5)
    for step in range(n):
        latents, sigma, cond, shapes = _inputs(seed=10 + step)
        v = predict_velocity(transformer, latents, sigma, cond, shapes)
        opt.zero_grad()
        (v ** 2).mean().backward()
        opt.step()


def test_lora_reference_equals_base_model_exactly(tmp_path):
    base = tiny_transformer(seed=0).eval()
    policy = prepare_transformer(_Bundle(tiny_transformer(seed=0)), _config(tmp_path))
    ref = ReferenceModel.from_policy(policy, "lora")
    assert ref.mode == "adapter_off"
    _perturb_lora(policy)
    _train_steps(policy)
    # Freeze one LoRA tensor on purpose: PEFT's enable_adapters() would silently unfreeze it.
    frozen_name, frozen = next((n, p) for n, p in policy.named_parameters() if "lora_A" in n)
    frozen.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in policy.named_parameters()}

    x = _inputs(seed=3)
    with torch.no_grad():
        v_base = predict_velocity(base, *x)
        v_policy = predict_velocity(policy, *x)
    v_ref = ref.velocity(*x)
    assert not torch.equal(v_policy, v_base)  # the adapter really changes the output
    assert torch.equal(v_ref, v_base)  # exact, not approximately
    assert not v_ref.requires_grad
    # Adapters back on and grad flags exactly as before the reference pass.
    with torch.no_grad():
        assert torch.equal(predict_velocity(policy, *x), v_policy)
    assert {n: p.requires_grad for n, p in policy.named_parameters()} == flags
    assert not dict(policy.named_parameters())[frozen_name].requires_grad


def test_full_finetune_reference_is_frozen_copy(tmp_path):
    policy = prepare_transformer(_Bundle(tiny_transformer(seed=0)), _config(tmp_path, finetune="full"))
    ref = ReferenceModel.from_policy(policy, "full", offload=True).prepare()
    assert ref.mode == "copy" and ref.module is not policy
    before = {n: p.detach().clone() for n, p in ref.module.named_parameters()}
    x = _inputs(seed=3)
    v_ref0 = ref.velocity(*x)
    _train_steps(policy)
    after = dict(ref.module.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert all(not p.requires_grad for p in after.values())
    changed = sum(not torch.equal(before[n], p) for n, p in policy.named_parameters())
    assert changed > 10  # the policy did train
    assert torch.equal(ref.velocity(*x), v_ref0)
    with torch.no_grad():
        assert not torch.equal(predict_velocity(policy, *x), v_ref0)


def test_reference_from_sft_adapter_is_base_plus_adapter(tmp_path):
    from align.export import save_lora

    # An "SFT" adapter with alpha != rank (its metadata must be honoured by both copies).
    sft = prepare_transformer(_Bundle(tiny_transformer(seed=0)), _config(tmp_path / "sft"))
    _perturb_lora(sft, seed=5)
    save_lora(sft, tmp_path / "sft_out")
    x = _inputs(seed=4)
    with torch.no_grad():
        v_sft = predict_velocity(sft, *x)

    init = str(tmp_path / "sft_out")
    policy = prepare_transformer(_Bundle(tiny_transformer(seed=0)), _config(tmp_path, init_adapter=init))
    ref = ReferenceModel.from_policy(policy, "lora", init_adapter=init)
    assert ref.mode == "adapter_switch"
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)
    with torch.no_grad():
        assert torch.allclose(predict_velocity(policy, *x), v_sft, atol=1e-6)  # policy starts at base+SFT
    _train_steps(policy)
    assert {n for n, p in policy.named_parameters() if p.requires_grad} == trainable
    v_ref = ref.velocity(*x)
    assert torch.allclose(v_ref, v_sft, atol=1e-6)
    with torch.no_grad():
        assert not torch.allclose(predict_velocity(policy, *x), v_sft, atol=1e-3)
    assert {n for n, p in policy.named_parameters() if p.requires_grad} == trainable
    assert policy.active_adapters() == ["default"]


def test_user_errors(tmp_path):
    with pytest.raises(ValueError, match="no LoRA adapter"):
        ReferenceModel.from_policy(tiny_transformer(seed=0), "lora")
    with pytest.raises(ValueError, match="finetune must be"):
        ReferenceModel.from_policy(tiny_transformer(seed=0), "qlora")
