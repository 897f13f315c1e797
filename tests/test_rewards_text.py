"""Pure-Python parts of the rewards: quote extraction, normalisation, Levenshtein score, cheap rewards."""

import numpy as np
import pytest
from PIL import Image

from rewards.text import extract_quoted_text, levenshtein, normalize_text, target_text, text_accuracy


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ('A coffee shop sign that says "OPEN NOW"', ["OPEN NOW"]),
        ("海报上写着“新品上市”，下面是「拿铁 Latte」", ["新品上市", "拿铁 Latte"]),
        ("招牌『春夏秋冬』", ["春夏秋冬"]),
        ("a banner reading 'Happy Birthday'", ["Happy Birthday"]),
        ("写着'你好'的牌子", ["你好"]),
        ("don't put the cats' toys here", []),  # apostrophes are not quotes
        ("don't write 'Hi'", ["Hi"]),
        ('a sign "A" and a sign "B"', ["A", "B"]),
        ('She said “It\'s \'great\'”', ["It's 'great'"]),  # nested quote stays in the outer one
        ('every quote kind counts: "X" and \'Y\'', ["X", "Y"]),
        ('empty "" and "  " quotes', []),
        ('unbalanced "quote', []),
        ("no quotes at all", []),
        ("", []),
        ("curly single ‘Bonjour’ quote", ["Bonjour"]),
        # The cases the OCR reward, the data filter and the evaluation used to disagree on (one rule now).
        ("a sign saying 'OPEN'", ["OPEN"]),
        ("＂SALE＂ in red", ["SALE"]),
        ('"hi" and ‘bye’', ["hi", "bye"]),
        ("'It's late' on a clock", ["It's late"]),  # an apostrophe inside a quote
        ("‘it’s open’ and it’s fine", ["it’s open"]),  # curly apostrophes are not closers
        ("rock'n'roll night", []),  # quotes inside a word are apostrophes
        ("阅读《红楼梦》的女孩", []),  # title marks are not quotes
        ("招牌上写着＂营业中＂和＇OPEN＇", ["营业中", "OPEN"]),
    ],
)
def test_extract_quoted_text(prompt, expected):
    assert extract_quoted_text(prompt) == expected


def test_target_text_joins_segments_or_none():
    assert target_text('"A" then "B"') == "A B"
    assert target_text("nothing quoted") is None


def test_normalize_text():
    assert normalize_text("  Hello\tWORLD \n") == "helloworld"
    assert normalize_text("ＡＢＣ　１２３") == "abc123"  # NFKC folds fullwidth forms and the ideographic space
    assert normalize_text("Straße") == "strasse"  # casefold, not lower
    assert normalize_text("新品 上市") == "新品上市"


@pytest.mark.parametrize(
    "a, b, d",
    [("kitten", "sitting", 3), ("", "abc", 3), ("abc", "", 3), ("abc", "abc", 0), ("拿铁", "拿铁咖啡", 2),
     ("门迎春夏秋冬福", "门迎春夏秋冬富", 1), ("flaw", "lawn", 2), ("ab", "ba", 2)],
)
def test_levenshtein_hand_values(a, b, d):
    assert levenshtein(a, b) == d
    assert levenshtein(b, a) == d


def test_text_accuracy_hand_values():
    assert text_accuracy("hello", "hallo") == pytest.approx(0.8)
    assert text_accuracy("Hello World", "hello  world") == 1.0
    assert text_accuracy("", "abcd") == 0.0
    # extra text beyond the target length is clamped at 0, never negative
    assert text_accuracy("x" * 50, "abcd") == 0.0
    # one CJK substitution in 18 characters (reference case): 1 - 1/18
    assert text_accuracy("新品上市Latte拿铁门迎春夏秋冬富", "新品上市 Latte 拿铁 门迎春夏秋冬福") == pytest.approx(1 - 1 / 18)
    assert text_accuracy("abc", "") is None
    assert text_accuracy("abc", "   ") is None
    # substring rule is opt-in
    assert text_accuracy("welcome OPEN now", "open") < 1.0
    assert text_accuracy("welcome OPEN now", "open", substring_match=True) == 1.0


def test_brightness_and_jpeg_compressibility():
    from rewards import brightness, get_reward

    white, black = Image.new("RGB", (64, 64), "white"), Image.new("RGB", (64, 64), "black")
    gray = Image.new("RGB", (64, 64), (128, 128, 128))
    assert brightness(["p"] * 3, [white, black, gray]) == pytest.approx([1.0, 0.0, 128 / 255])
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8))
    flat = Image.new("RGB", (128, 128), (30, 120, 200))
    r = get_reward("jpeg_compressibility")(["a", "b"], [flat, noise])
    assert all(-1.0 <= x <= 0.0 for x in r)
    assert r[0] > r[1] + 0.1  # flat image is far more compressible than noise


def test_rewards_accept_arrays_and_tensors():
    import torch

    from rewards import brightness

    nchw = torch.zeros(2, 3, 8, 8)
    nchw[1] = 1.0
    assert brightness(["a", "b"], nchw) == pytest.approx([0.0, 1.0])
    hwc = np.full((8, 8, 3), 255, np.uint8)
    assert brightness(["a"], [hwc]) == pytest.approx([1.0])


@pytest.mark.parametrize("prompt, expected", [
    ("a sign saying 'OPEN'", "OPEN"),
    ("＂SALE＂", "SALE"),
    ('"hi" and ‘bye’', "hi bye"),
    ("don't park here", None),
])
def test_reward_filter_and_evaluation_read_the_same_target(prompt, expected):
    """The OCR reward, the OCR-agreement data filter and the text-rendering evaluation agree on the target."""
    from align.datatools import OCRAgreementFilter
    from align.evaluation.text_rendering import evaluate_text_rendering
    from rewards.ocr import _targets

    assert _targets([prompt], None) == [expected]
    assert OCRAgreementFilter(text_column=None).target({"prompt": prompt}) == expected
    image = Image.new("RGB", (8, 8))
    result = evaluate_text_rendering(lambda ps: [image] * len(ps), [prompt], ocr=lambda ims: ["x"] * len(ims))
    assert result["per_prompt"][0]["target"] == expected
