"""Label Studio bridge: collect human preferences (pairs) and ratings for Qwen-Image alignment.

Import-light: no torch, no model. See ``python -m annotation --help`` and docs/annotation.md.
"""
from .aggregate import aggregate_pairs, aggregate_ratings
from .agreement import fleiss_kappa, krippendorff_alpha
from .errors import AnnotationError

__all__ = ["AnnotationError", "aggregate_pairs", "aggregate_ratings", "fleiss_kappa", "krippendorff_alpha"]
