"""qwen_image.images.to_rgb: every image mode a user's folder may hold becomes the RGB picture it shows."""

import io

import numpy as np
import pytest
from PIL import Image

from qwen_image.images import to_rgb


def roundtrip(img: Image.Image, fmt: str = "PNG", **save) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    return Image.open(io.BytesIO(buf.getvalue()))


def test_16_bit_greyscale_png_is_scaled_not_clipped_to_white():
    ramp = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    img = roundtrip(Image.fromarray(ramp))  # a real 16-bit PNG
    assert img.mode.startswith("I")
    out = np.asarray(to_rgb(img))
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert out[0, 0, 0] == 0 and out[-1, -1, 0] == 255
    assert abs(float(out.mean()) - 127.5) < 2  # a ramp, not white (plain convert("RGB") gives ~255 everywhere)
    assert abs(int(out[32, 0, 0]) - round(ramp[32, 0] / 257)) <= 1


def test_32_bit_integer_mode_uses_the_16_bit_range():
    arr = np.full((8, 8), 32896, dtype=np.int32)  # mid-grey in 16-bit units
    out = np.asarray(to_rgb(Image.fromarray(arr, mode="I")))
    assert (out == 128).all()


def test_float_mode_in_zero_one():
    out = np.asarray(to_rgb(Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32), mode="F")))
    assert (out == 128).all()


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_transparent_pixels_become_white(mode):
    colour = (10, 200, 30, 0) if mode == "RGBA" else (40, 0)
    img = roundtrip(Image.new(mode, (8, 8), colour))
    out = np.asarray(to_rgb(img))
    assert (out == 255).all()


def test_half_transparent_pixels_are_composited():
    out = np.asarray(to_rgb(Image.new("RGBA", (4, 4), (0, 0, 0, 128))))
    assert (abs(out.astype(int) - 127) <= 1).all()


def test_palette_with_transparency_and_without():
    base = Image.new("RGB", (8, 8), (200, 10, 10))
    pal = roundtrip(base.convert("P", palette=Image.Palette.ADAPTIVE))
    assert pal.mode == "P"
    assert tuple(np.asarray(to_rgb(pal))[0, 0]) == (200, 10, 10)
    transparent = Image.new("P", (4, 4), 0)
    transparent.putpalette([0, 0, 0] * 256)
    transparent.info["transparency"] = 0
    transparent = roundtrip(transparent)
    assert (np.asarray(to_rgb(transparent)) == 255).all()


def test_cmyk_jpeg():
    img = roundtrip(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=95)
    assert img.mode == "CMYK"
    r, g, b = np.asarray(to_rgb(img))[4, 4].tolist()
    assert r > 200 and g < 60 and b < 60  # red


def test_exif_rotation_is_applied():
    img = Image.new("RGB", (20, 10), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 5, 10))  # a red left edge
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    stored = roundtrip(img, "JPEG", exif=exif, quality=95)
    out = to_rgb(stored)
    assert out.size == (10, 20)  # upright: portrait
    top = np.asarray(out)[1, 5]
    assert top[0] > 200 and top[2] < 60  # the red edge is now at the top


def test_rgb_and_greyscale_pass_through():
    rgb = Image.new("RGB", (3, 3), (1, 2, 3))
    assert to_rgb(rgb).getpixel((0, 0)) == (1, 2, 3)
    assert to_rgb(Image.new("L", (3, 3), 77)).getpixel((0, 0)) == (77, 77, 77)
    assert to_rgb(Image.new("1", (3, 3), 1)).getpixel((0, 0)) == (255, 255, 255)


def test_training_and_datatools_readers_use_it():
    """SFT/DPO encoding (center_crop_resize) and the datatools loader both see the 16-bit ramp, not white."""
    from align.data.encoding import center_crop_resize
    from align.datatools.filtering import load_image

    ramp = (np.linspace(0, 65535, 32 * 32).reshape(32, 32)).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, format="PNG")
    for out in (center_crop_resize(Image.open(io.BytesIO(buf.getvalue())), 16, 16),
                load_image({"bytes": buf.getvalue(), "path": None})):
        assert out.mode == "RGB" and float(np.asarray(out).mean()) < 200
