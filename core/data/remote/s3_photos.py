"""Photos handed to Predict as an s3:// URI (one key, or every photo under a prefix), fetched into the S3 cache."""
from __future__ import annotations

import re
from pathlib import Path

from core.data.labels import abid
from core.data.photos.images import SUPPORTED_SUFFIXES
from core.data.photos.uploads import InputError, PhotoInput, file_problem, safe_name
from core.data.remote.s3 import S3Error, S3Source, s3_settings


def s3_inputs(uri: str, limit: int = 200, on_progress=None, source=None) -> tuple[list[PhotoInput], list[str]]:
    """The photos at an s3:// URI (one key, or every photo under a prefix), fetched into the cache under BINSIGHT_HOME."""
    match = re.match(r"^s3://([A-Za-z0-9.\-_]{3,63})(?:/(.*))?$", uri.strip())
    if not match:
        raise InputError(f"{uri!r} is not an S3 URI: expected s3://bucket/key.jpg or s3://bucket/prefix/")
    bucket, key = match.group(1), match.group(2) or ""
    try:
        source = source or S3Source(s3_settings(bucket=bucket))
        if Path(key).suffix.lower() in SUPPORTED_SUFFIXES:
            keys, notes = [key], []
        else:
            prefix = key or abid.IMAGE_PREFIX
            listed = source.list_keys(prefix, limit=limit * 2)
            keys = [k for k in listed if Path(k).suffix.lower() in SUPPORTED_SUFFIXES][:limit]
            notes = [f"Only the first {limit:,} photos under {prefix} are predicted."] if len(keys) == limit else []
            if not keys:
                raise InputError(f"s3://{bucket}/{prefix} holds no photos (JPEG, PNG, WebP or BMP).")
        paths = source.fetch(keys, on_progress=on_progress, missing_ok=True)
    except S3Error as exc:
        raise InputError(str(exc)) from None
    inputs = []
    for key in keys:
        name = safe_name(key)
        path = paths.get(key)
        if path is None:
            inputs.append(PhotoInput(name, error=f"{name}: not in s3://{bucket}", source="s3"))
            continue
        problem = file_problem(Path(path), name)
        inputs.append(PhotoInput(name, path=None if problem else str(path), error=problem, source="s3"))
    return inputs, notes
