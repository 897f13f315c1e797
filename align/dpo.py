"""Flow-DPO: ``accelerate launch [--config_file recipes/accelerate/X.yaml] align/dpo.py --config recipes/dpo_lora.yaml``."""

from align.launch import run
from align.trainers.combined import main  # Flow-DPO; + GRPO term when w_grpo > 0

if __name__ == "__main__":
    run(main)
