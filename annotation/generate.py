"""generate-pairs: N candidates per prompt (different seeds) and pairs of them, for push-pairs/push-ratings.

qwen_image (torch) is imported lazily here only; the rest of annotation/ never loads a model.
Output folder: ``images/p{prompt:04d}_s{seed}.png``, ``candidates.jsonl`` (push-ratings input) and
``pairs.jsonl`` (push-pairs input). Left/right order is shuffled per pair (deterministic from the pair id)
so raters cannot learn a position bias.

Edits (``--edits FILE``: JSONL rows ``{"prompt": instruction, "control_images": [1-3 paths]}`` or the numbered
``control_image(_1, _2)`` columns, paths relative to the file): N candidate edits per row with an edit model
(``m.edit``), ``images/e{row:04d}_s{seed}.png``; the sources are copied to ``sources/`` so the folder holds every
image the tasks show, and each candidate and pair row carries ``control_images``.
"""
from __future__ import annotations

import itertools
import json
import logging
import re
import shutil
import sys
from pathlib import Path

from .errors import AnnotationError
from .push import CONTROL_LIST_COLUMN, read_jsonl, source_paths, stable_id

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


def read_edits(path: Path) -> list[dict]:
    """Edit requests: ``{"prompt", "sources": [absolute paths]}``; a missing or unreadable source, none or more
    than 3 are one-line errors naming the row."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    rows = read_jsonl(path)
    if not rows:
        raise AnnotationError(f"no edit rows in {path}")
    edits = []
    for n, row in enumerate(rows, 1):
        what = f"{path.name}:{n}"
        prompt = row.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise AnnotationError(f"{what}: no instruction (prompt)")
        sources = []
        for k, value in enumerate(source_paths(row, what), 1):
            full = Path(value).expanduser()
            full = (full if full.is_absolute() else path.parent / full).resolve()
            if not full.is_file():
                raise AnnotationError(f"{what}: source image {k} {full} does not exist")
            try:
                with Image.open(full) as img:
                    img.verify()
            except (OSError, UnidentifiedImageError):
                raise AnnotationError(f"{what}: source image {k} {full} is not a readable image") from None
            sources.append(full)
        edits.append({"prompt": prompt, "sources": sources})
    return edits


def copy_sources(edits: list[dict], out: Path) -> None:
    """Copy each distinct source once into ``out/sources/``; sets ``control_images`` (paths relative to ``out``)."""
    copied: dict[Path, str] = {}
    (out / "sources").mkdir(parents=True, exist_ok=True)
    for e in edits:
        for src in e["sources"]:
            if src not in copied:
                stem = re.sub(r"[^A-Za-z0-9._-]+", "_", src.stem)[:40] or "source"
                copied[src] = f"sources/{stem}_{stable_id(str(src))[:8]}{src.suffix.lower() or '.png'}"
                shutil.copyfile(src, out / copied[src])
        e[CONTROL_LIST_COLUMN] = [copied[s] for s in e["sources"]]


def make_pairs(candidates: list[dict], pairing: str, scores: list[float] | None = None) -> list[dict]:
    """Pairs within each prompt (edits: each instruction and its sources): ``all`` (every 2-combination) or
    ``best-worst`` (by ``scores``)."""
    by_prompt: dict[tuple, list[int]] = {}
    for i, c in enumerate(candidates):
        by_prompt.setdefault((c["prompt"], *c.get(CONTROL_LIST_COLUMN, ())), []).append(i)
    pairs = []
    for (prompt, *sources), idx in by_prompt.items():
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
                          "seed_a": a["seed"], "seed_b": b["seed"],
                          **({CONTROL_LIST_COLUMN: sources} if sources else {})})
    return pairs


def _progress(total: int, what: str):
    """A progress bar on stderr (generation takes minutes on a real checkpoint); every 5 s at most, so a log
    file gets a line now and then rather than a stream of carriage returns."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"generate-pairs: {what}", unit="image", mininterval=5.0, file=sys.stderr,
                dynamic_ncols=True)


