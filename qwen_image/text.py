"""Prompt encoding with Qwen-Image's exact templates (Qwen2.5-VL, last hidden layer, template tokens dropped)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterable

import torch
from tqdm.auto import tqdm

from .errors import QwenImageInputError

T2I_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
T2I_DROP_TOKENS = 34
EDIT_SYSTEM = (
    "Describe the key features of the input image (color, shape, size, texture, objects, background), then explain how "
    "the user's text instruction should alter or modify the image. Generate a new image that meets the user's "
    "requirements while maintaining consistency with the original input where appropriate."
)
EDIT_TEMPLATE = "<|im_start|>system\n" + EDIT_SYSTEM + "<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
EDIT_DROP_TOKENS = 64
MAX_PROMPT_TOKENS = 1024


def validate_prompts(prompts: str | list[str], allow_empty_string: bool = True) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)) or len(prompts) == 0:
        raise QwenImageInputError("prompts is empty: pass a list with at least one prompt string.")
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad:
        raise QwenImageInputError(f"prompt #{bad[0]} is {type(prompts[bad[0]]).__name__}, not a string.")
    if not allow_empty_string and any(not p.strip() for p in prompts):
        raise QwenImageInputError("an empty prompt was given; write what the image should show.")
    return list(prompts)


class PromptEncoder:
    """Encodes prompts like ``QwenImagePipeline.encode_prompt``, with a per-prompt LRU cache.

    Returns right-padded embeddings (B, L, D) and a 0/1 mask (B, L); L = longest prompt in the batch.
    Cached per prompt (not per batch) so that a prompt seen in any batch is never encoded twice.
    """

    def __init__(self, tokenizer, text_encoder, cache_size: int = 256):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.cache_size = cache_size
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    def clear_cache(self) -> None:
        self._cache.clear()

    def count_tokens(self, prompt: str) -> int:
        """Tokens the transformer will see for this prompt (template tokens dropped)."""
        ids = self.tokenizer(T2I_TEMPLATE.format(prompt)).input_ids
        return len(ids) - T2I_DROP_TOKENS

    @torch.no_grad()
    def _encode_uncached(self, prompts: list[str]) -> list[torch.Tensor]:
        texts = [T2I_TEMPLATE.format(p) for p in prompts]
        tokens = self.tokenizer(texts, padding=True, return_tensors="pt")
        lengths = tokens.attention_mask.sum(1) - T2I_DROP_TOKENS
        too_long = [(i, int(n)) for i, n in enumerate(lengths) if n > MAX_PROMPT_TOKENS]
        if too_long:
            i, n = too_long[0]
            raise QwenImageInputError(
                f"prompt #{i} is {n} tokens; Qwen-Image reads at most {MAX_PROMPT_TOKENS}. Shorten it."
            )
        device = self.text_encoder.device
        out = self.text_encoder(
            input_ids=tokens.input_ids.to(device),
            attention_mask=tokens.attention_mask.to(device),
            output_hidden_states=True,
        )
        hidden = out.hidden_states[-1]
        mask = tokens.attention_mask.bool().to(device)
        return [h[m][T2I_DROP_TOKENS:] for h, m in zip(hidden, mask)]

    def precompute(self, prompts: Iterable[str], batch_size: int = 8, progress: bool = False) -> int:
        """Encode every prompt once and keep the embeddings on CPU, so the text encoder can be released
        (8 B parameters on the real model) while training still sees new batches of these prompts.
        Returns the number of distinct prompts."""
        unique = list(dict.fromkeys(validate_prompts(list(prompts))))
        self.cache_size = max(self.cache_size, len(unique) + 256)
        todo = [p for p in unique if p not in self._cache]
        for i in tqdm(range(0, len(todo), batch_size), disable=not progress, desc="Encoding prompts", leave=False):
            chunk = todo[i : i + batch_size]
            for p, emb in zip(chunk, self._encode_uncached(chunk)):
                self._cache[p] = emb.detach().cpu()
        return len(unique)

    def encode(
        self, prompts: str | list[str], device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        prompts = validate_prompts(prompts)
        missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        if missing and self.text_encoder is None:
            raise QwenImageInputError(
                f"prompt {missing[0][:60]!r} was not encoded before the text encoder was released; "
                "precompute every prompt first or keep the text encoder loaded."
            )
        if missing:
            for p, emb in zip(missing, self._encode_uncached(missing)):
                self._cache[p] = emb.detach()
        for p in prompts:
            self._cache.move_to_end(p)
        per_prompt = [self._cache[p] for p in prompts]
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return pad_embeddings(per_prompt, device=device, dtype=dtype)


def pad_embeddings(
    per_prompt: list[torch.Tensor], device=None, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad a list of (L_i, D) embeddings with zeros -> (B, L, D) and a long 0/1 mask (B, L)."""
    max_len = max(e.shape[0] for e in per_prompt)
    dim = per_prompt[0].shape[1]
    embeds = per_prompt[0].new_zeros(len(per_prompt), max_len, dim)
    mask = torch.zeros(len(per_prompt), max_len, dtype=torch.long, device=per_prompt[0].device)
    for i, e in enumerate(per_prompt):
        embeds[i, : e.shape[0]] = e
        mask[i, : e.shape[0]] = 1
    device = device if device is not None else embeds.device
    return embeds.to(device=device, dtype=dtype or embeds.dtype), mask.to(device)
