"""Diffusion-KTO from per-image ratings: ``accelerate launch align/kto.py --config recipes/kto_lora.yaml`` (or
``qwen-image-align kto --config ...``). The run skeleton is ``align.launch.train_main``; this file says what KTO
reads and builds."""

import os
import sys

if __package__ in (None, ""):
    # Run as a file: put the repository root (not align/) first so `align` and `qwen_image` import as packages.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if __name__ == "__main__":  # before the libraries import (~10 s): Ctrl-C then is one line, not a traceback
    from align.launch import exit_at_ctrl_c_while_starting

    exit_at_ctrl_c_while_starting()

from align.configs.kto import KTOConfig  # noqa: E402
from align.data.kto import build_kto_datasets, load_kto_rows, write_summary  # noqa: E402
from align.launch import run, train_main  # noqa: E402
from align.trainers.kto import KTOTrainer  # noqa: E402


def load_data(config: KTOConfig):
    # Rated rows read, labelled and checked (edit rows with their control images) before the model loads.
    return load_kto_rows(config)


def build_trainer(config: KTOConfig, qwen, data) -> KTOTrainer:
    rows, report = data
    train_ds, eval_ds = build_kto_datasets(config, qwen, rows)
    trainer = KTOTrainer(qwen, config, train_dataset=train_ds, eval_dataset=eval_ds)  # trains on cached embeddings
    write_summary(config, report, trainer.is_world_process_zero())
    return trainer


def main(argv=None) -> KTOTrainer:
    return train_main("kto", argv)


if __name__ == "__main__":
    run(main)