def _edit_candidates(model, edits: list[dict], out: Path, num_candidates: int, seed: int, height: int | None,
                     width: int | None, steps: int, cfg: float) -> list[dict]:
    from PIL import Image

    from qwen_image import QwenImageInputError
    from qwen_image.images import to_rgb  # the trainers' RGB conversion (alpha, 16-bit, palette)

    candidates = []
    with _progress(len(edits) * num_candidates, "edits") as bar:   # closed on an error too
        for ei, e in enumerate(edits):
            references = []
            for src in e["sources"]:
                with Image.open(src) as img:
                    references.append(to_rgb(img))
            for s in range(seed, seed + num_candidates):
                rel = f"images/e{ei:04d}_s{s}.png"
                try:
                    edited = model.edit(references, e["prompt"], num_inference_steps=steps, true_cfg_scale=cfg,
                                        seed=s, height=height, width=width)
                except QwenImageInputError as err:  # e.g. a source too elongated for the model's areas
                    raise AnnotationError(f"edit request {ei + 1} ({e['prompt'][:40]!r}): {err}") from None
                edited.save(out / rel)
                candidates.append({"candidate_id": stable_id(e["prompt"], *e[CONTROL_LIST_COLUMN], rel),
                                   "prompt": e["prompt"], CONTROL_LIST_COLUMN: e[CONTROL_LIST_COLUMN], "image": rel,
                                   "seed": s, "edit_index": ei})
                bar.update(1)
    return candidates


