"""Image filters and filter_dataset: each rule, its threshold edge, and the report."""

import numpy as np
import pytest
from PIL import Image, ImageFilter

from align.datatools import (
    BlurFilter,
    ContrastFilter,
    DuplicateFilter,
    ExposureFilter,
    OCRAgreementFilter,
    ResolutionFilter,
    default_filters,
    extract_quoted_text,
    filter_dataset,
    filter_images,
    hamming_distance,
    laplacian_variance,
    perceptual_hash,
    render_text_image,
    rms_contrast,
)


def noise_image(seed=0, size=(256, 256), smooth=8):
    """A smooth random colour field (photo-like) with fine detail on top."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (size[1] // smooth, size[0] // smooth, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize(size, Image.BICUBIC)
    arr = np.asarray(img, np.int16) + rng.integers(-40, 41, (size[1], size[0], 1))
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def test_laplacian_variance_matches_hand_computation():
    a = np.zeros((5, 5), np.uint8)
    a[2, 2] = 255
    # interior 3x3 Laplacian: centre -4*255, its 4 neighbours +255, corners 0; mean 0
    expected = ((4 * 255) ** 2 + 4 * 255 ** 2) / 9
    assert laplacian_variance(Image.fromarray(a)) == pytest.approx(expected)


def test_blur_filter_catches_blurred_keeps_sharp_and_threshold_edge():
    sharp = noise_image(1)
    blurred = sharp.filter(ImageFilter.GaussianBlur(4))
    v_sharp, v_blur = laplacian_variance(sharp), laplacian_variance(blurred)
    assert v_sharp > 100 > v_blur
    f = BlurFilter(min_variance=100)
    assert f(sharp) is None
    assert "laplacian" in f(blurred)
    # edge: a value exactly at the threshold is kept, just above it is dropped
    assert BlurFilter(min_variance=v_blur)(blurred) is None
    assert BlurFilter(min_variance=v_blur * (1 + 1e-9) + 1e-9)(blurred) is not None


def test_contrast_flat_grey_is_low_and_half_black_half_white_is_half():
    grey = Image.new("RGB", (128, 128), (128, 128, 128))
    assert rms_contrast(grey) == 0.0
    assert "contrast" in ContrastFilter(min_contrast=0.05)(grey)
    a = np.zeros((64, 64), np.uint8)
    a[:, 32:] = 255
    assert rms_contrast(Image.fromarray(a)) == pytest.approx(0.5)
    assert ContrastFilter(min_contrast=0.5)(Image.fromarray(a)) is None
    assert ContrastFilter()(noise_image(2)) is None


def test_exposure_filter():
    f = ExposureFilter(min_mean=0.1, max_mean=0.9)
    assert "overexposed" in f(Image.new("RGB", (64, 64), (255, 255, 255)))
    assert "underexposed" in f(Image.new("RGB", (64, 64), (5, 5, 5)))
    assert f(noise_image(3)) is None
    half_white = np.full((64, 64), 128, np.uint8)
    half_white[:, :32] = 255
    assert ExposureFilter(max_mean=None, min_mean=None, max_clipped=0.4)(Image.fromarray(half_white)).startswith("overexposed")
    assert ExposureFilter(max_mean=None, min_mean=None, max_clipped=0.6)(Image.fromarray(half_white)) is None


def test_resolution_filter_edges():
    f = ResolutionFilter(min_side=256, max_aspect_ratio=3.0)
    assert f(Image.new("RGB", (256, 256))) is None
    assert "short side 255" in f(Image.new("RGB", (400, 255)))
    assert f(Image.new("RGB", (768, 256))) is None  # exactly 3:1 kept
    assert "aspect" in f(Image.new("RGB", (769, 256)))
    g = ResolutionFilter(min_side=None, min_pixels=100 * 100, max_aspect_ratio=None)
    assert g(Image.new("RGB", (100, 100))) is None
    assert g(Image.new("RGB", (99, 100))) is not None


def test_near_duplicates_tiny_change_caught_different_kept():
    base = noise_image(4)
    tweak = np.asarray(base).copy()
    tweak[10:14, 10:14] = 255  # a few pixels changed
    near = Image.fromarray(tweak)
    rescaled = base.resize((200, 200), Image.BILINEAR).resize((256, 256))
    other = noise_image(5)
    assert hamming_distance(perceptual_hash(base), perceptual_hash(near)) <= 4
    assert hamming_distance(perceptual_hash(base), perceptual_hash(other)) > 10
    reasons = filter_images([base, near, other, rescaled], [DuplicateFilter(max_distance=4)])
    assert reasons[0] == [] and reasons[2] == []
    assert reasons[1] and "near-duplicate of kept image #0" in reasons[1][0]
    assert reasons[3] and "#0" in reasons[3][0]
    # max_distance=-1 keeps everything (nothing is within -1 bits)
    assert filter_images([base, base], [DuplicateFilter(max_distance=-1)]) == [[], []]


def test_duplicate_whose_first_copy_was_rejected_survives():
    big = noise_image(6, (300, 300))
    small = big.resize((100, 100), Image.BICUBIC)  # same picture, too small
    reasons = filter_images([small, big], [ResolutionFilter(min_side=256), DuplicateFilter()])
    assert reasons[0] and reasons[0][0].startswith("resolution")
    assert reasons[1] == []


def test_filter_dataset_report_and_reason_column():
    import datasets

    sharp = noise_image(7)
    rows = {
        "image": [sharp, sharp.filter(ImageFilter.GaussianBlur(5)), Image.new("RGB", (300, 300), (128, 128, 128)),
                  Image.new("RGB", (64, 64), (128, 128, 128)), sharp.copy(), noise_image(8)],
        "prompt": ["a", "b", "c", "d", "e", "f"],
    }
    ds = datasets.Dataset.from_dict(rows, features=datasets.Features(
        {"image": datasets.Image(), "prompt": datasets.Value("string")}))
    kept, report = filter_dataset(ds, default_filters(exposure=None), reason_column="filter_reasons", verbose=False)
    assert kept["prompt"] == ["a", "f"]
    assert kept["filter_reasons"] == [[], []]
    assert report.total == 6 and report.kept == 2 and report.num_dropped == 4
    assert report.dropped_indices == [1, 2, 3, 4]
    # the flat grey small image fails resolution, blur and contrast: all cheap reasons are listed
    assert [r.split(":")[0] for r in report.reasons[3]] == ["resolution", "blur", "contrast"]
    assert report.counts["duplicate"] == 1 and report.counts["blur"] == 3 and report.counts["contrast"] == 2
    assert report.dropped["resolution"] == 1 and sum(report.dropped.values()) == 4
    s = report.summary()
    assert "kept 2/6" in s and "duplicate" in s


def test_filter_dataset_accepts_list_of_rows():
    rows = [{"image": noise_image(9), "id": 1}, {"image": Image.new("RGB", (10, 10)), "id": 2}]
    kept, report = filter_dataset(rows, [ResolutionFilter(min_side=64)], verbose=False)
    assert [r["id"] for r in kept] == [1] and report.counts == {"resolution": 1}


def test_default_filters_overrides():
    fs = default_filters(blur={"min_variance": 5}, exposure=None)
    assert [f.name for f in fs] == ["resolution", "blur", "contrast", "duplicate"]
    assert fs[1].min_variance == 5
    with pytest.raises(ValueError):
        default_filters(nope=None)


def test_extract_quoted_text():
    assert extract_quoted_text('A sign "OPEN" and 「营业中」 and “Sale”') == ["OPEN", "营业中", "Sale"]
    assert extract_quoted_text("no quotes here") == []


def test_ocr_agreement_threshold_with_fake_scorer():
    calls = []

    def scorer(prompts, images, text=None):
        calls.append((prompts, text))
        return [0.75]

    img = Image.new("RGB", (32, 32))
    assert OCRAgreementFilter(min_score=0.75, scorer=scorer)(img, {"prompt": 'a sign "OPEN"'}) is None
    assert "0.750 < 0.8" in OCRAgreementFilter(min_score=0.8, scorer=scorer)(img, {"prompt": 'a sign "OPEN"'})
    assert calls[-1][1] == ["OPEN"]
    # the text column wins over the quotes; no target at all = not a text image = kept without calling OCR
    OCRAgreementFilter(scorer=scorer)(img, {"prompt": 'a sign "OPEN"', "text": "CLOSED"})
    assert calls[-1][1] == ["CLOSED"]
    n = len(calls)
    assert OCRAgreementFilter(scorer=scorer)(img, {"prompt": "a cat"}) is None
    assert len(calls) == n


def test_ocr_agreement_with_real_ocr():
    pytest.importorskip("rapidocr")
    pytest.importorskip("rewards")
    img, meta = render_text_image("新品上市 Sale", "plain", (320, 128), seed=0, text_layout="horizontal",
                                  font_style="sans")
    f = OCRAgreementFilter(min_score=0.8, text_column=None)
    assert f(img, {"prompt": meta["prompt"]}) is None
    assert "OCR agreement" in f(img, {"prompt": 'A poster with the text "旧货清仓 Closed"'})
