"""Evaluation: text-rendering accuracy (CVTG-2K word accuracy / NED), Elo / Bradley-Terry / win rates from
pairwise annotations, paired bootstrap intervals for gains over seeds, and VAE reconstruction PSNR / SSIM on text images."""

from .bootstrap import bootstrap_gain
from .pairwise import (
    bootstrap_ratings,
    bradley_terry,
    elo_ratings,
    expected_score,
    leaderboard,
    to_games,
    win_matrix,
    win_rates,
)
from .reconstruction import psnr, reconstruction_metrics, ssim, to_tensor
from .text_rendering import (
    char_accuracy,
    edit_distance,
    evaluate_text_rendering,
    ned_score,
    split_words,
    word_accuracy,
)

__all__ = [
    "evaluate_text_rendering", "word_accuracy", "ned_score", "char_accuracy", "edit_distance", "split_words",
    "elo_ratings", "expected_score", "win_rates", "win_matrix", "bradley_terry", "bootstrap_ratings", "leaderboard",
    "to_games", "bootstrap_gain", "reconstruction_metrics", "psnr", "ssim", "to_tensor",
]