def generate_pairs(prompts_file: Path | None, out: Path, *, edits_file: Path | None = None,
                   checkpoint: str | None = None, adapter: str | None = None, num_candidates: int = 4,
                   pairing: str = "all", reward: str | None = None, seed: int = 0, height: int | None = None,
                   width: int | None = None, steps: int = 4, cfg: float = 4.0, device: str | None = None,
                   dtype: str = "bfloat16", batch_size: int = 8, reward_kwargs: dict | None = None,
                   select: str | None = None, budget: int | None = None, preference_model: str | None = None) -> dict:
    """Candidates and pairs from prompts (text-to-image) or from ``edits_file`` (edit requests, edit model).
    ``height``/``width`` None: the model's default size (edits: the last source's aspect ratio).

    ``select`` (``random`` / ``uncertain`` / ``disagree``, see :mod:`annotation.select`) keeps ``budget`` of the
    pairs in ``pairs.jsonl`` (every pair, with its selection score, goes to ``pairs_all.jsonl``); ``uncertain``
    and ``disagree`` score the candidates with the preference model at ``preference_model``, ``disagree`` also
    with ``reward``."""
    if (prompts_file is None) == (edits_file is None):
        raise AnnotationError("give either --prompts (text-to-image) or --edits (edit requests)")
    _check_selection(select, budget, preference_model, reward)
    if reward_kwargs is not None and not isinstance(reward_kwargs, dict):
        raise AnnotationError(f"--reward-kwargs must be a JSON object, got {reward_kwargs!r}")
    edits = read_edits(edits_file) if edits_file is not None else None
    prompts = read_prompts(prompts_file) if edits is None else [e["prompt"] for e in edits]
    if num_candidates < 2:
        raise AnnotationError("--num-candidates must be at least 2 to form pairs")
    if pairing == "best-worst" and not reward:
        raise AnnotationError("best-worst pairing needs --reward NAME (a reward from rewards/)")
    from qwen_image import QwenImage  # lazy: torch + diffusers

    if checkpoint:
        model = QwenImage.from_pretrained(checkpoint, torch_dtype=dtype, device=device)
        if edits is not None and not model.edit_model:
            raise AnnotationError(f"--checkpoint {checkpoint} is not an edit checkpoint (Qwen-Image-Edit-2509/2511 "
                                  f"layout); --edits needs one")
    else:
        model = QwenImage.tiny(seed=0) if edits is None else QwenImage.tiny_edit("2509", seed=0)
    if adapter:
        model.load_lora(adapter)

    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    candidates = []
    if edits is not None:
        copy_sources(edits, out)
        candidates = _edit_candidates(model, edits, out, num_candidates, seed, height, width, steps, cfg)
    if edits is None:
        with _progress(len(prompts) * num_candidates, "candidates") as bar:   # closed on an error too
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
                    bar.update(len(chunk))
    scores = None
    if reward:
        from PIL import Image

        from rewards import get_reward  # lazy: may load a scoring model
        fn = get_reward(reward, **(reward_kwargs or {}))  # e.g. the OCR detector size for small images
        columns = {}
        if edits is not None:  # edit rewards (edit_consistency, ...) read the sources from this column
            columns[CONTROL_LIST_COLUMN] = [[Image.open(out / p) for p in c[CONTROL_LIST_COLUMN]] for c in candidates]
        scores = [float(x) if x is not None else float("-inf") for x in
                  fn([c["prompt"] for c in candidates], [Image.open(out / c["image"]) for c in candidates],
                     **columns)]
        for c, s in zip(candidates, scores):
            c["score"] = s
    pairs = make_pairs(candidates, pairing, scores)
    files = [("candidates.jsonl", candidates), ("pairs.jsonl", pairs)]
    selected = None
    if select:
        selected = _select(pairs, candidates, out, select, int(budget), preference_model, seed, device)
        files = [("candidates.jsonl", candidates), ("pairs_all.jsonl", pairs),
                 ("pairs.jsonl", [p for p in pairs if p["selected"]])]
    for name, rows in files:
        with open(out / name, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    counted = {"prompts": len(prompts)} if edits is None else {"edits": len(edits)}
    picked = {} if selected is None else {"select": select, "selected": selected}
    return {**counted, "candidates": len(candidates), "pairs": len(pairs), **picked, "out": str(out)}


def _check_selection(select: str | None, budget: int | None, preference_model: str | None,
                     reward: str | None) -> None:
    """Selection options are checked before any model loads."""
    from .select import STRATEGIES

    if select is None:
        if budget is not None or preference_model is not None:
            raise AnnotationError("--budget and --preference-model go with --select (random, uncertain or disagree)")
        return
    if select not in STRATEGIES:
        raise AnnotationError(f"unknown --select {select!r}; choose from {', '.join(STRATEGIES)}")
    if budget is None or budget < 1:
        raise AnnotationError(f"--select {select} needs --budget N (N >= 1 pairs to send to the raters)")
    if select in ("uncertain", "disagree"):
        if not preference_model:
            raise AnnotationError(f"--select {select} needs --preference-model PATH (a trained preference model: "
                                  f"python -m rewards.preference_model train)")
        if not (Path(preference_model).expanduser() / "preference_model.json").is_file():
            raise AnnotationError(f"--preference-model {preference_model} is not a trained preference model "
                                  f"(no preference_model.json in it)")
    if select == "disagree" and not reward:
        raise AnnotationError("--select disagree needs --reward NAME: the automatic reward to disagree with")


def _select(pairs: list[dict], candidates: list[dict], out: Path, strategy: str, budget: int,
            preference_model: str | None, seed: int, device: str | None) -> int:
    """Mark each pair ``selected`` (and give it the model's ``p_a`` and its ``selection_score``); returns the count."""
    import math

    from .select import select_pairs, selection_scores

    probs = margins = None
    if strategy != "random":
        from qwen_image.errors import UserError
        from rewards.preference_model import PreferenceModel  # lazy: the backbone (torch, transformers)

        try:
            pm = PreferenceModel.load(preference_model, device=device or "cpu")
        except UserError as err:   # e.g. the backbone it names has moved
            raise AnnotationError(str(err)) from None
        by_image = dict(zip((c["image"] for c in candidates),
                            pm.scores([c["prompt"] for c in candidates], [out / c["image"] for c in candidates])))
        # sigmoid(r_a - r_b) written with tanh: no overflow for a very confident model
        probs = [0.5 + 0.5 * math.tanh((by_image[p["image_a"]] - by_image[p["image_b"]]) / 2) for p in pairs]
        reward_of = {c["image"]: c.get("score") for c in candidates}
        margins = []
        for p in pairs:
            a, b = reward_of[p["image_a"]], reward_of[p["image_b"]]
            usable = a is not None and b is not None and math.isfinite(a) and math.isfinite(b)
            margins.append(a - b if usable else 0.0)   # no score on one side: the reward has no opinion
    keep = set(select_pairs(pairs, budget, strategy, probs=probs, reward_margins=margins if strategy == "disagree"
                            else None, seed=seed))
    scores = selection_scores(strategy, probs, margins) if strategy != "random" else None
    for i, p in enumerate(pairs):
        p["selected"] = i in keep
        if probs is not None:
            p["p_a"] = round(probs[i], 6)
            p["selection_score"] = round(scores[i], 6)
    return len(keep)
