"""Low-VRAM options on the tiny model: quantised (fp8, int8, nf4) and streamed bases give LoRA gradients close to
(streaming: equal to) the unquantised model's, checkpointing is forced where it must be, the memory trap is real,
impossible combinations are one-line errors, and every objective trains on a quantised base and saves an adapter
that loads in diffusers' QwenImagePipeline on the unquantised base."""

import logging
from pathlib import Path

import pytest
import torch

from align.configs import QwenImageTrainingConfig
from align.lowvram import BlockStreamer, quantize_linears, storage_bytes
from align.memory import LinearShape, Options, estimate, linear_weight_bytes
from align.modeling import apply_storage, prepare_transformer
from qwen_image import QwenImage
from qwen_image.latents import img_shapes
from qwen_image.sampling import Conditioning, predict_velocity

ROOT = Path(__file__).resolve().parents[1]
# Relative L2 error of all LoRA gradients together vs the fp32 unquantised model (tiny random weights, one step).
# Measured: int8 0.006, fp8 0.03, nf4 0.12; streaming moves weights, it does not change them: exact.
TOLERANCE = {"none": 0.0, "int8": 0.03, "fp8": 0.08, "nf4": 0.25}


def _config(tmp_path, **kw) -> QwenImageTrainingConfig:
    return QwenImageTrainingConfig(output_dir=str(tmp_path), use_cpu=True, lora_rank=4, lora_alpha=4, report_to="none", **kw)


def _policy(tmp_path, **kw):
    config = _config(tmp_path, **kw)
    qwen = QwenImage.tiny(seed=0)
    apply_storage(qwen, config)
    torch.manual_seed(5)  # the same LoRA init whatever the storage
    transformer = prepare_transformer(qwen, config)
    g = torch.Generator().manual_seed(1)
    for name, p in transformer.named_parameters():  # lora_B off zero, or lora_A gets no gradient
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.05
    return transformer


def _lora_grads(transformer) -> dict[str, torch.Tensor | None]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 64, generator=g)
    text = torch.randn(2, 7, 32, generator=g)
    v = predict_velocity(transformer, x, torch.tensor([0.3, 0.7]), Conditioning(text, None), img_shapes(2, 64, 64))
    v.pow(2).mean().backward()
    return {n: (None if p.grad is None else p.grad.clone()) for n, p in transformer.named_parameters() if "lora_" in n}


@pytest.fixture(scope="module")
def reference_grads(tmp_path_factory):
    return _lora_grads(_policy(tmp_path_factory.mktemp("ref")))


LAST_TEXT_STREAM = ("transformer_blocks.1.attn.to_add_out", "transformer_blocks.1.txt_mlp")


@pytest.mark.parametrize("storage,streaming", [("fp8", "none"), ("int8", "none"), ("nf4", "none"), ("none", "blocks"),
                                               ("int8", "blocks"), ("nf4", "blocks")])
def test_lora_gradients_close_to_the_unquantised_model(storage, streaming, reference_grads, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="align.modeling"):
        transformer = _policy(tmp_path, base_storage=storage, weight_streaming=streaming)
    assert transformer.gradient_checkpointing  # forced on: without it nothing is saved (trap 1)
    assert any("gradient checkpointing switched on" in r.message for r in caplog.records)
    grads = _lora_grads(transformer)
    assert grads.keys() == reference_grads.keys()
    # Every LoRA parameter gets a gradient except the last block's text stream (its output is never used).
    missing = sorted(n for n, g in grads.items() if g is None)
    assert missing and all(n.startswith(LAST_TEXT_STREAM) for n in missing)
    assert missing == sorted(n for n, g in reference_grads.items() if g is None)
    names = [n for n, g in reference_grads.items() if g is not None]
    ref = torch.cat([reference_grads[n].flatten() for n in names])
    got = torch.cat([grads[n].flatten() for n in names])
    assert torch.isfinite(got).all()
    rel = ((got - ref).norm() / ref.norm()).item()
    if storage == "none":
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)  # streaming is exact
    else:
        assert rel < TOLERANCE[storage], f"{storage}: relative gradient error {rel:.4f}"
        assert rel > 0  # it really is quantised
    if streaming == "blocks":
        streamer = transformer._block_streamer
        assert streamer.fetches == 2 * 2  # 2 blocks x (forward + recompute in backward)
        # Released between uses (backward could not have used a stale copy); block 0, recomputed last, until asked.
        assert transformer.transformer_blocks[1].attn.to_q.base_layer.weight.numel() == 0
        streamer.release_all()
        assert transformer.transformer_blocks[0].attn.to_q.base_layer.weight.numel() == 0


