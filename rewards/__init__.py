"""Reward functions for aligning Qwen-Image (Flow-GRPO / best-of-n / data filtering).

Every reward has one signature::

    reward(prompts: list[str], images: list[PIL.Image.Image], **columns) -> list[float | None]

(None = not applicable, excluded from means). Build by name with :func:`get_reward`, list with
:func:`available_rewards`, add your own with :func:`register_reward`, and mix with :func:`combine` /
:class:`CombinedReward`. See docs/rewards.md for every reward and its range.
"""

from __future__ import annotations

from .combine import CombinedResult, CombinedReward, combine, mean_ignore_none, per_prompt_advantages
from .edit import EditTextReward, SourceConsistency, requested_text
from .images import to_pil, to_pil_list
from .models import AestheticScore, ClipScore, HPSv2, PickScore, load_clip, load_linear_head
from .ocr import OcrReward, get_ocr_engine, ocr_boxes, ocr_reward, recognize_text, sort_reading_order
from .preference_model import PreferenceModel, PreferenceModelReward, train_preference_model
from .registry import RewardFn, available_rewards, get_reward, register_reward, reward_name
from .simple import brightness, jpeg_compressibility
from .text import extract_quoted_text, levenshtein, normalize_text, target_text, text_accuracy
from .vlm import VLMJudge, parse_score

__all__ = [
    "RewardFn", "register_reward", "get_reward", "available_rewards", "reward_name",
    "CombinedReward", "CombinedResult", "combine", "mean_ignore_none", "per_prompt_advantages",
    "OcrReward", "ocr_reward", "recognize_text", "ocr_boxes", "sort_reading_order", "get_ocr_engine",
    "ClipScore", "PickScore", "HPSv2", "AestheticScore", "load_clip", "load_linear_head",
    "VLMJudge", "parse_score",
    "PreferenceModel", "PreferenceModelReward", "train_preference_model",
    "jpeg_compressibility", "brightness",
    "EditTextReward", "SourceConsistency", "requested_text",
    "extract_quoted_text", "target_text", "normalize_text", "levenshtein", "text_accuracy",
    "to_pil", "to_pil_list",
]
