"""The demo's rating round: the simulated panel rates every candidate 1-5 from its reward, written as a rating
project's pull, which the KTO data loader reads as it is (desirable / undesirable / the middle band dropped)."""

import json
import random

from PIL import Image

from align.configs.kto import KTOConfig
from align.data.kto import load_kto_rows
from align.workflows.auto_label import rate_candidates, simulated_ratings


def test_simulated_ratings_follow_the_reward():
    rng = random.Random(0)
    assert simulated_ratings(1.0, rng, noise=0.0) == [5, 5, 5]
    assert simulated_ratings(0.0, rng, noise=0.0) == [1, 1, 1]
    assert simulated_ratings(0.5, rng, noise=0.0) == [3, 3, 3]
    noisy = [r for _ in range(200) for r in simulated_ratings(0.5, rng, noise=0.2)]
    assert set(noisy) <= {1, 2, 3, 4, 5} and len(set(noisy)) >= 3


def test_rating_round_is_read_by_the_kto_loader(tmp_path):
    pairs = tmp_path / "pairs"
    (pairs / "images").mkdir(parents=True)
    scores = [1.0, 1.0, 0.0, 0.0, 0.5, 1.0]
    with open(pairs / "candidates.jsonl", "w") as fh:
        for i, score in enumerate(scores):
            Image.new("RGB", (32, 32), (40 * i, 0, 0)).save(pairs / "images" / f"c{i}.png")
            fh.write(json.dumps({"prompt": f"a sign {i % 2}", "image": f"images/c{i}.png", "score": score}) + "\n")
    summary = rate_candidates(pairs, tmp_path / "ratings", noise=0.0, seed=0)
    assert (summary["rated_images"], summary["rated_high"], summary["rated_low"]) == (6, 3, 2)
    config = KTOConfig(output_dir=str(tmp_path / "out"), dataset_name=str(tmp_path / "ratings"), use_cpu=True,
                       report_to="none")
    rows, report = load_kto_rows(config)
    assert len(rows) == 5  # the 0.5-scored image (3 stars) is in the middle band: dropped and counted
    assert sum(report.dropped.values()) == 1
