"""Flow-GRPO: ``accelerate launch align/grpo.py --config recipes/grpo_ocr.yaml [--key value ...]`` (or
``qwen-image-align grpo --config ...``)."""

import os
import sys

if __package__ in (None, ""):
    # Run as a file: put the repository root (not align/) first so `align` and `qwen_image` import as packages.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from align.launch import run  # noqa: E402
from align.trainers.grpo import main  # noqa: E402

if __name__ == "__main__":
    run(main)
