"""The two seams, proven from outside the package.

A new objective (an L1 flow-matching loss) and a new model family (the tiny model under another name) are defined
in THIS FILE ONLY, registered, and trained through the same run skeleton (``align.launch.train_main``) and the same
CLI (``qwen-image-align NAME``, with this file named in ``QWEN_IMAGE_ALIGN_PLUGINS``) as the built-in ones, with no
edit under ``align/``. Also here: every objective encodes on the configured training device and releases the text
encoder afterwards (one owner: the run skeleton + the model family), and the memory estimate of the online
objectives follows their own batch and KL options.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from align.configs.sft import SFTConfig
from align.launch import train_main
from align.losses import make_noisy
from align.models import get_model_family, register_model_family
from align.models.qwen_image import QwenImageFamily
from align.objectives import MemoryTerms, Objective, available_objectives, register_objective
from align.trainers.sft import SFTTrainer

ROOT = Path(__file__).resolve().parents[1]
RES = 32


# This file is also a plugin module (QWEN_IMAGE_ALIGN_PLUGINS) that launched processes import without tests/ on
# sys.path: it imports no test helper module.

# ----------------------------------------------------------------------------- a new objective, defined here only
@dataclass
class L1Config(SFTConfig):
    """SFT's data and options; the loss is the L1 distance of the velocities."""


class L1Trainer(SFTTrainer):
    losses: list[float]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        x0 = inputs[self._latent_key].float()
        gen = torch.Generator().manual_seed(1000 + self.state.global_step)
        sigma = torch.rand(x0.shape[0], generator=gen) * 0.8 + 0.1
        noisy, target = make_noisy(x0, torch.randn(x0.shape, generator=gen), sigma)
        pred = self.velocity(model, noisy, sigma, inputs["prompt_embeds"], inputs["prompt_mask"],
                             int(inputs["height"]), int(inputs["width"]))
        loss = (pred.float() - target).abs().mean()
        self.losses = [*getattr(self, "losses", []), float(loss.detach())]
        return loss


def l1_load_data(config):
    from align.sft import load_data

    return load_data(config)


def l1_build_trainer(config, qwen, rows):
    from align.data.sft import prepare_sft_data

    return L1Trainer(qwen, config, prepare_sft_data(config, qwen, rows))


L1 = register_objective(Objective(
    "toy-l1", L1Config, l1_load_data, l1_build_trainer,
    memory=lambda config: MemoryTerms("toy-l1", (config.per_device_train_batch_size,)),
    description="a test objective: L1 flow matching"), replace=True)


# ----------------------------------------------------------------------------- a new model family, defined here only
class RenamedTinyFamily(QwenImageFamily):
    """The tiny Qwen-Image under another name, with its own seed offset and cache identity. Records its calls."""

    name = "tiny-renamed"
    calls: list[str] = []

    def load(self, config, dtype, load_text_encoder=True, load_vae=True):
        from qwen_image import QwenImage

        self.calls.append("load")
        return QwenImage.tiny(seed=config.tiny_seed + 7, dtype=dtype)

    def identity(self, config) -> str:
        return f"renamed-tiny-{config.tiny_seed}"

    def place_encoders(self, bundle, device) -> None:
        self.calls.append(f"place:{torch.device(device).type}")
        super().place_encoders(bundle, device)

    def release_text_encoder(self, bundle) -> None:
        self.calls.append("release")
        super().release_text_encoder(bundle)


register_model_family(RenamedTinyFamily(), replace=True)


