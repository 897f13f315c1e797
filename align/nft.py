"""DiffusionNFT: ``accelerate launch align/nft.py --config recipes/nft_ocr.yaml [--key value ...]`` (or
``qwen-image-align nft --config ...``). The run skeleton is ``align.launch.train_main``; the trainer is
``align.trainers.forward.ForwardRLTrainer`` (docs/online-rl.md)."""

import os
import sys

if __package__ in (None, ""):
    # Run as a file: put the repository root (not align/) first so `align` and `qwen_image` import as packages.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if __name__ == "__main__":  # before the libraries import (~10 s): Ctrl-C then is one line, not a traceback
    from align.launch import exit_at_ctrl_c_while_starting

    exit_at_ctrl_c_while_starting()

from align.configs.forward import NFTConfig  # noqa: E402, F401  (the config this script parses)
from align.launch import run, train_main  # noqa: E402
from align.trainers.forward import build_forward_trainer as build_trainer  # noqa: E402, F401
from align.trainers.forward import load_forward_data as load_data  # noqa: E402, F401


def main(argv=None):
    return train_main("nft", argv)


if __name__ == "__main__":
    run(main)
