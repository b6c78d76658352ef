"""Photos given to Predict: each bad file gets its own clear message, the rest go through, nothing leaves BINSIGHT_HOME."""
import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core import config
from core.data.photos.images import load_image
from core.data.photos.uploads import InputError, folder_inputs, safe_name, stage_uploads, uploads_dir

ROOT = Path(__file__).resolve().parents[1]


def real_jpeg() -> bytes:
    """A real bin photo when ../shared/abid is present, else a demo-set photo."""
    abid = (ROOT / ".." / "shared" / "abid" / "bin-images").resolve()
    if abid.is_dir():
        return sorted(abid.glob("*.jpg"))[0].read_bytes()
    from core.data.layouts.demo import generate_demo

    demo = generate_demo(config.home() / "demo_for_uploads")
    return sorted((demo / "bin-images").glob("*.jpg"))[0].read_bytes()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width=30000, height=30000) -> bytes:
    """A small PNG declaring 30000×30000 pixels: the shape of a decompression bomb."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\0" * (width + 1) * 64)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", rows) + png_chunk(b"IEND", b"")


def animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (60, 40), colour) for colour in ("red", "blue", "green")]
    buffer = io.BytesIO()
    frames[0].save(buffer, fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buffer.getvalue()


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


@pytest.fixture
def photo() -> bytes:
    return real_jpeg()


BAD_FILES = {
    "zero-byte": ("empty.jpg", lambda jpg: b"", "the file is empty (0 bytes)"),
    "truncated JPEG": ("cut.jpg", lambda jpg: jpg[: len(jpg) // 2], "damaged or truncated"),
    "text renamed .jpg": ("notes.jpg", lambda jpg: b"Bin 523: 3 items, recount on Monday\n", "a text file, not a photo"),
    "HTML file": ("bin.jpg.html", lambda jpg: b"<!DOCTYPE html>\n<html><head><title>404</title></head></html>",
                  "an HTML page"),
    "decompression bomb": ("huge.png", lambda jpg: bomb_png(), "decompression bomb"),
    "animated GIF": ("moving.gif", lambda jpg: animated("GIF"), "an animated image"),
    "animated PNG": ("moving.png", lambda jpg: animated("PNG"), "an animated image"),
    "binary junk": ("junk.jpg", lambda jpg: bytes(range(256)) * 8, "not an image"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_each_bad_file_gets_its_own_message_and_the_batch_goes_on(case, photo):
    name, make, expected = BAD_FILES[case]
    staged = stage_uploads([("before.jpg", photo), (name, make(photo)), ("after.jpg", photo)])
    assert [s.name for s in staged] == ["before.jpg", name, "after.jpg"]
    bad = staged[1]
    assert bad.path is None and bad.error.startswith(f"{name}: ") and expected in bad.error
    for good in (staged[0], staged[2]):
        assert good.error is None and Path(good.path).read_bytes() == photo
    # a bad file is never written anywhere
    assert sorted(p.name for p in uploads_dir().rglob("*") if p.is_file()) == ["after.jpg", "before.jpg"]


@pytest.mark.parametrize("hostile", ["../../evil.jpg", "..\\..\\evil.jpg", "/tmp/evil.jpg", "a/../../evil.jpg",
                                     "../", "....//....//evil.jpg", "evil\x00.jpg"])
def test_names_with_separators_or_dotdot_stay_inside_the_upload_folder(hostile, photo, tmp_path, monkeypatch):
    work = tmp_path / "cwd" / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    before = {p for p in tmp_path.rglob("*")}
    [staged] = stage_uploads([(hostile, photo)])
    assert staged.error is None
    target = Path(staged.path).resolve()
    assert target.is_relative_to(uploads_dir().resolve())
    assert "/" not in staged.name and "\\" not in staged.name and ".." not in staged.name
    assert {p for p in tmp_path.rglob("*")} == before  # nothing written next to the working directory
    assert [p.resolve() for p in uploads_dir().rglob("*") if p.is_file()] == [target]


def test_safe_name_keeps_a_readable_name():
    assert safe_name("bin 523.jpg") == "bin 523.jpg"
    assert safe_name("../../x.png") == "x.png"
    assert safe_name("..") == "photo" and safe_name("") == "photo" and safe_name(None) == "photo"
    long = safe_name("a" * 400 + ".jpeg")
    assert len(long) <= 120 and long.endswith(".jpeg")


def test_same_name_twice_in_a_batch_keeps_both(photo):
    staged = stage_uploads([("bin.jpg", photo), ("dir/bin.jpg", photo)])
    assert [s.name for s in staged] == ["bin.jpg", "bin (2).jpg"]
    assert len({s.path for s in staged}) == 2


def test_odd_modes_and_exif_orientation_are_converted(photo):
    base = load_image(photo)
    rgba = base.convert("RGBA")
    rgba.putalpha(128)
    sixteen = Image.fromarray(np.asarray(base.convert("L"), dtype=np.uint16) * 257)
    assert sixteen.mode == "I;16"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    files = [
        ("rgba.png", encoded(rgba, "PNG")),
        ("gray.jpg", encoded(base.convert("L"), "JPEG")),
        ("cmyk.jpg", encoded(base.convert("CMYK"), "JPEG")),
        ("sixteen.png", encoded(sixteen, "PNG")),
        ("rotated.jpg", encoded(base, "JPEG", exif=exif)),
        ("photo.webp", encoded(base, "WEBP")),
        ("photo.bmp", encoded(base, "BMP")),
    ]
    staged = {s.name: s for s in stage_uploads(files)}
    assert all(s.error is None for s in staged.values()), [s.error for s in staged.values()]
    for item in staged.values():
        image = load_image(item.path)
        assert image.mode == "RGB"
    assert load_image(staged["rotated.jpg"].path).size == (base.height, base.width)
    assert load_image(staged["sixteen.png"].path).getextrema()[0][1] > 200  # scaled to 8 bits, not clipped to black


def test_local_folder_reads_in_place_and_flags_cheap_problems(tmp_path, photo):
    folder = tmp_path / "new_bins"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.jpg").write_bytes(photo)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "page.jpg").write_bytes(b"<html><body>Access denied</body></html>")
    (folder / "readme.txt").write_text("not a photo")
    (folder / "sub" / "b.jpg").write_bytes(photo)
    inputs, notes = folder_inputs(folder)
    assert [i.name for i in inputs] == ["a.jpg", "empty.jpg", "page.jpg"]
    assert inputs[0].path == str(folder / "a.jpg") and inputs[0].error is None
    assert "empty (0 bytes)" in inputs[1].error and "HTML page" in inputs[2].error
    assert any("1 files without a photo extension" in n for n in notes)
    deep, _ = folder_inputs(folder, recursive=True)
    assert os.path.join("sub", "b.jpg") in [i.name for i in deep]
    assert not uploads_dir().exists()  # a folder is read where it is, never copied


@pytest.mark.parametrize("given, message", [("", "Give the path"), ("/no/such/folder", "does not exist")])
def test_local_folder_errors(given, message):
    with pytest.raises(InputError, match=message):
        folder_inputs(given)


def test_a_file_instead_of_a_folder(tmp_path, photo):
    (tmp_path / "one.jpg").write_bytes(photo)
    with pytest.raises(InputError, match="is a file, not a folder"):
        folder_inputs(tmp_path / "one.jpg")
