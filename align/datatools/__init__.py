"""Data tools from the Qwen-Image data recipe: image filters, near-duplicate removal, caption/OCR agreement,
synthetic text rendering (plain / scene / template), rare-character strings, and an imagefolder writer.

Heavy imports (``imagehash``, the OCR reward) happen lazily inside the functions that need them; the quoted-text
rule comes from ``rewards.text`` (pure Python), the one place for it.
"""

from .filtering import RowReport, filter_dataset, filter_images, load_image
from .image_filters import (
    BlurFilter,
    ContrastFilter,
    DuplicateFilter,
    ExposureFilter,
    ImageFilter,
    OCRAgreementFilter,
    ResolutionFilter,
    clipped_fraction,
    default_filters,
    extract_quoted_text,
    hamming_distance,
    laplacian_variance,
    mean_luma,
    perceptual_hash,
    rms_contrast,
)
from .imagefolder import synthesize_imagefolder, write_imagefolder
from .rare_chars import char_frequencies, cjk_characters, rare_characters, rare_strings
from .synthesis import (
    FONT_STYLES,
    MODES,
    detect_language,
    font_path,
    missing_glyphs,
    perspective_coefficients,
    render_text_image,
    synthesize_text_images,
)

__all__ = [
    "RowReport", "filter_dataset", "filter_images", "load_image",
    "ImageFilter", "ResolutionFilter", "BlurFilter", "ContrastFilter", "ExposureFilter", "DuplicateFilter",
    "OCRAgreementFilter", "default_filters",
    "laplacian_variance", "rms_contrast", "mean_luma", "clipped_fraction", "perceptual_hash", "hamming_distance",
    "extract_quoted_text",
    "MODES", "FONT_STYLES", "font_path", "detect_language", "missing_glyphs", "perspective_coefficients",
    "render_text_image", "synthesize_text_images",
    "write_imagefolder", "synthesize_imagefolder",
    "char_frequencies", "cjk_characters", "rare_characters", "rare_strings",
]
