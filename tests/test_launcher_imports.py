"""``qwen-image-align`` checks the options in its own process, then ``accelerate launch`` starts the training
processes, which import the whole stack again. The launcher leaves out what only training uses (peft, diffusers and
bitsandbytes: most of its import time, benchmarks/startup_error.py), and still checks every recipe."""

from __future__ import annotations

import json
import subprocess
import sys

from run_helpers import ROOT, launch_env

CHECK_EVERY_TINY_RECIPE = """
import json, sys
from pathlib import Path
from align.cli import _skip_training_only_imports, split_arguments
_skip_training_only_imports()
from align.objectives import available_objectives
checked = []
for recipe in sorted(Path(sys.argv[1]).glob("*.yaml")):
    objective = next(word for word in recipe.stem.split("_") if word in available_objectives())  # edit_dpo_grpo: dpo
    split_arguments(objective, ["--config", str(recipe), "--output_dir", sys.argv[2], "--num_processes", "1"])
    checked.append(recipe.name)
# torchao stays: transformers' TrainingArguments.__post_init__ imports it (through its model base class), and the
# launcher runs that to check the values as the training process will.
print(json.dumps({"checked": checked, "imported": [m for m in ("peft", "bitsandbytes", "diffusers")
                                                   if sys.modules.get(m) is not None]}))
"""


def test_the_launcher_checks_every_tiny_recipe_without_importing_what_only_training_uses(tmp_path):
    proc = subprocess.run([sys.executable, "-c", CHECK_EVERY_TINY_RECIPE, str(ROOT / "recipes/tiny"),
                           str(tmp_path / "out")], capture_output=True, text=True, env=launch_env(), timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(result["checked"]) == len(list((ROOT / "recipes/tiny").glob("*.yaml"))) > 10
    assert result["imported"] == []


def test_a_plugin_keeps_every_import(tmp_path):
    """A plugin module may import peft itself (the launcher imports plugins to know their objectives)."""
    (tmp_path / "uses_peft.py").write_text("from peft import LoraConfig  # noqa: F401\n", encoding="utf-8")
    code = ("import sys\nfrom align.cli import _skip_training_only_imports\n_skip_training_only_imports()\n"
            "from align.objectives import available_objectives\nprint(available_objectives())\n"
            "assert sys.modules['peft'] is not None\n")
    env = {**launch_env(), "QWEN_IMAGE_ALIGN_PLUGINS": str(tmp_path / "uses_peft.py")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
