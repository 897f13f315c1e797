"""Flow-DPO (+ the GRPO term when ``w_grpo > 0``): ``accelerate launch [--config_file recipes/accelerate/X.yaml]
align/dpo.py --config recipes/dpo_lora.yaml`` (or ``qwen-image-align dpo --config ...``). The run skeleton is
``align.launch.train_main``; this file says what DPO reads and builds."""

import os
import sys

if __package__ in (None, ""):
    # Run as a file: put the repository root (not align/) first so `align` and `qwen_image` import as packages.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from align.configs.combined import DPOGRPOConfig  # noqa: E402
from align.launch import run, train_main  # noqa: E402
from align.modeling import place_encoders  # noqa: E402
from align.trainers.base import release_text_encoder  # noqa: E402
from align.trainers.combined import DPOGRPOTrainer  # noqa: E402
from align.trainers.dpo import FlowDPOTrainer, build_datasets, read_pairs  # noqa: E402
from align.trainers.grpo_objective import build_reward, load_grpo_prompts  # noqa: E402


def load_data(config: DPOGRPOConfig):
    # Pairs (and the GRPO prompts and reward names) are read and checked before the model loads.
    if config.w_grpo == 0:
        return read_pairs(config), None
    build_reward(config)  # an unknown reward name fails here, not after the model loaded
    return read_pairs(config), load_grpo_prompts(config)


def build_trainer(config: DPOGRPOConfig, qwen, data):
    pairs, prompts = data
    place_encoders(qwen, config)  # encode on the accelerator; the Trainer places the transformer
    train_ds, eval_ds = build_datasets(config, qwen, pairs)
    if config.w_grpo > 0:
        return DPOGRPOTrainer(qwen, config, train_dataset=train_ds, eval_dataset=eval_ds, grpo_prompts=prompts)
    trainer = FlowDPOTrainer(qwen, config, train_dataset=train_ds, eval_dataset=eval_ds)
    release_text_encoder(qwen)  # plain DPO trains on cached embeddings only
    return trainer


def main(argv=None):
    return train_main(DPOGRPOConfig, argv, load_data, build_trainer)


if __name__ == "__main__":
    run(main)
