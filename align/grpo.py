"""Flow-GRPO: ``accelerate launch align/grpo.py --config recipes/grpo_ocr.yaml [--key value ...]``."""

from align.launch import run
from align.trainers.grpo import main

if __name__ == "__main__":
    run(main)