# ----------------------------------------------------------------------------- data
def _image(i: int) -> Image.Image:
    rng = np.random.default_rng(i)
    return Image.fromarray((rng.random((RES // 8, RES // 8, 3)) * 255).astype(np.uint8)).resize((RES, RES), Image.NEAREST)


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("seam_sft")
    with open(root / "metadata.jsonl", "w") as fh:
        for i, prompt in enumerate(["a red square", "a blue square"]):
            _image(i).save(root / f"{i}.png")
            fh.write(json.dumps({"file_name": f"{i}.png", "prompt": prompt, "ratings": [5, 5, 5]}) + "\n")
    return root


def _common(out: Path) -> list[str]:
    return ["--output_dir", str(out), "--resolution", str(RES), "--lora_rank", "2", "--lora_alpha", "2",
            "--max_steps", "3", "--learning_rate", "1e-2", "--per_device_train_batch_size", "2", "--save_strategy",
            "no", "--report_to", "none", "--use_cpu", "true", "--dataloader_num_workers", "0",
            "--logging_steps", "1"]


def _lora_moved(out: Path) -> float:
    weights = load_file(out / "pytorch_lora_weights.safetensors")
    return max(float(v.abs().max()) for k, v in weights.items() if "lora_B" in k)


# ----------------------------------------------------------------------------- the proof
def test_both_plugins_are_listed():
    assert "toy-l1" in available_objectives()
    assert get_model_family("tiny-renamed").name == "tiny-renamed"


def test_registries_refuse_a_taken_name_and_list_the_choices_of_an_unknown_one():
    from align.objectives import get_objective
    from qwen_image.errors import UnknownNameError

    l1 = get_objective("toy-l1")
    assert register_objective(l1) is l1  # the same objective again (a module imported twice)
    with pytest.raises(ValueError, match="objective 'toy-l1' is registered already"):
        register_objective(replace(l1, description="another one"))
    with pytest.raises(UnknownNameError, match=r"unknown objective 'toy-l2'; choose one of .*toy-l1"):
        get_objective("toy-l2")
    with pytest.raises(ValueError, match="model family 'tiny-renamed' is registered already"):
        register_model_family(type("Other", (QwenImageFamily,), {"name": "tiny-renamed"})())
    with pytest.raises(UnknownNameError, match=r"unknown model_family 'nope'; choose one of .*tiny-renamed"):
        get_model_family("nope")


def test_new_objective_trains_through_the_run_skeleton(sft_data, tmp_path):
    trainer = train_main("toy-l1", ["--dataset_name", str(sft_data), *_common(tmp_path / "run")])
    assert isinstance(trainer, L1Trainer) and len(trainer.losses) == 3
    assert _lora_moved(tmp_path / "run") > 0  # LoRA B starts at 0 (gaussian init): the toy loss trained it
    assert trainer.qwen.text_encoder is None  # released by the run skeleton


def test_new_family_trains_sft_through_the_run_skeleton(sft_data, tmp_path):
    RenamedTinyFamily.calls.clear()
    trainer = train_main("sft", ["--dataset_name", str(sft_data), "--model_family", "tiny-renamed",
                                 *_common(tmp_path / "run")])
    assert RenamedTinyFamily.calls[:3] == ["load", "place:cpu", "release"]
    # the tiny model under the other name has other weights: a different seed than the default family's
    reference = get_model_family("qwen-image").load(trainer.args, torch.float32)
    ours = dict(trainer.qwen.vae.named_parameters())
    assert any(not torch.equal(p, ours[n]) for n, p in reference.vae.named_parameters())
    assert _lora_moved(tmp_path / "run") > 0


@pytest.mark.slow
def test_new_objective_and_family_through_the_cli(sft_data, tmp_path):
    """The CLI a user types: the plugin file is imported in the CLI and again in the launched process."""
    env = {**os.environ, "QWEN_IMAGE_ALIGN_PLUGINS": str(Path(__file__).resolve())}
    cli = [sys.executable, "-c", "import sys; from align.cli import main; sys.exit(main())"]
    listed = subprocess.run([*cli, "--help"], env=env, capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0 and "toy-l1" in listed.stdout, listed.stderr
    out = tmp_path / "cli"
    run = subprocess.run([*cli, "toy-l1", "--num_processes", "1", "--dataset_name", str(sft_data),
                          "--model_family", "tiny-renamed", *_common(out)],
                         env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert _lora_moved(out) > 0
    bad = subprocess.run([*cli, "toy-l1", "--model_family", "nope", "--dataset_name", str(sft_data), *_common(out)],
                         env=env, capture_output=True, text=True, timeout=120)
    last = bad.stderr.strip().splitlines()[-1]
    assert bad.returncode == 2 and last.startswith("error:") and "tiny-renamed" in last, bad.stderr[-2000:]
    assert "Traceback" not in bad.stderr


# ----------------------------------------------------------------------------- encoders: placed, then released
class RecordingFamily(QwenImageFamily):
    """Records, at every text-encoder / VAE call, the device the run skeleton placed the encoders on."""

    name = "recording"
    events: list[tuple[str, str | None]] = []

    def load(self, config, dtype, load_text_encoder=True, load_vae=True):
        bundle = super().load(config, dtype, load_text_encoder, load_vae)
        bundle._placed_on = None
        for label, module in (("text_encoder", bundle.text_encoder), ("vae", bundle.vae)):
            def hook(_module, _args, label=label, bundle=bundle):
                self.events.append((label, bundle._placed_on))
            module.register_forward_pre_hook(hook)
            if label == "vae":  # the VAE is called through encode / decode, not forward
                for name in ("encode", "decode"):
                    original = getattr(module, name)

                    def wrapped(*a, _original=original, **k):
                        self.events.append(("vae", bundle._placed_on))
                        return _original(*a, **k)
                    setattr(module, name, wrapped)
        return bundle

    def place_encoders(self, bundle, device) -> None:
        super().place_encoders(bundle, device)
        bundle._placed_on = str(torch.device(device))

    def release_text_encoder(self, bundle) -> None:
        self.events.append(("release", bundle._placed_on))
        super().release_text_encoder(bundle)


register_model_family(RecordingFamily(), replace=True)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    from align.data.preference import write_synthetic_pairs

    return write_synthetic_pairs(tmp_path_factory.mktemp("seam_pairs") / "pairs", 4, size=RES)


GRPO_ARGS = ["--train_prompts", "a red cat", "a blue dog", "--reward_funcs", "brightness",
             "--num_generations", "2", "--num_inference_steps", "2", "--true_cfg_scale", "1.0",
             "--timestep_fraction", "1.0"]


@pytest.mark.parametrize("objective", ["sft", "dpo", "grpo", "dpo+grpo"])
def test_every_objective_encodes_on_the_training_device_then_releases(objective, sft_data, pairs, tmp_path):
    RecordingFamily.events.clear()
    name, extra = {
        "sft": ("sft", ["--dataset_name", str(sft_data)]),
        "dpo": ("dpo", ["--dataset_name", str(pairs)]),
        "grpo": ("grpo", GRPO_ARGS),
        "dpo+grpo": ("dpo", ["--dataset_name", str(pairs), "--w_grpo", "1.0", *GRPO_ARGS]),
    }[objective]
    common = _common(tmp_path / "run")
    common[common.index("--max_steps") + 1] = "1"
    trainer = train_main(name, ["--model_family", "recording", *extra, *common])
    device = str(trainer.args.device)
    events = RecordingFamily.events
    encoder_calls = [e for e in events if e[0] == "text_encoder"]
    assert encoder_calls and any(e[0] == "vae" for e in events)
    assert all(placed == device for label, placed in events), events  # never before placement, never elsewhere
    assert trainer.qwen.text_encoder is None
    released = [i for i, e in enumerate(events) if e[0] == "release"]
    assert released and all(e[0] != "text_encoder" for e in events[released[0]:])  # no text encoding after release


# ----------------------------------------------------------------------------- the memory estimate per objective
def test_online_estimates_follow_their_batch_and_kl_weight():
    from align.configs.combined import DPOGRPOConfig
    from align.configs.grpo import GRPOConfig
    from align.memory import Options

    def grpo(**kw):
        return Options.from_config(GRPOConfig(output_dir="/tmp/x", use_cpu=True, report_to="none",
                                              num_generations=2, **kw))

    base = grpo(per_device_train_batch_size=2)
    assert base.step_graphs() == (2,) and not base.kl_reference and base.decodes_rollouts
    assert grpo(per_device_train_batch_size=2, grpo_batch_size=4).step_graphs() == (4,)
    assert grpo(per_device_train_batch_size=2, beta=0.04).kl_reference

    def combined(**kw):
        return Options.from_config(DPOGRPOConfig(output_dir="/tmp/x", use_cpu=True, report_to="none",
                                                 num_generations=2, per_device_train_batch_size=2, **kw))

    assert combined().step_graphs() == (4,) and combined().objective == "dpo"
    both = combined(w_grpo=1.0, grpo_batch_size=6)
    assert both.objective == "dpo+grpo" and both.step_graphs() == (4, 6) and both.decodes_rollouts
