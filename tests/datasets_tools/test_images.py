"""Header reading and RGB decoding: EXIF orientation, unusual modes, broken files."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from datasets_tools.errors import DatasetError
from datasets_tools.folder import collect_images
from datasets_tools.images import ImageError, load_rgb, read_header


def _exif_rotated_jpeg(path, orientation=6):
    # Stored landscape 40x20: left half red, right half blue; orientation 6 = "rotate 90 CW to view".
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.save(path, quality=95, exif=exif)


def test_exif_orientation_swaps_size_and_pixels(tmp_path):
    p = tmp_path / "rot.jpg"
    _exif_rotated_jpeg(p)
    h = read_header(p)
    assert (h.width, h.height, h.orientation, h.format) == (20, 40, 6, "JPEG")
    img = load_rgb(p)
    assert img.size == (20, 40) and img.mode == "RGB"
    # Rotating 90 CW puts the stored left (red) half on top.
    top, bottom = img.getpixel((10, 5)), img.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60
    assert bottom[2] > 200 and bottom[0] < 60


def test_png_with_exif_orientation(tmp_path):
    p = tmp_path / "rot.png"
    img = Image.new("RGB", (30, 10), (0, 255, 0))
    exif = Image.Exif()
    exif[0x0112] = 8
    img.save(p, exif=exif)
    assert (read_header(p).width, read_header(p).height) == (10, 30)
    assert load_rgb(p).size == (10, 30)


def test_grayscale_and_bilevel(tmp_path):
    Image.new("L", (8, 6), 77).save(tmp_path / "g.png")
    Image.new("1", (8, 6), 1).save(tmp_path / "b.bmp")
    assert load_rgb(tmp_path / "g.png").getpixel((0, 0)) == (77, 77, 77)
    assert load_rgb(tmp_path / "b.bmp").getpixel((0, 0)) == (255, 255, 255)


def test_rgba_composited_on_white(tmp_path):
    img = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    img.putpixel((0, 0), (255, 0, 0, 255))
    img.save(tmp_path / "a.png")
    out = load_rgb(tmp_path / "a.png")
    assert out.getpixel((0, 0)) == (255, 0, 0)
    assert out.getpixel((3, 3)) == (255, 255, 255)
    Image.new("LA", (4, 4), (0, 0)).save(tmp_path / "la.png")
    assert load_rgb(tmp_path / "la.png").getpixel((1, 1)) == (255, 255, 255)


def test_palette_with_transparency(tmp_path):
    img = Image.new("P", (4, 4), 0)
    img.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    img.putpixel((1, 1), 1)
    img.info["transparency"] = 0
    img.save(tmp_path / "p.gif", transparency=0)
    out = load_rgb(tmp_path / "p.gif")
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 1)) == (0, 255, 0)
    plain = Image.new("P", (4, 4), 1)
    plain.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    plain.save(tmp_path / "p.png")
    assert load_rgb(tmp_path / "p.png").getpixel((0, 0)) == (10, 20, 30)


def test_cmyk(tmp_path):
    Image.new("CMYK", (6, 6), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=100)
    assert read_header(tmp_path / "c.jpg").mode == "CMYK"
    r, g, b = load_rgb(tmp_path / "c.jpg").getpixel((3, 3))
    assert r > 200 and g < 60 and b < 60


def test_16bit_scaled_not_clipped(tmp_path):
    arr = np.array([[0, 32896, 65535]], dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "d.png")
    assert Image.open(tmp_path / "d.png").mode == "I;16"
    out = load_rgb(tmp_path / "d.png")
    assert [out.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_32bit_int_and_float_modes(tmp_path):
    Image.fromarray(np.array([[0, 65535]], dtype=np.int32), "I").save(tmp_path / "i.tif")
    out = load_rgb(tmp_path / "i.tif")
    assert [out.getpixel((x, 0))[0] for x in range(2)] == [0, 255]
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), "F").save(tmp_path / "f.tif")
    out = load_rgb(tmp_path / "f.tif")
    assert [out.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def _jpeg_bytes():
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buf, "JPEG")
    return buf.getvalue()


@pytest.mark.parametrize("name,content,reason", [
    ("empty.png", b"", "empty"),
    ("text.jpg", b"this is not an image at all", "not an image"),
    ("cut.jpg", None, "truncated"),
    ("cut.png", "png", "truncated"),
])
def test_broken_files_raise_image_error(tmp_path, name, content, reason):
    if content is None:
        content = _jpeg_bytes()[:400]
    elif content == "png":
        buf = io.BytesIO()
        Image.effect_noise((64, 64), 50).save(buf, "PNG")
        content = buf.getvalue()[:300]
    p = tmp_path / name
    p.write_bytes(content)
    with pytest.raises(ImageError) as ei:
        if reason == "truncated":
            read_header(p)  # header may still parse; the decode must fail
        load_rgb(p)
    assert ei.value.reason == reason
    assert isinstance(ei.value, DatasetError)
    assert name in str(ei.value) and "\n" not in str(ei.value)


def test_header_cut_short_is_truncated(tmp_path):
    p = tmp_path / "h.png"
    p.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    with pytest.raises(ImageError) as ei:
        read_header(p)
    assert ei.value.reason == "truncated"


def test_missing_file_is_unreadable(tmp_path):
    with pytest.raises(ImageError) as ei:
        read_header(tmp_path / "nope.png")
    assert ei.value.reason == "unreadable"


def test_collect_images_captions_repeats_and_problems(tmp_path):
    (tmp_path / "10_zxq" / "sub").mkdir(parents=True)
    (tmp_path / "plain").mkdir()
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".lorastudio_cache").mkdir()
    Image.new("RGB", (64, 32)).save(tmp_path / "10_zxq" / "sub" / "a.png")
    (tmp_path / "10_zxq" / "sub" / "a.txt").write_text("  zxq, cat \n", encoding="utf-8")
    Image.new("RGB", (32, 64)).save(tmp_path / "plain" / "b.jpg")
    (tmp_path / "plain" / "b.txt").write_text("", encoding="utf-8")
    Image.new("RGB", (16, 16)).save(tmp_path / "c.webp")  # no caption
    Image.new("RGB", (16, 16)).save(tmp_path / ".hidden" / "x.png")
    Image.new("RGB", (16, 16)).save(tmp_path / ".lorastudio_cache" / "y.png")
    (tmp_path / "broken.png").write_bytes(b"")
    (tmp_path / "orphan.txt").write_text("lonely")
    (tmp_path / "._c.jpg").write_bytes(b"\x00\x05\x16\x07")  # macOS resource fork
    items, problems = collect_images(tmp_path, default_caption="zxq", default_repeats=2)
    by_name = {i.path.name: i for i in items}
    assert [i.path.name for i in items] == ["a.png", "c.webp", "b.jpg"]  # sorted by path: 10_zxq, c.webp, plain
    a, b, c = by_name["a.png"], by_name["b.jpg"], by_name["c.webp"]
    assert (a.caption, a.has_caption, a.repeats, a.subset, a.width, a.height) == ("zxq, cat", True, 10, "10_zxq", 64, 32)
    assert (b.caption, b.has_caption, b.repeats, b.subset) == ("", True, 2, "plain")
    assert (c.caption, c.has_caption, c.repeats, c.subset) == ("zxq", False, 2, ".")
    kinds = {(p.kind, p.path.rsplit("/", 1)[-1]) for p in problems}
    assert kinds == {("missing_caption", "c.webp"), ("empty", "broken.png"), ("caption_without_image", "orphan.txt")}


def test_collect_images_missing_folder(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        collect_images(tmp_path / "nope")
