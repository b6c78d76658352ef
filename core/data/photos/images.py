"""Opening bin photos safely: EXIF orientation, any mode to RGB, and a clear error for bad files."""
from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from core.errors import BinsightError

SUPPORTED_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
SUPPORTED_FORMATS = {"JPEG", "MPO", "PNG", "WEBP", "BMP"}
# A bin photo is under 1,100 px a side; anything past this many pixels, or this long a side (a 1×39,000,000 strip
# is under MAX_PIXELS and took a gigabyte to open), is refused as a decompression bomb.
MAX_PIXELS = 40_000_000
MAX_SIDE = 20_000


class ImageError(BinsightError):
    """A photo that cannot be used, with a message fit for the person who gave it."""


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        top = array.max() or 1.0
        image = Image.fromarray((array * (255.0 / top)).clip(0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def load_image(source: str | Path | bytes, name: str | None = None) -> Image.Image:
    """The photo as an upright RGB image, or ImageError saying why it cannot be read."""
    label = name or (Path(source).name if not isinstance(source, bytes) else "photo")
    if isinstance(source, bytes):
        if not source:
            raise ImageError(f"{label}: the file is empty (0 bytes)")
        handle = io.BytesIO(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise ImageError(f"{label}: no such file")
        if path.stat().st_size == 0:
            raise ImageError(f"{label}: the file is empty (0 bytes)")
        handle = path
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(handle) as image:
                width, height = image.size
                if width * height > MAX_PIXELS or max(width, height) > MAX_SIDE:
                    raise ImageError(
                        f"{label}: {width}×{height} pixels is far larger than a bin photo; refused as a possible decompression bomb"
                    )
                if getattr(image, "is_animated", False):
                    raise ImageError(f"{label}: an animated image, not a bin photo")
                if image.format not in SUPPORTED_FORMATS:
                    raise ImageError(f"{label}: {image.format} files are not supported (JPEG, PNG, WebP or BMP expected)")
                image.load()
                image = ImageOps.exif_transpose(image)
                return _to_rgb(image)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"{label}: far larger than a bin photo; refused as a possible decompression bomb") from None
    except UnidentifiedImageError:
        raise ImageError(f"{label}: not an image (JPEG, PNG, WebP or BMP expected)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{label}: the image is damaged or truncated: {exc}") from None


def unreadable_name(name: str) -> str | None:
    """Why a file's name cannot be shown or stored (bytes that are not UTF-8, e.g. from an old zip), or None."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return f"{shown_name(name)}: the file name is not valid UTF-8; rename the file to use it"
    return None


def shown_name(name: str) -> str:
    """The name as it can be shown: bytes that are not UTF-8 become �."""
    return os.fsencode(name).decode("utf-8", "replace")


def image_size(path: str | Path) -> tuple[int, int] | None:
    """(width, height) read from the header only, or None when the file is not a readable image."""
    try:
        with Image.open(path) as image:
            return image.size
    except Exception:
        return None


def thumbnail(path: str | Path, width: int = 240, height: int = 180) -> bytes:
    """A JPEG of the photo letterboxed into width×height, so a grid of bins lines up."""
    image = load_image(path)
    boxed = ImageOps.pad(image, (width, height), color=(240, 240, 240))
    buffer = io.BytesIO()
    boxed.save(buffer, "JPEG", quality=80)
    return buffer.getvalue()
