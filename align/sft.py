"""SFT: ``accelerate launch align/sft.py --config recipes/sft_lora.yaml [--key value ...]`` (or
``qwen-image-align sft --config ...``). The run skeleton is ``align.launch.train_main``; this file says what SFT
reads and builds."""

import os
import sys

if __package__ in (None, ""):
    # Run as a file: put the repository root (not align/) first so `align` and `qwen_image` import as packages.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if __name__ == "__main__":  # before the libraries import (~10 s): Ctrl-C then is one line, not a traceback
    from align.launch import exit_at_ctrl_c_while_starting

    exit_at_ctrl_c_while_starting()

from align.configs.sft import SFTConfig  # noqa: E402
from align.data.sft import load_sft_rows, prepare_sft_data, write_data_summary  # noqa: E402
from align.launch import run, train_main  # noqa: E402
from align.modeling import uses_edit_model  # noqa: E402
from align.trainers.sft import SFTTrainer  # noqa: E402


def load_data(config: SFTConfig):
    # Rows rater-filtered and checked before the model (edit rows are checked with their control images later).
    return None if uses_edit_model(config) else load_sft_rows(config)


def build_trainer(config: SFTConfig, qwen, rows) -> SFTTrainer:
    with config.main_process_first(desc="SFT data"):  # rank 0 encodes; the others read its on-disk cache
        data = prepare_sft_data(config, qwen, rows)
    trainer = SFTTrainer(qwen, config, data)  # encodes the validation prompts (the text encoder goes after this)
    write_data_summary(config, data.summary, trainer.is_world_process_zero())
    return trainer


def main(argv=None) -> SFTTrainer:
    return train_main("sft", argv)


if __name__ == "__main__":
    run(main)
