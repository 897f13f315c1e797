"""Library chatter that is not the user's business, silenced at every entry point of the project.

Each filter names one message of one library, precisely (a message regex on that library's own logger, or a
warnings filter on its module), so nothing else is hidden: a user's own warnings, and every other library warning,
still print. ``install()`` runs when the ``align`` package is imported (``align/__init__.py``), which is before any
launch script, the CLI or the demo imports torch, transformers or diffusers, so the filters are in place when the
messages are emitted.

What is silenced and why:

- torchao's "Failed to load .../torchao/_C_*.so": its optional CUDA/sm90 kernels, missing from CPU builds and other
  GPU architectures; torchao works without them and says so again only if a kernel is actually used.
- torch's pytree "<enum ...> is an Enum subclass and is now natively supported by torch.compile": torchao registers
  its enums the old way at import; nothing for a user to change.
- torchao's "Detected no triton": its int-matmul GPU kernels; a CPU machine has no Triton and needs none.
- diffusers' "Unable to import `torchao` Tensor objects": the same torchao build without those kernels; it only
  matters for checkpoints serialised with torchao, which the project neither writes nor reads.

transformers' FutureWarning "`gradient_checkpointing` is deprecated" is not filtered: it is fixed where it came from
(align/configs/base.py hands the option to the diffusers model and leaves the Trainer's copy unset).
"""

from __future__ import annotations

import logging
import re
import warnings

# (logger name, message regex): records of that logger whose message matches are dropped.
LOG_NOISE: tuple[tuple[str, str], ...] = (
    ("torchao", r"Failed to load \S*torchao[/\\]_C\S*\.(so|pyd)\b"),
    ("torch.utils._pytree", r"<enum '\w+'> is an Enum subclass and is now natively supported by torch\.compile"),
    ("diffusers.quantizers.torchao.torchao_quantizer", r"Unable to import `torchao` Tensor objects"),
    ("torchao.kernel.intmm", r"Detected no triton, on systems without Triton certain kernels will not work"),
)
# (message regex, category, module regex) for the warnings module.
WARNING_NOISE: tuple[tuple[str, type[Warning], str], ...] = ()


class _DropMatching(logging.Filter):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is not ours to judge: let it through
            return True
        return not self.pattern.search(message)


_installed = False


def install() -> None:
    """Add the filters (once per process)."""
    global _installed
    if _installed:
        return
    _installed = True
    for name, pattern in LOG_NOISE:
        logging.getLogger(name).addFilter(_DropMatching(pattern))
    for message, category, module in WARNING_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
