"""Evaluation: text-rendering accuracy, Elo / Bradley-Terry / win rates, VAE reconstruction PSNR / SSIM."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from align.evaluation import (
    bootstrap_ratings,
    bradley_terry,
    char_accuracy,
    elo_ratings,
    evaluate_text_rendering,
    leaderboard,
    ned_score,
    psnr,
    reconstruction_metrics,
    ssim,
    to_games,
    win_matrix,
    win_rates,
    word_accuracy,
)


# ------------------------------------------------------------------------------------------- text rendering
def test_word_accuracy_and_ned_by_hand():
    assert word_accuracy("GRAND opening", "Grand Opening Sale") == pytest.approx(2 / 3)
    assert word_accuracy("sale sale", "Sale sale SALE") == pytest.approx(2 / 3)  # each OCR word matches once
    assert word_accuracy("新品上市", "新品上线") == pytest.approx(3 / 4)  # CJK: one character = one word
    assert word_accuracy("anything", "") is None
    assert word_accuracy("Open!", "open") == 1.0  # edge punctuation stripped
    # NED: 1 - lev / max(len); "kitten" -> "sitting" is 3 edits over 7
    assert ned_score("kitten", "sitting") == pytest.approx(1 - 3 / 7)
    assert ned_score("", "abc") == 0.0 and ned_score("a b c", "ABC") == 1.0
    # char accuracy: 1 - min(lev, len t) / len t ; extra text can drive it to 0 but not below
    assert char_accuracy("abcX", "abc") == pytest.approx(2 / 3)
    assert char_accuracy("completely different", "abc") == 0.0


def test_evaluate_text_rendering_with_fake_generator_and_ocr():
    # generate draws nothing real: the "OCR" reads what the generator wrote into image.info
    def generate(prompts):
        out = []
        for p in prompts:
            im = Image.new("RGB", (8, 8))
            im.info["drawn"] = {"A": "Grand Opening", "B": "新品上线", "C": "whatever"}[p[0]]
            out.append(im)
        return out

    def ocr(images):
        return [im.info["drawn"] for im in images]

    prompts = ['A sign with "Grand Opening"', 'B poster "新品上市"', "C a cat, no text"]
    res = evaluate_text_rendering(generate, prompts, ocr=ocr, batch_size=2)
    pp = res["per_prompt"]
    assert res["n"] == 3 and res["n_scored"] == 2
    assert pp[0]["target"] == "Grand Opening" and pp[0]["word_accuracy"] == 1.0 and pp[0]["exact"] == 1.0
    assert pp[1]["word_accuracy"] == pytest.approx(0.75) and pp[1]["ned"] == pytest.approx(0.75)
    assert pp[2]["target"] is None and pp[2]["word_accuracy"] is None
    assert res["mean"]["word_accuracy"] == pytest.approx((1 + 0.75) / 2)
    assert res["mean"]["exact"] == pytest.approx(0.5)
    # explicit targets override the quotes; a reward-style scorer is passed the targets
    seen = {}

    def scorer(p, imgs, text=None):
        seen.setdefault("text", []).extend(text)
        return [0.5] * len(p)

    res = evaluate_text_rendering(generate, prompts, ocr=ocr, targets=["Grand", None, None], scorer=scorer)
    assert res["per_prompt"][0]["target"] == "Grand" and res["mean"]["score"] == 0.5
    assert seen["text"] == ["Grand", "新品上市", None]


def test_evaluate_text_rendering_rejects_wrong_counts():
    with pytest.raises(ValueError):
        evaluate_text_rendering(lambda ps: [], ['"x"'], ocr=lambda ims: [])


# ----------------------------------------------------------------------------------------------- pairwise
def test_elo_matches_hand_computation():
    rows = [
        {"chosen": "A", "rejected": "B"},                     # A beats B
        {"model_a": "B", "model_b": "C", "winner": "model_b"},  # C beats B
        {"model_a": "A", "model_b": "C", "winner": "tie"},      # A ties C
    ]
    k = 32
    e = lambda ra, rb: 1 / (1 + 10 ** ((rb - ra) / 400))
    a, b, c = 1000.0, 1000.0, 1000.0
    a, b = a + k * (1 - 0.5), b - k * (1 - 0.5)              # 1016, 984
    eb = e(b, c)
    b, c = b + k * (0 - eb), c - k * (0 - eb)
    ea = e(a, c)
    a, c = a + k * (0.5 - ea), c - k * (0.5 - ea)
    r = elo_ratings(rows, k=k, initial=1000)
    assert r["A"] == pytest.approx(a) and r["B"] == pytest.approx(b) and r["C"] == pytest.approx(c)
    assert sum(r.values()) == pytest.approx(3000)  # Elo is zero-sum
    assert list(r)[-1] == "B"
    # first game alone: exactly +-16
    assert elo_ratings([("A", "B")]) == {"A": 1016.0, "B": 984.0}


def test_win_rates_counts_and_matrix():
    rows = [("A", "B"), ("A", "B"), ("B", "A"), {"model_a": "A", "model_b": "C", "winner": "C"},
            {"model_a": "B", "model_b": "C", "winner": "draw"}]
    w = win_rates(rows)
    assert w["A"] == {"wins": 2, "losses": 2, "ties": 0, "games": 4, "win_rate": 0.5}
    assert w["B"]["wins"] == 1 and w["B"]["losses"] == 2 and w["B"]["ties"] == 1
    assert w["B"]["win_rate"] == pytest.approx(1.5 / 4)
    assert w["C"]["win_rate"] == pytest.approx(0.75)
    names, m = win_matrix(rows)
    assert names == ["A", "B", "C"]
    assert m[0][1] == pytest.approx(2 / 3) and m[1][0] == pytest.approx(1 / 3) and m[0][0] is None
    assert m[1][2] == 0.5


def test_winner_by_name_and_bad_rows():
    assert to_games([{"model_a": "x", "model_b": "y", "winner": "y"}]) == [("x", "y", 0.0)]
    with pytest.raises(ValueError):
        to_games([{"model_a": "x", "model_b": "y", "winner": "z"}])
    with pytest.raises(ValueError):
        to_games([{"foo": 1}])


def test_bradley_terry_closed_form_for_two_players():
    rows = [("A", "B")] * 3 + [("B", "A")]
    r = bradley_terry(rows, prior=0)
    # MLE: p_A / p_B = 3 wins / 1 win -> rating gap 400 log10(3), centred on 1000
    assert r["A"] - r["B"] == pytest.approx(400 * math.log10(3), rel=1e-6)
    assert (r["A"] + r["B"]) / 2 == pytest.approx(1000)
    # an undefeated player stays finite with the default prior, and order does not matter (unlike Elo)
    r2 = bradley_terry([("A", "B")] * 5 + [("B", "C")] * 5)
    assert all(math.isfinite(v) for v in r2.values()) and list(r2) == ["A", "B", "C"]
    assert bradley_terry(list(reversed(rows)), prior=0) == pytest.approx(r)


def test_bootstrap_ci_contains_point_and_is_seeded():
    rows = [("A", "B")] * 8 + [("B", "A")] * 2 + [("B", "C")] * 6 + [("C", "B")] * 4
    ci = bootstrap_ratings(rows, method="bt", rounds=60, seed=0)
    for _name, d in ci.items():
        assert d["lower"] <= d["median"] <= d["upper"]
        assert d["lower"] < d["upper"]
    assert ci == bootstrap_ratings(rows, method="bt", rounds=60, seed=0)
    assert ci["A"]["rating"] > ci["C"]["rating"]
    board = leaderboard(rows, bootstrap_rounds=20)
    assert [b["name"] for b in board][0] == "A" and "elo_lower" in board[0] and board[0]["games"] == 10


# ---------------------------------------------------------------------------------------- reconstruction
def _text_images(n=2, size=(64, 64)):
    from align.datatools import render_text_image

    return [render_text_image(t, m, size, seed=0)[0] for t, m in zip(["Sale 50%", "新品上市"], ["plain", "scene"])][:n]


def test_psnr_hand_value_and_ssim_range():
    a = torch.full((1, 3, 32, 32), 0.5, dtype=torch.float64)
    b = a + 0.1  # MSE 0.01 -> PSNR 20 dB
    assert psnr(b, a)[0] == pytest.approx(20.0, abs=1e-6)
    assert psnr(a, a)[0] == math.inf
    s = ssim(torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.rand(2, 3, 32, 32))
    assert all(-1 <= x <= 1 for x in s) and all(x < 0.5 for x in s)


def test_reconstruction_identity_noisy_and_tensor_decode():
    imgs = _text_images()
    ident = reconstruction_metrics(imgs, encode=lambda x: x, decode=lambda x: x)
    assert ident["psnr"] == math.inf and ident["ssim"] == pytest.approx(1.0) and ident["n"] == 2

    def noisy(sigma):
        def decode(batch):
            rng = np.random.default_rng(0)
            return [Image.fromarray((np.asarray(im, np.float32) + rng.normal(0, sigma, np.asarray(im).shape))
                                    .clip(0, 255).astype(np.uint8)) for im in batch]
        return decode

    light = reconstruction_metrics(imgs, encode=lambda x: x, decode=noisy(5))
    heavy = reconstruction_metrics(imgs, encode=lambda x: x, decode=noisy(40))
    assert 30 < light["psnr"] < 40 and heavy["psnr"] < light["psnr"]
    assert 0 < heavy["ssim"] < light["ssim"] < 1
    # a decoder returning a tensor in [-1, 1]
    def dec(batch):
        t = torch.stack([torch.from_numpy(np.asarray(im, np.float32) / 127.5 - 1).permute(2, 0, 1) for im in batch])
        return t.unsqueeze(2)  # (B, 3, 1, H, W) like the Qwen-Image VAE
    m = reconstruction_metrics(imgs, encode=lambda x: x, decode=dec, pixel_range=(-1, 1))
    assert m["psnr"] > 60 and m["ssim"] == pytest.approx(1.0, abs=1e-6)


def test_reconstruction_with_tiny_qwen_image(tiny_model):
    imgs = _text_images(1, size=(48, 48))
    m = reconstruction_metrics(imgs, model=tiny_model, size=(64, 64))
    assert m["n"] == 1 and math.isfinite(m["psnr"]) and 0 < m["psnr"] < 60
    assert -1 <= m["ssim"] <= 1


def test_text_eval_with_tiny_qwen_image_generate(tiny_model):
    sizes = []

    def ocr(images):
        sizes.extend(im.size for im in images)
        return ["OPEN"] * len(images)  # pretend the OCR read OPEN everywhere

    res = evaluate_text_rendering(
        lambda ps: tiny_model.generate(ps, height=64, width=64, num_inference_steps=2, true_cfg_scale=1.0),
        ['a sign "OPEN"', 'a sign "CLOSED NOW"'], ocr=ocr, batch_size=2)
    assert sizes == [(64, 64), (64, 64)]
    assert [r["word_accuracy"] for r in res["per_prompt"]] == [1.0, 0.0]