@pytest.mark.parametrize("storage", ["int8", "nf4"])
def test_streamed_gradients_equal_the_same_base_resident(storage, tmp_path):
    resident = _lora_grads(_policy(tmp_path / "a", base_storage=storage))
    streamed = _lora_grads(_policy(tmp_path / "b", base_storage=storage, weight_streaming="blocks", resident_blocks=1))
    for name, g in resident.items():
        if g is None:
            assert streamed[name] is None
        else:
            torch.testing.assert_close(streamed[name], g, rtol=1e-5, atol=1e-7)


def test_without_checkpointing_a_quantised_base_keeps_full_precision_weight_copies():
    """The trap the forced checkpointing avoids, measured with saved-tensor hooks on one tiny block."""
    from peft import LoraConfig, inject_adapter_in_model

    def saved_weight_shaped(model, checkpointing: bool, new: bool = True) -> int:
        shapes = {tuple(m.weight.shape) for m in model.modules() if isinstance(m, torch.nn.Linear)}
        found = []

        def pack(t):
            if tuple(t.shape) in shapes and t.dtype == torch.float32 and t.dim() == 2:
                found.append(t)
            return t

        x = torch.randn(1, 16, 64)
        if checkpointing:
            model.enable_gradient_checkpointing()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            v = predict_velocity(model, x, torch.tensor([0.5]), Conditioning(torch.randn(1, 7, 32), None), img_shapes(1, 64, 64))
        v.sum().backward()
        params = {p.untyped_storage().data_ptr() for p in model.parameters() if type(p.data) is torch.Tensor}
        return sum(1 for t in found if (t.untyped_storage().data_ptr() not in params) == new)

    from align.configs import DEFAULT_LORA_TARGETS
    from qwen_image.tiny import tiny_transformer

    def model(storage="int8"):
        m = tiny_transformer(0)
        m.requires_grad_(False)
        quantize_linears(m.transformer_blocks, storage, torch.float32)
        return inject_adapter_in_model(LoraConfig(r=2, target_modules=DEFAULT_LORA_TARGETS), m)

    # Unquantised, backward keeps the block weights themselves (no new tensors); int8 keeps NEW full-precision copies
    # of the de-quantised block weights - most of the 28 block Linears of the tiny model (the last block's unused
    # text stream aside) - unless the blocks are checkpointed.
    assert saved_weight_shaped(model("none"), checkpointing=False, new=False) >= 16
    block_linears = sum(isinstance(m, torch.nn.Linear) for m in tiny_transformer(0).transformer_blocks.modules())
    assert saved_weight_shaped(model(), checkpointing=False) >= block_linears // 2
    assert saved_weight_shaped(model(), checkpointing=True) == 0


def test_streamer_keeps_resident_blocks_and_moves_only_frozen_weights(tmp_path):
    transformer = _policy(tmp_path, weight_streaming="blocks", resident_blocks=1)
    streamer: BlockStreamer = transformer._block_streamer
    assert streamer.streamed_blocks == 1
    assert transformer.transformer_blocks[0].attn.to_q.base_layer.weight.numel() > 0
    streamed = transformer.transformer_blocks[1]
    assert streamed.attn.to_q.base_layer.weight.numel() == 0
    assert streamed.attn.to_q.lora_A["default"].weight.requires_grad  # LoRA stays put and trains


@pytest.mark.parametrize("kw,match", [
    (dict(finetune="full", base_storage="fp8"), "needs finetune=lora"),
    (dict(finetune="full", weight_streaming="blocks"), "full fine-tuning trains them"),
    (dict(base_storage="int4"), "base_storage must be one of"),
    (dict(weight_streaming="layers"), "weight_streaming must be one of"),
    (dict(resident_blocks=-1), "resident_blocks"),
])
def test_impossible_combinations_are_one_line_errors(kw, match, tmp_path):
    with pytest.raises(ValueError, match=match) as err:
        _config(tmp_path, **kw)
    assert "\n" not in str(err.value)


