"""Flow-GRPO: ``accelerate launch align/grpo.py --config recipes/grpo_ocr.yaml [--key value ...]`` (or
``qwen-image-align grpo --config ...``). The run skeleton is ``align.launch.train_main``; this file says what GRPO
reads and builds."""

import os
import sys

if __package__ in (None, ""):
    # Run as a file: put the repository root (not align/) first so `align` and `qwen_image` import as packages.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if __name__ == "__main__":  # before the libraries import (~10 s): Ctrl-C then is one line, not a traceback
    from align.launch import exit_at_ctrl_c_while_starting

    exit_at_ctrl_c_while_starting()

from align.configs.grpo import GRPOConfig  # noqa: E402
from align.data.grpo import load_grpo_prompts, load_monitor_prompts  # noqa: E402
from align.launch import run, train_main  # noqa: E402
from align.rl.rewards import build_reward  # noqa: E402
from align.trainers.grpo import GRPOTrainer  # noqa: E402


def load_data(config: GRPOConfig):
    # Prompts, held-out prompts and the reward (a bad name fails here) before the model loads.
    return load_grpo_prompts(config), load_monitor_prompts(config), build_reward(config)


def build_trainer(config: GRPOConfig, qwen, data) -> GRPOTrainer:
    prompts, held_out, reward = data
    return GRPOTrainer(qwen, config, train_dataset=prompts, reward_fn=reward, monitor_prompts=held_out)


def main(argv=None) -> GRPOTrainer:
    return train_main("grpo", argv)


if __name__ == "__main__":
    run(main)
