"""End-to-end OCR reward on real renders (rapidocr PP-OCRv6 weights from the wheel, CPU, offline)."""

import pytest
from PIL import Image, ImageDraw

from rewards import get_reward, ocr_boxes, ocr_reward, recognize_text, sort_reading_order
from rewards.ocr import OcrBox
from rewards.render import cjk_font_path, load_font, render_text

TARGET = "新品上市 Latte 拿铁 门迎春夏秋冬福"


@pytest.fixture(scope="module")
def clean_render():
    return render_text(TARGET, size=(512, 512), font_size=44)


def test_font_is_bundled_noto_sc():
    p = cjk_font_path()
    assert p.name == "NotoSansSC-Regular.otf" and p.is_file()
    assert cjk_font_path("serif").name == "NotoSerifSC-Regular.otf"
    with pytest.raises(ValueError):
        cjk_font_path("comic")


def test_render_text_draws_and_fits():
    img = render_text("你好 Hello", size=(320, 160), font_size=400, background="navy", color="white")
    assert img.size == (320, 160) and img.mode == "RGB"
    # shrink-to-fit keeps a margin: the border rows/cols stay background
    px = img.load()
    assert all(px[x, 0] == (0, 0, 128) for x in range(320))
    assert any(px[x, y] != (0, 0, 128) for x in range(320) for y in range(160))


def test_clean_chinese_english_render_scores_one(clean_render):
    prompts = [f'A poster with the words "{TARGET}"', "一张海报，上面写着「Hello 世界」"]
    images = [clean_render, render_text("Hello 世界", size=(512, 256), font_size=56)]
    assert ocr_reward(prompts, images) == [1.0, 1.0]


def test_wrong_text_scores_low_and_blank_scores_zero(clean_render):
    blank = Image.new("RGB", (512, 512), "white")
    scores = get_reward("ocr")(['a sign "旧品下架 Mocha 摩卡"', f'"{TARGET}"'], [clean_render, blank])
    assert scores[0] < 0.2
    assert scores[1] == 0.0


def test_one_wrong_character(clean_render):
    s = ocr_reward([f'"{TARGET.replace("福", "富")}"'], [clean_render])[0]
    assert s == pytest.approx(1 - 1 / 18)


def test_text_column_and_not_applicable(clean_render):
    r = get_reward("ocr")
    # no quote and no text column -> None; text column overrides the prompt; empty text falls back to quotes
    out = r(["a poster", "a poster", '"Latte"'], [clean_render] * 3, text=[None, TARGET, ""])
    assert out[0] is None
    assert out[1] == 1.0
    assert out[2] < 0.5  # "Latte" vs the much longer rendered text
    assert get_reward("ocr", substring_match=True)(['"Latte"'], [clean_render]) == [1.0]
    with pytest.raises(ValueError):
        r(["a", "b"], [clean_render])


def test_two_lines_read_top_to_bottom():
    img = render_text("TOP LINE FIRST\n第二行在下面", size=(512, 384), font_size=48)
    text = recognize_text(img)
    assert text.split("\n") == ["TOP LINE FIRST", "第二行在下面"]
    assert ocr_reward(['"TOP LINE FIRST 第二行在下面"'], [img]) == [1.0]
    assert ocr_reward(['"第二行在下面 TOP LINE FIRST"'], [img])[0] < 0.5


def test_reading_order_when_a_taller_box_is_to_the_right():
    """The detector lists boxes by top edge; a taller word to the right would come first without sorting."""
    img = Image.new("RGB", (640, 320), "white")
    d = ImageDraw.Draw(img)
    small, big = load_font(40), load_font(96)
    cy = 160
    d.text((40, cy), "Latte", font=small, fill="black", anchor="lm")
    d.text((330, cy), "拿铁", font=big, fill="black", anchor="lm")
    raw = [b.text for b in ocr_boxes(img)]
    assert raw == ["拿铁", "Latte"]  # the trap is real: detector order is wrong here
    assert ocr_reward(['"Latte 拿铁"'], [img]) == [1.0]
    assert recognize_text(img) == "Latte 拿铁"


def test_sort_reading_order_unit():
    def box(text, x0, y0, x1, y1):
        return OcrBox(text, 0.9, ((x0, y0), (x1, y0), (x1, y1), (x0, y1)))

    # detector order: tall right box first (top edge higher), then the left word, then the next line
    boxes = [box("拿铁", 300, 90, 420, 190), box("Latte", 40, 120, 200, 160), box("second", 40, 260, 200, 300)]
    lines = sort_reading_order(boxes)
    assert [[b.text for b in ln] for ln in lines] == [["Latte", "拿铁"], ["second"]]
    assert sort_reading_order([]) == []


def test_a_smaller_detector_reads_small_renders_the_same():
    from rewards.ocr import OcrReward

    images = [render_text(t, size=(64, 64), font_size=30, margin=2) for t in ("新品", "SALE")]
    prompts = ['a sign that says "新品"', 'a sign that says "SALE"']
    assert OcrReward(num_threads=1, det_side_len=256)(prompts, images) == [1.0, 1.0]
    with pytest.raises(ValueError, match="det_side_len"):
        OcrReward(det_side_len=16)
