"""Flow-DPO (+ GRPO term when w_grpo > 0): ``accelerate launch [--config_file recipes/accelerate/X.yaml] align/dpo.py
--config recipes/dpo_lora.yaml [--key value ...]`` (or ``qwen-image-align dpo --config ...``)."""

import os
import sys

if __package__ in (None, ""):
    # Run as a file: put the repository root (not align/) first so `align` and `qwen_image` import as packages.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from align.launch import run  # noqa: E402
from align.trainers.combined import main  # noqa: E402

if __name__ == "__main__":
    run(main)
