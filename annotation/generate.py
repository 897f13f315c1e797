"""generate-pairs: N candidates per prompt (different seeds) and pairs of them, for push-pairs/push-ratings.

qwen_image (torch) is imported lazily here only; the rest of annotation/ never loads a model.
Output folder: ``images/p{prompt:04d}_s{seed}.png``, ``candidates.jsonl`` (push-ratings input) and
``pairs.jsonl`` (push-pairs input). Left/right order is shuffled per pair (deterministic from the pair id)
so raters cannot learn a position bias.
"""
from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path

from .errors import AnnotationError
from .push import stable_id

log = logging.getLogger("annotation")


def read_prompts(path: Path) -> list[str]:
    path = Path(path)
    if not path.exists():
        raise AnnotationError(f"prompt file {path} does not exist")
    if path.suffix == ".jsonl":
        prompts = [json.loads(line)["prompt"] for line in path.read_text(encoding="utf-8").splitlines()
                   if line.strip()]
    else:
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise AnnotationError(f"no prompts in {path}")
    return prompts


def make_pairs(candidates: list[dict], pairing: str, scores: list[float] | None = None) -> list[dict]:
    """Pairs within each prompt: ``all`` (every 2-combination) or ``best-worst`` (by ``scores``)."""
    by_prompt: dict[str, list[int]] = {}
    for i, c in enumerate(candidates):
        by_prompt.setdefault(c["prompt"], []).append(i)
    pairs = []
    for prompt, idx in by_prompt.items():
        if len(idx) < 2:
            continue
        if pairing == "all":
            combos = list(itertools.combinations(idx, 2))
        elif pairing == "best-worst":
            if scores is None:
                raise AnnotationError("best-worst pairing needs a reward (--reward NAME)")
            ranked = sorted(idx, key=lambda i: scores[i])
            combos = [(ranked[-1], ranked[0])]
        else:
            raise AnnotationError(f"unknown pairing {pairing!r} (all or best-worst)")
        for i, j in combos:
            a, b = candidates[i], candidates[j]
            pid = stable_id(prompt, a["image"], b["image"])
            if int(pid, 16) % 2:      # shuffle sides, deterministically
                a, b = b, a
            pairs.append({"pair_id": pid, "prompt": prompt, "image_a": a["image"], "image_b": b["image"],
                          "seed_a": a["seed"], "seed_b": b["seed"]})
    return pairs


def generate_pairs(prompts_file: Path, out: Path, *, checkpoint: str | None = None, adapter: str | None = None,
                   num_candidates: int = 4, pairing: str = "all", reward: str | None = None, seed: int = 0,
                   height: int = 64, width: int = 64, steps: int = 4, cfg: float = 4.0, device: str | None = None,
                   dtype: str = "bfloat16", batch_size: int = 8, reward_kwargs: dict | None = None) -> dict:
    prompts = read_prompts(prompts_file)
    if num_candidates < 2:
        raise AnnotationError("--num-candidates must be at least 2 to form pairs")
    if pairing == "best-worst" and not reward:
        raise AnnotationError("best-worst pairing needs --reward NAME (a reward from rewards/)")
    from qwen_image import QwenImage  # lazy: torch + diffusers

    if checkpoint:
        model = QwenImage.from_pretrained(checkpoint, torch_dtype=dtype, device=device)
    else:
        model = QwenImage.tiny(seed=0)
    if adapter:
        model.load_lora(adapter)

    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    candidates = []
    for pi, prompt in enumerate(prompts):
        seeds = [seed + k for k in range(num_candidates)]
        for start in range(0, num_candidates, batch_size):
            chunk = seeds[start:start + batch_size]
            images = model.generate([prompt], height=height, width=width, num_inference_steps=steps,
                                    true_cfg_scale=cfg, seed=chunk[0], num_images_per_prompt=len(chunk),
                                    progress=False)
            for s, img in zip(chunk, images):
                rel = f"images/p{pi:04d}_s{s}.png"
                img.save(out / rel)
                candidates.append({"candidate_id": stable_id(prompt, rel), "prompt": prompt, "image": rel,
                                   "seed": s, "prompt_index": pi})
    scores = None
    if reward:
        from PIL import Image

        from rewards import get_reward  # lazy: may load a scoring model
        fn = get_reward(reward, **(reward_kwargs or {}))
        scores = [float(x) if x is not None else float("-inf") for x in
                  fn([c["prompt"] for c in candidates], [Image.open(out / c["image"]) for c in candidates])]
        for c, s in zip(candidates, scores):
            c["score"] = s
    pairs = make_pairs(candidates, pairing, scores)
    for name, rows in (("candidates.jsonl", candidates), ("pairs.jsonl", pairs)):
        with open(out / name, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return {"prompts": len(prompts), "candidates": len(candidates), "pairs": len(pairs), "out": str(out)}