def test_streaming_or_quantised_base_under_fsdp_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ValueError, match="cannot run under fsdp"):
        _config(tmp_path, weight_streaming="blocks")
    with pytest.raises(ValueError, match="cannot run under fsdp"):
        _config(tmp_path, base_storage="nf4")


def test_nf4_without_bitsandbytes_is_a_clear_error(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ValueError, match="pip install bitsandbytes"):
        _config(tmp_path, base_storage="nf4")


# ----------------------------------------------------------------------------------------------- estimate
@pytest.mark.parametrize("storage,nested", [("none", False), ("int8", False), ("fp8", False), ("nf4", False), ("nf4", True)])
def test_estimated_format_bytes_match_real_quantised_layers(storage, nested):
    layer = torch.nn.Sequential(torch.nn.Linear(256, 1024)).to(torch.bfloat16)
    quantize_linears(layer, storage, torch.bfloat16, nested=nested)
    predicted = linear_weight_bytes(LinearShape("l", 256, 1024, True), storage, 2, nested)
    assert abs(storage_bytes(layer) - predicted) / predicted < 0.01


def test_estimate_orders_the_options_and_counts_the_trap():
    bf16, fp8, nf4 = (estimate(Options(base_storage=s)) for s in ("none", "fp8", "nf4"))
    assert nf4.parts["weights"] < fp8.parts["weights"] < bf16.parts["weights"]
    assert 37 < bf16.parts["weights"] < 39  # 20.4 B params in bf16 = 38.1 GiB
    streamed = estimate(Options(base_storage="fp8", weight_streaming="blocks", resident_blocks=4))
    assert streamed.parts["weights"] < fp8.parts["weights"] / 5 and streamed.host_gib > 15
    no_ckpt = estimate(Options(base_storage="fp8", gradient_checkpointing=False))
    assert no_ckpt.parts["activations"] > fp8.parts["activations"] + 38  # de-quantised copies of every block
    dpo, sft = estimate(Options(objective="dpo")), estimate(Options(objective="sft"))
    assert dpo.parts["activations"] > sft.parts["activations"]
    eight = estimate(Options(optimizer_8bit=True, lora_targets=("to_q",)))
    full = estimate(Options(lora_targets=("to_q",)))
    assert eight.parts["optimizer"] == pytest.approx(full.parts["optimizer"] / 4)


def test_estimate_only_prints_and_exits_before_loading(tmp_path, capsys):
    from align.sft import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(ROOT / "recipes/tiny/sft_lora.yaml"), "--output_dir", str(tmp_path),
              "--dataset_name", str(tmp_path / "no-such-data"), "--estimate_only", "true", "--base_storage", "nf4"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "estimated peak GPU memory" in out and "base nf4" in out and "(sft, lora r4" in out


# ----------------------------------------------------------------------------------------------- every objective
def _sft_data(root: Path) -> Path:
    import json

    import numpy as np
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    with open(root / "metadata.jsonl", "w") as fh:
        for i, prompt in enumerate(["a red square", "a blue circle"]):
            arr = (np.random.default_rng(i).random((4, 4, 3)) * 255).astype(np.uint8)
            Image.fromarray(arr).resize((32, 32), Image.NEAREST).save(root / f"{i}.png")
            fh.write(json.dumps({"file_name": f"{i}.png", "prompt": prompt}) + "\n")
    return root


