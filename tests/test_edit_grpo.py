"""Flow-GRPO on the tiny Edit-2511 model: edit prompt rows (instruction + control images) are checked at load,
their control images condition the SDE rollouts, the recomputed log-probs and the rewards, a short run raises the
held-out reward (ODE renders at fixed seeds), resume is exact, and DPO+GRPO trains a step on an edit checkpoint."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from align.data.edit import CONTROLS, write_synthetic_edit_pairs, write_synthetic_edit_prompts
from align.data.prompts import EditPromptColumns, load_prompt_dataset
from align.rl.rollouts import generate_rollouts, recompute_log_prob, score_images
from qwen_image import QwenImage
from qwen_image.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes/tiny/edit_grpo_lora.yaml")


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    return write_synthetic_edit_prompts(tmp_path_factory.mktemp("edit_prompts"), n=4, size=32)


def _rewrite(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def test_edit_prompt_rows_are_checked_with_one_line_errors(prompts_file, tmp_path):
    ds = load_prompt_dataset(str(prompts_file), edit=EditPromptColumns())
    assert len(ds) == 4 and [len(c) for c in ds[CONTROLS]] == [1, 1, 1, 1]
    assert ds[0][CONTROLS][0]["path"] == str(prompts_file.parent / "s0.png")  # relative to the prompt file
    # the same file through train_prompts, and a folder holding metadata.jsonl
    assert load_prompt_dataset(prompts=[str(prompts_file)], edit=EditPromptColumns())["prompt"] == ds["prompt"]
    folder = tmp_path / "folder"
    folder.mkdir()
    for i in range(4):
        (folder / f"s{i}.png").write_bytes((prompts_file.parent / f"s{i}.png").read_bytes())
    (folder / "metadata.jsonl").write_text(prompts_file.read_text())
    assert len(load_prompt_dataset(str(folder), edit=EditPromptColumns())) == 4

    rows = [json.loads(line) for line in prompts_file.read_text().splitlines()]
    bad = prompts_file.parent / "bad.jsonl"  # next to the images the rows name
    broken = [dict(rows[0], control_image=str(prompts_file.parent / "gone.png")),
              dict(rows[1], control_image=None), rows[2],
              {"prompt": "x", "control_images": [str(prompts_file.parent / "s0.png")] * 4}]
    _rewrite(bad, [{k: v for k, v in r.items() if k != "control_images"} for r in broken[:3]])
    with pytest.raises(UserError, match=r"2 edit prompt row\(s\) with bad control images: row 0: control image 1: "
                                        r"image not found.*row 1: no control image") as info:
        load_prompt_dataset(str(bad), edit=EditPromptColumns())
    assert "\n" not in str(info.value)
    _rewrite(bad, [{"prompt": "x", "control_images": broken[3]["control_images"]}])
    with pytest.raises(UserError, match="4 control images; Edit-2509/2511 take 1 to 3"):
        load_prompt_dataset(str(bad), edit=EditPromptColumns())
    with pytest.raises(UserError, match=r"1 control image\(s\), expected 2"):
        load_prompt_dataset(str(prompts_file), edit=EditPromptColumns(num_control_images=2))
    with pytest.raises(UserError, match="no control image column"):
        load_prompt_dataset(str(_plain(tmp_path)), edit=EditPromptColumns())
    with pytest.raises(UserError, match="need their control images"):
        load_prompt_dataset(prompts=["make it brighter"], edit=EditPromptColumns())


def _plain(tmp_path: Path) -> Path:
    path = tmp_path / "plain.jsonl"
    _rewrite(path, [{"prompt": "a red cat"}])
    return path


def test_a_run_with_a_missing_control_image_stops_before_the_model_loads(prompts_file, tmp_path, monkeypatch):
    import align.modeling

    rows = [json.loads(line) for line in prompts_file.read_text().splitlines()]
    bad = prompts_file.parent / "missing.jsonl"
    _rewrite(bad, [dict(rows[0], control_image="gone.png"), *rows[1:]])
    monkeypatch.setattr(align.modeling, "load_qwen_image", lambda *a, **k: pytest.fail("the model loaded before the data check"))
    with pytest.raises(UserError, match=r"^1 edit prompt row\(s\) with bad control images: row 0: control image 1: "
                                        r"image not found: .*gone\.png\. Fix the prompt file\.$") as info:
        _grpo(["--config", RECIPE, "--dataset_name", str(bad), "--output_dir", str(tmp_path / "o")])
    assert "\n" not in str(info.value)


def test_rollouts_are_conditioned_on_the_control_images_and_rescored_exactly(prompts_file):
    qwen = QwenImage.tiny_edit("2511")
    ds = load_prompt_dataset(str(prompts_file), edit=EditPromptColumns())
    rows = ds.select([0, 0, 1])
    columns = {CONTROLS: list(rows[CONTROLS])}
    batch = generate_rollouts(qwen, qwen.transformer, list(rows["prompt"]), columns, height=32, width=32,
                              num_inference_steps=3, true_cfg_scale=2.0, seeds=[5, 5, 5])
    refs = batch.cond.references
    assert refs is not None and refs.shapes == [(1, 4, 4)] and batch.negative.references is None
    # Same row, same seed: the same sample, up to the float rounding of its batch position (CPU kernels may block
    # a batch of 3 differently per row, e.g. with AVX-512).
    torch.testing.assert_close(batch.trajectory[0, -1], batch.trajectory[1, -1], atol=1e-5, rtol=0)
    # the same prompt text would not explain the difference: the control image does (row 2: another source)
    assert (batch.trajectory[0, -1] - batch.trajectory[2, -1]).abs().max() > 1e-2
    for j in batch.sde_steps:  # training re-scores the stored transitions with the references: bit for bit
        assert torch.equal(recompute_log_prob(qwen.transformer, batch, j).log_prob, batch.log_probs[:, j])
    # the rewards see the control images: edit_consistency compares each edit with its own source
    from rewards import combine

    totals, per = score_images(combine(["edit_consistency"]), batch.prompts, batch.images, batch.columns)
    assert all(t is not None for t in totals)
    src = Image.open(prompts_file.parent / "s1.png").convert("RGB")
    assert totals[2] == pytest.approx(score_images(combine(["edit_consistency"]), ["x"], [batch.images[2]],
                                                   {"source": [src]})[0][0])
    with pytest.raises(UserError, match="need control images"):
        generate_rollouts(qwen, qwen.transformer, ["x"], height=32, width=32, seeds=[0])


def test_bf16_edit_rollouts_rescore_bit_for_bit(prompts_file):
    """Real runs are bf16: with references in the conditioning, the stored transitions still re-score exactly
    (ratio == 1 on-policy) and the trajectory stays in the model dtype."""
    qwen = QwenImage.tiny_edit("2509", dtype=torch.bfloat16)
    rows = load_prompt_dataset(str(prompts_file), edit=EditPromptColumns()).select([0, 1])
    batch = generate_rollouts(qwen, qwen.transformer, list(rows["prompt"]), {CONTROLS: list(rows[CONTROLS])},
                              height=32, width=32, num_inference_steps=3, true_cfg_scale=2.0, seeds=[3, 4])
    assert batch.cond.references is not None and batch.trajectory.dtype == torch.bfloat16
    for j in batch.sde_steps:
        assert torch.equal(recompute_log_prob(qwen.transformer, batch, j).log_prob, batch.log_probs[:, j])


def test_mixed_control_sizes_are_refused_only_where_a_rollout_batch_would_mix_them(prompts_file, tmp_path):
    from align.configs.grpo import GRPOConfig
    from align.data.grpo import check_edit_prompt_sizes
    from align.launch import parse_config

    Image.new("RGB", (64, 32), "gray").save(prompts_file.parent / "wide.png")
    mixed = prompts_file.parent / "mixed.jsonl"
    _rewrite(mixed, [{"prompt": "a", "control_image": "s0.png"}, {"prompt": "b", "control_image": "wide.png"}])
    ds = load_prompt_dataset(str(mixed), edit=EditPromptColumns())
    qwen = QwenImage.tiny_edit("2511")

    def config(*argv):
        return parse_config(GRPOConfig, ["--config", RECIPE, "--output_dir", str(tmp_path), *argv])

    check_edit_prompt_sizes(qwen, config(), ds)  # groups of 4 copies, micro-batches of 4: one row per batch
    with pytest.raises(UserError, match=r"edit prompts with different control sizes .* make num_generations \(2\)"):
        check_edit_prompt_sizes(qwen, config("--num_generations", "2"), ds)
    with pytest.raises(UserError, match="held-out edit prompts with different control sizes"):
        check_edit_prompt_sizes(qwen, config(), ds, held_out=ds)
    check_edit_prompt_sizes(qwen, config("--grpo_batch_size", "1", "--gradient_accumulation_steps", "4"), ds,
                            held_out=ds)


def _grpo(argv):
    from align.grpo import main

    return main(argv)


def test_short_edit_grpo_run_raises_the_held_out_reward(prompts_file, tmp_path):
    trainer = _grpo(["--config", RECIPE, "--dataset_name", str(prompts_file), "--output_dir", str(tmp_path),
                     "--finetune", "full", "--learning_rate", "1e-2", "--max_steps", "10",
                     "--monitor_dataset_name", str(prompts_file), "--monitor_seeds", "2", "--eval_strategy", "steps",
                     "--eval_steps", "10", "--eval_on_start", "true", "--disable_tqdm", "true"])
    assert trainer.qwen.edit_model and trainer.qwen.transformer.config.zero_cond_t  # the tiny Edit-2511 layout
    assert trainer.qwen.text_encoder is None  # every (instruction, control image) row was encoded once, then released
    hist = [h for h in trainer.state.log_history if "loss" in h]
    # on-policy: the recomputed log-probs (with references) equal the rollout's, so every ratio starts at 1
    assert all(h["ratio/mean"] == 1.0 and h["ratio/min"] == 1.0 and h["ratio/max"] == 1.0 for h in hist)
    evals = [h["eval_reward"] for h in trainer.state.log_history if "eval_reward" in h]
    print("held-out brightness (ODE, fixed seeds):", [round(r, 4) for r in evals])
    assert len(evals) == 2
    # the tiny VAE's brightness band is narrow (~0.41-0.47) and a group's std ~0.01: +0.005 is a real rise
    assert evals[-1] > evals[0] + 0.005
    assert trainer.rollouts.buffer[0].cond.references.shapes == [(1, 4, 4)]


def test_edit_grpo_resume_matches_an_uninterrupted_run(prompts_file, tmp_path):
    args = ["--config", RECIPE, "--dataset_name", str(prompts_file), "--max_steps", "4", "--num_iterations", "2",
            "--gradient_accumulation_steps", "1", "--save_strategy", "steps", "--save_steps", "1",
            "--beta", "0.04", "--disable_tqdm", "true"]
    full = _grpo([*args, "--output_dir", str(tmp_path / "a")])
    resumed = _grpo([*args, "--output_dir", str(tmp_path / "b"),
                     "--resume_from_checkpoint", str(tmp_path / "a" / "checkpoint-3")])  # mid-buffer
    losses = lambda t: [h["loss"] for h in t.state.log_history if "loss" in h]  # noqa: E731
    assert resumed.state.global_step == 4 and losses(resumed)[-1:] == losses(full)[-1:]
    assert any(h.get("kl/flow_grpo", 0) > 0 for h in full.state.log_history)  # the frozen reference saw references
    a = load_file(tmp_path / "a" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "b" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    start = load_file(tmp_path / "a" / "checkpoint-3" / "pytorch_lora_weights.safetensors")
    assert any(not torch.equal(a[k], start[k]) for k in a)  # the resumed step did train


def test_dpo_grpo_trains_a_step_on_an_edit_checkpoint(prompts_file, tmp_path):
    from align.dpo import main

    ckpt = tmp_path / "ckpt"
    QwenImage.tiny_edit("2511").save_pretrained(ckpt)
    pairs = write_synthetic_edit_pairs(tmp_path / "pairs", n=4, size=32)
    trainer = main(["--config", str(ROOT / "recipes/tiny/edit_dpo_grpo.yaml"), "--model_name_or_path", str(ckpt),
                    "--model_dtype", "float32", "--dataset_name", str(pairs), "--grpo_dataset_name", str(prompts_file),
                    "--logging_steps", "1", "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "o"),
                    "--max_steps", "1", "--disable_tqdm", "true"])
    assert trainer.qwen.edit_model and trainer.qwen.transformer.config.zero_cond_t
    log = next(h for h in trainer.state.log_history if "loss/grpo" in h)
    assert all(k in log for k in ("loss/dpo", "loss/grpo", "grpo/reward"))
    assert trainer.rollouts.buffer[0].cond.references.shapes == [(1, 4, 4)]
    assert (tmp_path / "o" / "pytorch_lora_weights.safetensors").is_file()
