"""The brand-adapter workflow (the main job), one function per stage.

data -> base model (tiny; stage 0 fits its VAE) -> eval before -> SFT LoRA -> eval -> pairs labelled by a reward
-> the combined objective (DPO + an online RL term) -> eval -> export (diffusers + ComfyUI) -> report. Training stages run as subprocesses
(``accelerate launch align/sft.py ...``) so the demo shows, and logs, the exact commands a user runs at scale.
Every stage is resumable: its folder gets a marker when it completes, keyed on the stage's inputs (its config
and the stages it reads), and a rerun skips it unless those inputs changed.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

from .config import resolve_path
from .stages import accelerate_command, display, run_logged, run_stage, stage_key

ALIGN_DIR = Path(__file__).resolve().parents[1]
ADAPTER_FILES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights_comfyui.safetensors")


def _prompts(out: Path, name: str = "prompts.jsonl") -> list[dict]:
    path = out / "data" / name
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    return [json.loads(line) for line in lines if line.strip()]


def _train_env(cfg: dict, out: Path) -> dict[str, str]:
    # wandb offline: runs land under <out>/wandb and can be uploaded later with `wandb sync`.
    return {"WANDB_MODE": "offline", "WANDB_DIR": str(out), "WANDB_PROJECT": str(cfg.get("wandb_project", "qwen-image-align-demo")),
            "WANDB_SILENT": "true", "TOKENIZERS_PARALLELISM": "false",
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}


# ---------------------------------------------------------------- stages
def stage_data(cfg: dict, out: Path) -> dict:
    """Render the slogans into a rated imagefolder (``data/brand``) and write ``data/prompts.jsonl``."""
    from .brand_data import write_brand_dataset

    return write_brand_dataset(cfg, out / "data")


def stage_base_model(cfg: dict, out: Path) -> dict:
    """Build the tiny model (wider transformer per ``model.transformer``), fit its VAE to the brand renders, save."""
    import torch

    from qwen_image import QwenImage
    from rewards import get_reward

    from .brand_data import kept_images
    from .sample_eval import image_grid
    from .vae_fit import fit_vae, reconstruct

    mcfg = cfg["model"]
    torch.manual_seed(int(cfg.get("seed", 0)))
    model = QwenImage.tiny(seed=int(mcfg.get("tiny_seed", 0)), **dict(mcfg.get("transformer") or {}))
    images = kept_images(out / "data" / "brand")
    fit = dict(mcfg.get("vae_fit") or {})
    history = fit_vae(model.vae, images, int(cfg["size"]), seed=int(cfg.get("seed", 0)), **fit)
    # What the fitted VAE keeps of one render per slogan: OCR on these bounds what any later stage can reach.
    per_slogan = len(images) // len(cfg["slogans"])
    probe = images[::per_slogan][: len(cfg["slogans"])]
    recs = reconstruct(model.vae, probe, int(cfg["size"]))
    prompts = [cfg["caption"].format(slogan=s) for s in cfg["slogans"]][: len(recs)]
    ocr = [float(x or 0.0) for x in get_reward("ocr")(prompts, recs, text=list(cfg["slogans"])[: len(recs)])]
    stage_dir = out / "base_model"
    image_grid(probe + recs, 2, len(probe), ["renders", "VAE reconstructions"]).save(stage_dir / "vae_reconstruction.png")
    model.save_pretrained(stage_dir / "model")
    (stage_dir / "vae_fit_history.json").write_text(json.dumps(history), encoding="utf-8")
    return {"model": str(stage_dir / "model"), "vae_fit_steps": len(history),
            "vae_final_loss": history[-1]["loss"] if history else None, "vae_reconstruction_ocr": ocr,
            "vae_reconstruction_ocr_mean": sum(ocr) / len(ocr), "transformer_params": sum(p.numel() for p in model.transformer.parameters())}


def stage_eval(cfg: dict, out: Path, name: str, adapter: Path | None) -> dict:
    from .sample_eval import evaluate_samples

    eval_cfg = {**cfg["eval"], "ocr": cfg.get("ocr") or {}}
    return evaluate_samples(out / "base_model" / "model", adapter, _prompts(out), out / name, eval_cfg, int(cfg["size"]),
                            heldout_prompts=_prompts(out, "heldout_prompts.jsonl"))


def stage_sft(cfg: dict, out: Path) -> dict:
    """LoRA SFT on the rated brand images (the rater filter drops the low-rated renders)."""
    overrides = {"model_name_or_path": out / "base_model" / "model", "dataset_name": out / "data" / "brand",
                 "output_dir": out / "sft", "resolution": cfg["size"], "report_to": cfg.get("report_to", "wandb"),
                 "run_name": "demo-sft", "seed": int(cfg.get("seed", 0)),
                 # a stage without its done-marker is redone from scratch (align.launch refuses a used output_dir)
                 "overwrite_output_dir": True, **(cfg["sft"].get("args") or {})}
    cmd = accelerate_command(ALIGN_DIR / "sft.py", resolve_path(cfg["sft"]["recipe"]), overrides)
    run_logged(cmd, out / "sft" / "train.log", env=_train_env(cfg, out))
    return {"command": display(cmd), "adapter": str(out / "sft"), "log": str(out / "sft" / "train.log")}


def stage_pairs(cfg: dict, out: Path) -> dict:
    """Candidates from the SFT model, paired per prompt and labelled by the reward (standing in for annotators)."""
    from annotation.generate import generate_pairs

    from .auto_label import label_pairs, rate_candidates

    pcfg, folder = cfg["pairs"], out / "pairs"
    (folder / "prompts.txt").write_text("\n".join(r["prompt"] for r in _prompts(out)) + "\n", encoding="utf-8")
    summary = generate_pairs(folder / "prompts.txt", folder, checkpoint=str(out / "base_model" / "model"),
                             adapter=str(out / "sft"), num_candidates=int(pcfg.get("num_candidates", 4)),
                             pairing="all", reward=pcfg.get("reward", "ocr"), reward_kwargs=cfg.get("ocr") or {},
                             seed=int(cfg.get("seed", 0)),
                             height=int(cfg["size"]), width=int(cfg["size"]), steps=int(pcfg.get("num_inference_steps", 8)),
                             cfg=float(pcfg.get("true_cfg_scale", 1.0)), device="cpu", dtype="float32")
    labelled = label_pairs(folder, raters=int(pcfg.get("raters", 3)), noise=float(pcfg.get("rater_noise", 0.05)),
                           seed=int(cfg.get("seed", 0)), tie_margin=float(pcfg.get("tie_margin", 0.1)))
    # The rating round: the same panel also rates every candidate 1-5 (what a rating project gives; used by KTO).
    rated = rate_candidates(folder, out / "ratings", raters=int(pcfg.get("raters", 3)),
                            noise=float(pcfg.get("rater_noise", 0.05)), seed=int(cfg.get("seed", 0)))
    command = (f"qwen-image-annotation generate-pairs --prompts {folder / 'prompts.txt'} --out {folder} "
               f"--checkpoint {out / 'base_model' / 'model'} --adapter {out / 'sft'} "
               f"--num-candidates {pcfg.get('num_candidates', 4)} --reward {pcfg.get('reward', 'ocr')} "
               f"--height {cfg['size']} --width {cfg['size']} --steps {pcfg.get('num_inference_steps', 8)} "
               f"--cfg {pcfg.get('true_cfg_scale', 1.0)} --dtype float32")
    return {**summary, **labelled, **rated, "command": command}


def stage_dpo_grpo(cfg: dict, out: Path) -> dict:
    """The combined objective from the SFT adapter: Flow-DPO on the labelled pairs + Flow-GRPO with the OCR reward."""
    overrides = {"model_name_or_path": out / "base_model" / "model", "dataset_name": out / "pairs",
                 "grpo_dataset_name": out / "data" / "prompts.jsonl", "init_adapter": out / "sft",
                 "output_dir": out / "dpo_grpo", "resolution": cfg["size"], "report_to": cfg.get("report_to", "wandb"),
                 "run_name": "demo-dpo-grpo", "seed": int(cfg.get("seed", 0)), "overwrite_output_dir": True}
    monitor = cfg["dpo_grpo"].get("monitor") or {}
    held = out / "data" / "heldout_prompts.jsonl"
    if monitor.get("eval_steps") and held.is_file() and held.stat().st_size:
        # The over-optimisation monitor on the held-out prompts (ODE, fixed seeds): held-out OCR, KL to the
        # reference and diversity every eval_steps, next to the rollouts' reward (docs/grpo.md).
        overrides.update(monitor_dataset_name=held, eval_strategy="steps", eval_steps=int(monitor["eval_steps"]),
                         monitor_seeds=int(monitor.get("seeds", 2)))
    kto = cfg["dpo_grpo"].get("kto") or {}
    if float(kto.get("weight", 0)) > 0:  # Diffusion-KTO on the rating round's images, beside DPO on the pairs
        overrides.update(w_kto=float(kto["weight"]), kto_dataset_name=out / "ratings")
    overrides.update(cfg["dpo_grpo"].get("args") or {})
    cmd = accelerate_command(ALIGN_DIR / "dpo.py", resolve_path(cfg["dpo_grpo"]["recipe"]), overrides)
    run_logged(cmd, out / "dpo_grpo" / "train.log", env=_train_env(cfg, out))
    return {"command": display(cmd), "adapter": str(out / "dpo_grpo"), "log": str(out / "dpo_grpo" / "train.log")}


def stage_export(cfg: dict, out: Path) -> dict:
    """Copy the final adapter (diffusers + ComfyUI keys) to ``adapter/`` and check it loads into QwenImagePipeline."""
    from diffusers import QwenImagePipeline

    src, dst = out / "dpo_grpo", out / "adapter"
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in ADAPTER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    if ADAPTER_FILES[0] not in copied:
        raise FileNotFoundError(f"no {ADAPTER_FILES[0]} in {src}: the alignment stage did not write an adapter")
    pipe = QwenImagePipeline.from_pretrained(str(out / "base_model" / "model"))
    pipe.load_lora_weights(str(dst), adapter_name="brand")
    n_lora = sum(1 for n, _ in pipe.transformer.named_parameters() if "lora_" in n)
    return {"adapter_dir": str(dst), "files": copied, "loaded_into_QwenImagePipeline": True, "lora_tensors": n_lora}


def stage_report(cfg: dict, out: Path, results: dict[str, dict]) -> dict:
    from .report import write_report

    return write_report(cfg, out, results)


# ---------------------------------------------------------------- driver
def run_workflow(cfg: dict[str, Any], output_dir: str | Path, only: Sequence[str] | None = None) -> dict[str, dict]:
    """Run (or resume) every stage into ``output_dir``; returns each stage's record.

    ``only``: run just these stages (by folder name, e.g. ``("data", "base_model", "sft", "pairs")``) and skip the
    report; the stages they read from must be among them. Benchmarks reuse the workflow's upstream stages this way.
    """
    out = Path(output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "workflow_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False), encoding="utf-8")
    # (title, folder, run, config keys it reads, stages it reads from): the inputs key of each stage hashes the
    # config it reads and its upstream keys, so changing a setting redoes that stage and everything after it.
    data_keys = ("seed", "size", "slogans", "caption", "heldout_captions", "font_size", "backgrounds", "text_colors",
                 "rejects_per_slogan", "sft_data")
    plan = [
        ("brand data (render slogans, simulated ratings)", "data", lambda: stage_data(cfg, out), data_keys, ()),
        ("base model (tiny; stage 0 fits its VAE)", "base_model", lambda: stage_base_model(cfg, out),
         ("seed", "size", "model"), ("data",)),
        ("evaluate before SFT", "eval_before", lambda: stage_eval(cfg, out, "eval_before", None),
         ("eval", "ocr", "size"), ("data", "base_model")),
        ("SFT LoRA", "sft", lambda: stage_sft(cfg, out), ("sft", "seed", "size", "report_to"), ("data", "base_model")),
        ("evaluate after SFT", "eval_sft", lambda: stage_eval(cfg, out, "eval_sft", out / "sft"),
         ("eval", "ocr", "size"), ("data", "base_model", "sft")),
        ("pairs labelled by three simulated raters", "pairs", lambda: stage_pairs(cfg, out),
         ("pairs", "ocr", "seed", "size"), ("data", "base_model", "sft")),
        ("alignment (DPO + online RL)", "dpo_grpo", lambda: stage_dpo_grpo(cfg, out), ("dpo_grpo", "seed", "size", "report_to"),
         ("data", "base_model", "sft", "pairs")),
        ("evaluate after alignment", "eval_aligned", lambda: stage_eval(cfg, out, "eval_aligned", out / "dpo_grpo"),
         ("eval", "ocr", "size"), ("data", "base_model", "dpo_grpo")),
        ("export adapter", "adapter", lambda: stage_export(cfg, out), (), ("base_model", "dpo_grpo")),
    ]
    total = len(plan) + 1
    start = time.time()
    results: dict[str, dict] = {}
    if only is not None:
        unknown = sorted(set(only) - {name for _, name, *_ in plan})
        if unknown:
            raise ValueError(f"no workflow stage named {unknown[0]!r}")
        plan = [stage for stage in plan if stage[1] in only]
        missing = [(name, u) for _, name, _, _, upstream in plan for u in upstream if u not in only]
        if missing:
            raise ValueError(f"stage {missing[0][0]!r} reads stage {missing[0][1]!r}: add it to the stages to run")
        total = len(plan)
    for i, (title, name, fn, cfg_keys, upstream) in enumerate(plan, 1):
        reads = {k: cfg.get(k) for k in cfg_keys}
        for k in ("sft", "dpo_grpo"):  # the recipe a training stage launches is an input too, not only its path
            if k in cfg_keys:
                reads[f"{k}_recipe_text"] = resolve_path(cfg[k]["recipe"]).read_text(encoding="utf-8")
        key = stage_key(reads, [results[u]["inputs_key"] for u in upstream])
        results[name] = run_stage(i, total, title, out / name, fn, key=key)
    if only is not None:
        return results
    # The report is always rewritten: it is cheap and reflects every stage, skipped or not.
    print(f"[{total}/{total}] report ...", flush=True)
    results["report"] = stage_report(cfg, out, results)
    results["total_seconds"] = {"seconds": round(time.time() - start, 1)}
    return results
