"""Flow-DPO (+ the online term, ``online: grpo | nft | awm | dgpo`` with ``w_online > 0``): ``accelerate launch [--config_file recipes/accelerate/X.yaml]
align/dpo.py --config recipes/dpo_lora.yaml`` (or ``qwen-image-align dpo --config ...``). The run skeleton is
``align.launch.train_main``; this file says what DPO reads and builds."""

import os
import sys

if __package__ in (None, ""):
    # Run as a file: put the repository root (not align/) first so `align` and `qwen_image` import as packages.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if __name__ == "__main__":  # before the libraries import (~10 s): Ctrl-C then is one line, not a traceback
    from align.launch import exit_at_ctrl_c_while_starting

    exit_at_ctrl_c_while_starting()

from align.configs.combined import DPOGRPOConfig  # noqa: E402
from align.data.dpo import build_datasets, read_pairs  # noqa: E402
from align.data.grpo import load_grpo_prompts  # noqa: E402
from align.data.kto import encode_kto_rows, load_kto_rows  # noqa: E402
from align.launch import run, train_main  # noqa: E402
from align.rl.rewards import build_reward  # noqa: E402
from align.trainers.combined import DPOGRPOTrainer  # noqa: E402
from align.trainers.dpo import FlowDPOTrainer  # noqa: E402


def load_data(config: DPOGRPOConfig):
    # Pairs, the online term's prompts and reward names, the KTO term's rated images: read and checked before the
    # model loads.
    rated = load_kto_rows(config, config.kto_dataset_name)[0] if config.w_kto > 0 else None
    if config.online_method is None:
        return read_pairs(config), None, rated
    build_reward(config)  # an unknown reward name fails here, not after the model loaded
    return read_pairs(config), load_grpo_prompts(config), rated


def build_trainer(config: DPOGRPOConfig, qwen, data):
    pairs, prompts, rated = data
    train_ds, eval_ds = build_datasets(config, qwen, pairs)
    if config.online_method is not None or config.w_kto > 0:  # the combined objective; otherwise plain Flow-DPO
        if rated is not None:
            with config.main_process_first(desc="rated images"):
                rated = encode_kto_rows(config, qwen, rated)
        return DPOGRPOTrainer(qwen, config, train_dataset=train_ds, eval_dataset=eval_ds, grpo_prompts=prompts,
                              rated=rated)
    return FlowDPOTrainer(qwen, config, train_dataset=train_ds, eval_dataset=eval_ds)  # trains on cached embeddings


def main(argv=None):
    return train_main("dpo", argv)


if __name__ == "__main__":
    run(main)
