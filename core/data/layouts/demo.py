"""The embedded demo dataset: synthetic bin photos drawn in code, written in the ABID bucket layout; read when no source is set."""
from __future__ import annotations

import io
import random
import shutil
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

from core import config
from core.data.classes import ClassRange
from core.data.dataset import Dataset
from core.data.layouts.abid_folder import ABID_FOLDER
from core.data.layouts.base import Layout
from core.files import atomic_write_bytes, atomic_write_json, atomic_write_text

DEMO_VERSION = 1
# Photos per count: classes 1–5 like the study, plus a few empty and over-full bins.
DEMO_COUNTS = {0: 8, 1: 60, 2: 60, 3: 45, 4: 60, 5: 60, 6: 10, 7: 8, 8: 6, 10: 4}
PRODUCTS = [
    ("USB-C Braided Cable 6 ft", 0.2), ("Stainless Water Bottle", 0.9), ("Paperback Novel", 0.6),
    ("Oil Filter", 0.3), ("Phone Case", 0.1), ("Kitchen Sponge 3-pack", 0.2), ("LED Bulb", 0.15),
    ("Dog Chew Toy", 0.4), ("Notebook A5", 0.5), ("Bluetooth Speaker", 0.8), ("Vitamin D3 Gummies", 0.3),
    ("Yoga Strap", 0.3), ("Screwdriver Set", 1.1), ("Sunscreen SPF 50", 0.4), ("Board Game Cards", 0.5),
]
PALETTE = [(200, 60, 50), (40, 110, 190), (235, 190, 60), (60, 150, 80), (150, 80, 170),
           (230, 130, 40), (30, 30, 30), (240, 240, 235), (120, 80, 50), (90, 190, 200)]


def _draw_bin(rng: random.Random, n_objects: int, size=(400, 300)) -> Image.Image:
    width, height = size
    base = rng.randint(150, 200)
    image = Image.new("RGB", size, (base, base - 10, base - 30))
    draw = ImageDraw.Draw(image)
    # the bin's frame and the strap across it, as in fulfilment-centre photos
    draw.rectangle([0, 0, width - 1, height - 1], outline=(60, 60, 60), width=14)
    strap_y = rng.randint(height // 3, 2 * height // 3)
    draw.rectangle([0, strap_y, width, strap_y + 6], fill=(20, 20, 20))
    placed = []
    for _ in range(n_objects):
        for _attempt in range(30):
            w, h = rng.randint(40, 90), rng.randint(30, 75)
            x, y = rng.randint(16, width - w - 16), rng.randint(16, height - h - 16)
            box = (x, y, x + w, y + h)
            if all(box[2] < b[0] or box[0] > b[2] or box[3] < b[1] or box[1] > b[3] for b in placed):
                break
        placed.append(box)
        colour = rng.choice(PALETTE)
        if rng.random() < 0.5:
            draw.rectangle(box, fill=colour, outline=(20, 20, 20), width=2)
        else:
            draw.ellipse(box, fill=colour, outline=(20, 20, 20), width=2)
        draw.line([box[0] + 4, box[1] + 6, box[2] - 4, box[1] + 6], fill=(250, 250, 250), width=2)
    return image.filter(ImageFilter.GaussianBlur(0.8))


def _items(rng: random.Random, count: int) -> dict:
    items, left = {}, count
    while left > 0:
        quantity = min(left, rng.choice([1, 1, 1, 2, 3]))
        name, weight = rng.choice(PRODUCTS)
        asin = "B0" + "".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ0123456789") for _ in range(8))
        items[asin] = {
            "asin": asin, "name": name, "normalizedName": name, "quantity": quantity,
            "length": {"unit": "IN", "value": round(rng.uniform(2, 12), 2)},
            "width": {"unit": "IN", "value": round(rng.uniform(1, 8), 2)},
            "height": {"unit": "IN", "value": round(rng.uniform(0.5, 5), 2)},
            "weight": {"unit": "pounds", "value": weight},
        }
        left -= quantity
    return items


def generate_demo(folder: Path, seed: int = 7, counts: dict[int, int] | None = None, on_progress=None) -> Path:
    """Write the synthetic set into `folder` (bin-images/, metadata/), reporting progress as (fraction, text)."""
    rng = random.Random(seed)
    plan = [c for c, n in sorted((counts or DEMO_COUNTS).items()) for _ in range(n)]
    rng.shuffle(plan)
    for i, count in enumerate(plan):
        name = "%05d" % (i + 1)
        buffer = io.BytesIO()
        _draw_bin(rng, count).save(buffer, "JPEG", quality=85)
        atomic_write_bytes(folder / "bin-images" / f"{name}.jpg", buffer.getvalue())
        metadata = {"BIN_FCSKU_DATA": _items(rng, count), "EXPECTED_QUANTITY": count}
        atomic_write_json(folder / "metadata" / f"{name}.json", metadata)
        if on_progress and (i % 10 == 0 or i == len(plan) - 1):
            on_progress((i + 1) / len(plan), f"Drawing demo bins {i + 1}/{len(plan)}")
    return folder


def ensure_demo(on_progress=None) -> Path:
    """The demo set under BINSIGHT_HOME, generated once (a half-written set is redone)."""
    folder = config.demo_dir()
    marker = folder / ".complete"
    if marker.is_file() and marker.read_text().strip() == str(DEMO_VERSION):
        return folder
    staging = folder.with_name("demo.partial")
    shutil.rmtree(staging, ignore_errors=True)
    generate_demo(staging, on_progress=on_progress)
    atomic_write_text(staging / ".complete", str(DEMO_VERSION))
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    return folder


class Demo(Layout):
    """No source at all: the demo set, generated once under BINSIGHT_HOME and read as an ABID folder."""

    name = ABID_FOLDER.name

    def detect(self, source) -> bool:
        return source is None

    def fingerprint(self, source, stamps: dict | None = None) -> str:
        return ABID_FOLDER.fingerprint(ensure_demo(), stamps)

    def index(self, source, on_progress=None):
        return ABID_FOLDER.index(ensure_demo(on_progress), on_progress)

    def open(self, source, class_range: ClassRange, on_progress=None) -> Dataset:
        return ABID_FOLDER.open(ensure_demo(on_progress), class_range, on_progress)


DEMO = Demo()
