"""Flow-DPO training data, T2I and edit: read and check the preference pairs (:mod:`align.data.preference`; edit
pairs with their control images, :mod:`align.data.edit`) -> cache prompt embeddings + latents of both images ->
optional held-out split. The trainer (``align.trainers.dpo``) only batches them."""

from __future__ import annotations

from typing import Any

from ..configs.dpo import DPOConfig
from ..modeling import model_identity, uses_edit_model
from .edit import check_no_control_columns, encode_edit_dataset, load_edit_preference_dataset
from .encoding import encode_dataset
from .preference import IMAGE_COLUMNS, load_preference_dataset


def build_datasets(config: DPOConfig, qwen, pairs=None) -> tuple[Any, Any]:
    """Load (unless ``pairs`` are given), validate, encode (cached) and split the preference pairs. Rank 0 encodes
    first, the others reuse its cache."""
    with config.main_process_first(desc="preference data"):
        if qwen.edit_model:
            encoded = build_edit_pairs(config, qwen)
        else:
            if pairs is None:
                pairs, _ = load_preference_dataset(
                    config.dataset_name, config.dataset_split, config.prompt_column, config.min_agreement
                )
            encoded = encode_dataset(
                pairs, qwen, model_identity(config), config.encoding_cache_dir, image_columns=IMAGE_COLUMNS,
                prompt_column="prompt", resolution=config.resolution, batch_size=config.encode_batch_size,
            )
    if config.eval_fraction > 0:
        split = encoded.train_test_split(test_size=config.eval_fraction, seed=config.seed)
        return split["train"], split["test"]
    return encoded, None


def build_edit_pairs(config: DPOConfig, qwen):
    """Edit pairs (instruction, control image(s), chosen, rejected), encoded with the edit template and references."""
    pairs, _ = load_edit_preference_dataset(
        config.dataset_name, config.dataset_split, config.prompt_column, config.min_agreement,
        config.control_columns, config.control_images_column, config.num_control_images,
    )
    return encode_edit_dataset(
        pairs, qwen, model_identity(config), config.encoding_cache_dir, image_columns=IMAGE_COLUMNS,
        resolution=config.resolution, control_resolution=config.control_resolution,
        batch_size=config.encode_batch_size,
    )


def read_pairs(config: DPOConfig):
    """The preference pairs, read and checked before the model loads (None for an edit model: its pairs are read
    with their control images once the processor is there)."""
    if uses_edit_model(config):
        return None
    pairs, _ = load_preference_dataset(config.dataset_name, config.dataset_split, config.prompt_column,
                                       config.min_agreement)
    check_no_control_columns(pairs.column_names, config.dataset_name)
    return pairs
