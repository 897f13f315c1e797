"""Flow-DPO: ``accelerate launch [--config_file recipes/accelerate/X.yaml] align/dpo.py --config recipes/dpo_lora.yaml``."""

from align.launch import run
from align.trainers.dpo import main

if __name__ == "__main__":
    run(main)
