"""What a request hands the service: photo bytes or s3:// URIs, turned into model input or a clear message."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from core.data.photos.images import ImageError, load_image
from core.data.photos.uploads import photo_problem, safe_name
from core.models.preprocess import eval_transform

IMAGE_TYPES = {"image/jpeg", "image/png", "application/x-image", "image/webp", "image/bmp"}
JSON_TYPE = "application/json"
MAX_URIS = 256
S3_URI = re.compile(r"^s3://([A-Za-z0-9.\-_]{3,63})/(.+)$")


class BadInput(ValueError):
    """A request body that cannot be used; the message is the one the Predict page would show."""


class PhotoReader:
    """Decodes photos into the normalised C×H×W arrays a model's meta asks for."""

    def __init__(self, meta: dict):
        self.transform = eval_transform(meta)

    def array(self, data: bytes, name: str = "photo") -> np.ndarray:
        """The photo as model input, or BadInput with the Predict page's message (one decode when it is good)."""
        try:
            image = load_image(data, name)
        except ImageError as exc:
            raise BadInput(photo_problem(data, name) or str(exc)) from None
        return self.transform(image).numpy()


def uri_list(body: bytes) -> list[str]:
    """The s3:// URIs of a JSON body: a list, or {"uris": [...]}."""
    import json

    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadInput(f"the body is not valid JSON ({exc})") from None
    if isinstance(value, dict):
        value = value.get("uris", value.get("s3_uris"))
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise BadInput('expected a JSON list of s3:// URIs, e.g. ["s3://bucket/bin-images/523.jpg"] '
                       'or {"uris": [...]}')
    if len(value) > MAX_URIS:
        raise BadInput(f"{len(value)} URIs in one request; at most {MAX_URIS} are accepted")
    return value


def fetch_s3(uris: list[str], sources: dict | None = None) -> dict[str, Path | str]:
    """uri → local path of the downloaded photo, or the message saying why it cannot be had."""
    from core.data.remote.s3 import S3Error, S3Source, s3_settings

    found: dict[str, Path | str] = {}
    by_bucket: dict[str, list[str]] = {}
    for uri in uris:
        match = S3_URI.match(uri.strip())
        if not match:
            found[uri] = f"{uri!r} is not an S3 URI: expected s3://bucket/key.jpg"
        else:
            by_bucket.setdefault(match.group(1), []).append(uri)
    for bucket, bucket_uris in by_bucket.items():
        keys = {uri: S3_URI.match(uri.strip()).group(2) for uri in bucket_uris}
        try:
            source = (sources or {}).get(bucket) or S3Source(s3_settings(bucket=bucket))
            paths = source.fetch(list(keys.values()), missing_ok=True)
        except S3Error as exc:
            found.update({uri: str(exc) for uri in bucket_uris})
            continue
        for uri, key in keys.items():
            path = paths.get(key)
            found[uri] = path if path is not None else f"{safe_name(key)}: not in s3://{bucket}"
    return found