def _run(objective: str, tmp_path: Path, options: list[str]):
    from align.data.preference import write_synthetic_pairs

    common = ["--output_dir", str(tmp_path / "out"), "--max_steps", "2", "--disable_tqdm", "true", "--lora_rank", "4",
              "--lora_alpha", "4", "--validation_prompts", "[]", *options]
    if objective == "sft":
        from align.sft import main

        return main(["--config", str(ROOT / "recipes/tiny/sft_lora.yaml"), "--dataset_name", str(_sft_data(tmp_path / "data")),
                     "--min_raters", "0", "--cache_dir", str(tmp_path / "cache"), *common])
    if objective == "grpo":
        from align.grpo import main

        return main(["--config", str(ROOT / "recipes/tiny/grpo_brightness.yaml"), "--finetune", "lora", "--beta", "0.04",
                     "--learning_rate", "1e-3", *common])
    from align.dpo import main

    pairs = write_synthetic_pairs(tmp_path / "pairs", n=4, size=32)
    recipe = "dpo_lora.yaml" if objective == "dpo" else "dpo_grpo.yaml"
    return main(["--config", str(ROOT / "recipes/tiny" / recipe), "--dataset_name", str(pairs), "--cache_dir",
                 str(tmp_path / "cache"), "--eval_fraction", "0", "--eval_strategy", "no", *common])


@pytest.mark.parametrize("objective,options", [
    ("sft", ["--base_storage", "nf4", "--optim", "adamw_8bit"]),
    ("dpo", ["--base_storage", "int8", "--weight_streaming", "blocks", "--resident_blocks", "1"]),
    ("grpo", ["--base_storage", "fp8"]),  # torchao's AdamW8bit compiles its step: ~100 s on CPU, not run here
    ("dpo+grpo", ["--base_storage", "nf4", "--use_bnb_nested_quant", "true", "--weight_streaming", "blocks"]),
])
def test_every_objective_trains_on_a_quantised_base_and_the_adapter_loads_on_the_unquantised_one(
        objective, options, tmp_path, tiny_checkpoint, capsys):
    from diffusers import QwenImagePipeline
    from safetensors.torch import load_file

    trainer = _run(objective, tmp_path, options)
    assert "estimated peak GPU memory" in capsys.readouterr().out
    assert trainer.state.global_step == 2
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.state.log_history if "loss" in h)
    if "8bit" in " ".join(options):
        # The library's 8-bit AdamW (both keep tensors under 4096 elements, all of the tiny LoRA, in 32 bits;
        # benchmarks/memory.py measures the real-size states).
        opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
        assert type(opt).__module__.split(".")[0] in ("bitsandbytes", "torchao")
        assert getattr(getattr(opt, "args", None), "optim_bits", 8) == 8 and "8bit" in type(opt).__name__ + "8bit" * hasattr(opt, "args")
    saved = load_file(tmp_path / "out" / "pytorch_lora_weights.safetensors")
    trained = {k: v for k, v in saved.items() if "lora_B" in k}
    assert trained and any(v.abs().max() > 0 for v in trained.values())  # the adapter moved

    pipe = QwenImagePipeline.from_pretrained(str(tiny_checkpoint))
    pipe.load_lora_weights(str(tmp_path / "out"))
    loaded = dict(pipe.transformer.named_parameters())
    for key, value in trained.items():
        name = key.removeprefix("transformer.").replace("lora_B.weight", "lora_B.default_0.weight")
        torch.testing.assert_close(loaded[name].float(), value.float())


@pytest.mark.parametrize("recipe,card_gb", [("sft_24gb", 24), ("sft_24gb_streaming", 24), ("sft_48gb", 48),
                                            ("dpo_24gb", 24), ("grpo_24gb", 24), ("dpo_grpo_24gb", 24)])
def test_low_vram_recipes_parse_and_their_estimate_fits_the_card(recipe, card_gb, tmp_path):
    from align.configs.combined import DPOGRPOConfig
    from align.configs.grpo import GRPOConfig
    from align.configs.sft import SFTConfig
    from align.launch import parse_config
    from align.memory import GIB, Options, architecture, estimate

    cls = {"sft": SFTConfig, "dpo": DPOGRPOConfig, "grpo": GRPOConfig}[recipe.split("_")[0]]
    config = parse_config(cls, ["--config", str(ROOT / "recipes/low_vram" / f"{recipe}.yaml"), "--output_dir",
                                str(tmp_path), "--bf16", "false", "--report_to", "none"])
    assert config.base_storage != "none"
    est = estimate(Options.from_config(config), architecture(None))
    assert est.options.gradient_checkpointing
    assert est.peak_gib * GIB <= card_gb * 1e9, "\n".join(est.lines())
