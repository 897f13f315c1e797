"""Any registered objective: ``accelerate launch align/train.py NAME --config recipe.yaml [--key value ...]``.

The built-in objectives have launch scripts of their own (align/sft.py, align/dpo.py, align/grpo.py); this one
serves every objective registered later, including those of ``QWEN_IMAGE_ALIGN_PLUGINS`` modules
(``align/objectives.py``). ``qwen-image-align NAME`` picks the right script.
"""

import os
import sys

if __package__ in (None, ""):
    # Run as a file: put the repository root (not align/) first so `align` and `qwen_image` import as packages.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if __name__ == "__main__":  # before the libraries import (~10 s): Ctrl-C then is one line, not a traceback
    from align.launch import exit_at_ctrl_c_while_starting

    exit_at_ctrl_c_while_starting()

from align.launch import run, train_main  # noqa: E402
from align.objectives import available_objectives  # noqa: E402
from qwen_image.errors import UserError  # noqa: E402


def main(argv=None):
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0].startswith("-"):
        raise UserError(f"usage: align/train.py OBJECTIVE --config RECIPE.yaml; objectives: "
                        f"{', '.join(available_objectives())}")
    return train_main(args[0], args[1:])


if __name__ == "__main__":
    run(main)
