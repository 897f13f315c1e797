"""A Bradley-Terry preference reward model trained from the raters' pairs: a small head on a frozen CLIP-family
backbone the user has locally.

    python -m rewards.preference_model train --pairs data/prefs_round1 --backbone /models/clip-vit-large-patch14 \\
        --output_dir runs/preference_model

- **Features.** The backbone (loaded with :func:`rewards.models.load_clip`, ``local_files_only``) embeds every
  distinct image and prompt once; the feature of (prompt, image) is the L2-normalised image embedding, followed by
  its element-wise product with the normalised prompt embedding (``use_text``), so a linear head can weigh
  "looks good" and "matches the prompt" separately. The backbone is never trained.
- **Head.** ``Linear`` (``hidden=0``) or ``Linear-ReLU-Linear`` on standardised features, giving one score ``r``.
- **Loss.** Bradley-Terry: ``P(chosen beats rejected) = sigmoid(r_chosen - r_rejected)``, binary cross-entropy
  against a target of 1, or 0.5 for a tie (``ties="half"``; ``ties="drop"`` drops them). A "both bad" row says
  nothing about which image is better and is dropped. Every drop is counted.
- **Held-out split.** Seeded, by prompt by default (the held-out prompts are new to the head), else by pair.
- **Saved** as ``head.safetensors`` plus ``preference_model.json`` (the backbone path, feature settings, the
  training counts and the held-out metrics); :class:`PreferenceModel` loads it, and the ``preference_model``
  reward (``get_reward("preference_model", path=...)``) scores images with it for any online objective.

Input rows (a pulled pairs folder's ``metadata.jsonl``, or any ``.jsonl`` file; image paths relative to it):
``prompt``, ``chosen``, ``rejected``; optional ``outcome`` (``"chosen"``, the default, ``"tie"`` or
``"both_bad"``), ``votes`` (``[n_chosen, n_rejected]``, or the pull's votes for the winner with ``n_votes``) and
per-rater votes ``raters`` + ``rater_choices`` (``"chosen"`` / ``"rejected"`` / ``"both_bad"``, as ``pull`` writes
them), which give the per-rater accuracy and its ceiling.
"""

from __future__ import annotations

from .model import CONFIG_NAME, HEAD_NAME, FittedHead, PreferenceModel, PreferenceModelReward, build_head, fit_head
from .pairs import CHOICES, PairRecord, evaluate_pairs, read_pairs, split_pairs
from .train import format_report, main, train_preference_model

__all__ = ["PairRecord", "read_pairs", "split_pairs", "evaluate_pairs", "CHOICES", "build_head", "fit_head",
           "FittedHead", "PreferenceModel", "PreferenceModelReward", "train_preference_model", "format_report", "main",
           "CONFIG_NAME", "HEAD_NAME"]
