"""Offline edit rewards: the requested text (OCR on real renders) and consistency with the source outside a mask."""

import numpy as np
import pytest
from PIL import Image

from rewards import get_reward
from rewards.edit import requested_text
from rewards.render import render_text


def test_requested_text_reads_the_instruction():
    assert requested_text('replace "Latte" with "拿铁"') == "拿铁"
    assert requested_text("把「Latte」改成「拿铁」") == "拿铁"
    assert requested_text('add the words "GRAND OPENING" above the door') == "GRAND OPENING"
    assert requested_text('put "SALE" and "50%" on the sign') == "SALE 50%"
    assert requested_text("make the sky pink") is None


def test_edit_ocr_scores_the_requested_text():
    reward = get_reward("edit_ocr")
    right, wrong = render_text("拿铁", size=(256, 128), font_size=64), render_text("Latte", size=(256, 128), font_size=64)
    prompts = ['replace "Latte" with "拿铁"'] * 2 + ["make the sky pink", "make it say this"]
    scores = reward(prompts, [right, wrong, right, right], text=[None, None, None, "拿铁"])
    assert scores[0] == 1.0 and scores[1] < 0.5 and scores[2] is None and scores[3] == 1.0


def test_edit_consistency_outside_the_mask():
    rng = np.random.default_rng(0)
    source = Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8))
    edited = np.asarray(source).copy()
    edited[16:48, 32:64] = 255  # the edit: a white box
    edited = Image.fromarray(edited)
    mask = Image.new("L", (96, 64), 0)
    mask.paste(255, (32, 16, 64, 48))
    noisy = Image.fromarray(np.clip(np.asarray(source) + rng.normal(0, 40, (64, 96, 3)), 0, 255).astype(np.uint8))
    # SSIM's 11 px window still sees the box's border from outside it: close to 1, not exactly 1.
    for metric, top, tol in (("ssim", 1.0, 0.03), ("psnr", 50.0, 1e-6)):
        reward = get_reward("edit_consistency", metric=metric)
        inside_only, whole, changed = reward(["x"] * 3, [edited, edited, noisy], source=[source] * 3,
                                            mask=[mask, None, mask])
        assert inside_only == pytest.approx(top, abs=tol)  # only the masked box changed
        assert whole < inside_only - 0.05 * top  # without the mask the box counts
        assert changed < inside_only - 0.05 * top  # noise outside the mask counts
    # the source may come as the control images column (a list per row); a row without one is not applicable
    with pytest.raises(ValueError, match="needs the source image"):
        get_reward("edit_consistency")(["x"], [edited])
    assert get_reward("edit_consistency")(["x", "y"], [edited, edited], control_images=[[source], None])[1] is None
