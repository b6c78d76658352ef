"""The S3 photo source: bucket keys fetched in parallel into a local content cache, atomically, with retries."""
from __future__ import annotations

import csv
import io
import os
import re
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field, fields
from pathlib import Path, PurePosixPath

from core import config, storage
from core.data.labels import abid
from core.errors import BinsightError
from core.files import atomic_write_text

ENV_VARS = {
    "bucket": "BINSIGHT_S3_BUCKET",
    "endpoint_url": "BINSIGHT_S3_ENDPOINT_URL",
    "region": "BINSIGHT_S3_REGION",
    "access_key_id": "BINSIGHT_S3_ACCESS_KEY_ID",
    "secret_access_key": "BINSIGHT_S3_SECRET_ACCESS_KEY",
    "session_token": "BINSIGHT_S3_SESSION_TOKEN",
    "unsigned": "BINSIGHT_S3_UNSIGNED",
}
SETTINGS_KEY = "s3"
DEFAULT_WORKERS = 8
DEFAULT_ATTEMPTS = 3


class S3Error(BinsightError):
    """A bucket that cannot be reached or read; the message says what failed and what to check."""


@dataclass(frozen=True)
class S3Settings:
    """Where the photos are: bucket, optional endpoint (S3-compatible stores) and credentials."""

    bucket: str = abid.BUCKET
    endpoint_url: str | None = None
    region: str = "us-east-1"
    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    unsigned: bool | None = None

    @property
    def anonymous(self) -> bool:
        """Unsigned requests: when asked, else for the public ABID bucket when no credentials are given."""
        if self.unsigned is not None:
            return self.unsigned
        return not self.access_key_id and self.bucket == abid.BUCKET

    def describe(self) -> str:
        where = self.endpoint_url or "AWS"
        return f"s3://{self.bucket} at {where}" + (" (unsigned)" if self.anonymous else "")

    def public_dict(self) -> dict:
        """The settings without secrets, for settings.json, manifests and logs."""
        return {"bucket": self.bucket, "endpoint_url": self.endpoint_url, "region": self.region,
                "unsigned": self.unsigned}


def _flag(value) -> bool | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() in {"1", "true", "yes", "on"}


def s3_settings(**overrides) -> S3Settings:
    """Settings from, in rising priority: defaults, settings.json ("s3"), BINSIGHT_S3_* variables, arguments."""
    chosen: dict = {}
    stored = config.load_settings().get(SETTINGS_KEY) or {}
    names = {f.name for f in fields(S3Settings)}
    for name in names:
        for value in (stored.get(name), os.environ.get(ENV_VARS[name]), overrides.get(name)):
            if value is not None and value != "":
                chosen[name] = value
    if "unsigned" in chosen:
        chosen["unsigned"] = _flag(chosen["unsigned"])
    problem = endpoint_problem(chosen.get("endpoint_url"))
    if problem:
        raise S3Error(problem)
    return S3Settings(**chosen)


def endpoint_problem(endpoint: str | None) -> str | None:
    """Why `endpoint` is not a usable endpoint URL, or None (empty means AWS itself)."""
    if endpoint and not re.match(r"^https?://[^/\s]+", endpoint):
        return f"endpoint URL {endpoint!r} must look like http://host:port or https://host"
    return None


def save_s3_settings(settings: S3Settings) -> None:
    """Persist bucket, endpoint, region and the unsigned flag (credentials stay in the environment)."""
    stored = config.load_settings().get(SETTINGS_KEY) or {}
    config.save_settings(**{SETTINGS_KEY: {**stored, **settings.public_dict()}})


def cache_root() -> Path:
    return config.home() / "s3-cache"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "_", text).strip("_") or "_"


def safe_key(key: str) -> PurePosixPath:
    path = PurePosixPath(key)
    if not key or path.is_absolute() or ".." in path.parts:
        raise S3Error(f"{key!r} is not a usable object key")
    return path


def place_file(source: Path, target: Path) -> Path:
    """Put `source` at `target` atomically: a hard link when the filesystem allows, else a copy."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(source, tmp)
        except OSError:
            with open(source, "rb") as src, open(tmp, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
                dst.flush()
                os.fsync(dst.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}


class _Missing(Exception):
    """The key is not in the bucket."""


class S3Source:
    """One bucket: listing, and `fetch(keys)` into a content cache under BINSIGHT_HOME."""

    def __init__(self, settings: S3Settings | None = None, cache_dir: Path | None = None,
                 workers: int = DEFAULT_WORKERS, attempts: int = DEFAULT_ATTEMPTS, timeout_s: float = 20):
        self.settings = settings or s3_settings()
        where = _slug(self.settings.endpoint_url.split("://", 1)[-1]) if self.settings.endpoint_url else "aws"
        self.cache_dir = Path(cache_dir) if cache_dir else cache_root() / where / _slug(self.settings.bucket)
        self.workers = max(1, int(workers))
        self.attempts = max(1, int(attempts))
        self.timeout_s = timeout_s
        self._client = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"S3Source({self.settings.describe()})"

    @property
    def client(self):
        with self._lock:
            if self._client is None:
                self._client = self._make_client()
            return self._client

    def _make_client(self):
        import boto3
        from botocore import UNSIGNED
        from botocore.config import Config

        settings = self.settings
        options = dict(retries={"max_attempts": self.attempts, "mode": "standard"}, connect_timeout=self.timeout_s,
                       read_timeout=self.timeout_s, max_pool_connections=max(10, self.workers))
        if settings.anonymous:
            options["signature_version"] = UNSIGNED
        credentials = {}
        if settings.access_key_id and not settings.anonymous:
            credentials = {"aws_access_key_id": settings.access_key_id,
                           "aws_secret_access_key": settings.secret_access_key,
                           "aws_session_token": settings.session_token}
        try:
            return boto3.session.Session().client("s3", endpoint_url=settings.endpoint_url, region_name=settings.region,
                                                  config=Config(**options), **credentials)
        except ValueError as exc:  # e.g. a malformed endpoint URL
            raise S3Error(f"cannot use {settings.describe()}: {exc}") from None

    # -- errors ---------------------------------------------------------------------------------------

    def _explain(self, exc: Exception, key: str | None = None) -> str:
        from botocore import exceptions as bx
        from s3transfer.exceptions import RetriesExceededError

        where = self.settings.describe()
        if isinstance(exc, RetriesExceededError) and exc.last_exception is not None:
            exc = exc.last_exception  # s3transfer gave up on a body that kept breaking off: say why it broke
        if isinstance(exc, bx.ClientError):
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in {"NoSuchBucket"}:
                return f"bucket {self.settings.bucket!r} does not exist at {self.settings.endpoint_url or 'AWS'}"
            if code in _MISSING_CODES:
                return f"{key} is not in {where}"
            denied = {"AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch"}
            if code in denied or status == 403:
                hint = ("this bucket needs credentials: set BINSIGHT_S3_ACCESS_KEY_ID and BINSIGHT_S3_SECRET_ACCESS_KEY"
                        if self.settings.anonymous else "check the access key, the secret and the bucket's permissions")
                return f"access denied to {where} ({code}): {hint}"
            return f"{where} answered {code or status}: {error.get('Message', exc)}"
        if isinstance(exc, bx.NoCredentialsError):
            return (f"no credentials for {where}: set BINSIGHT_S3_ACCESS_KEY_ID and BINSIGHT_S3_SECRET_ACCESS_KEY "
                    "(or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY), or use an unsigned public bucket")
        if isinstance(exc, (bx.EndpointConnectionError, bx.ConnectTimeoutError)):
            return f"cannot reach the S3 server of {where} ({exc}): check the endpoint URL and the network"
        if isinstance(exc, (bx.ReadTimeoutError, bx.ConnectionClosedError, bx.ResponseStreamingError,
                            bx.IncompleteReadError)):
            return f"the connection to {where} broke while downloading {key or 'data'} ({exc})"
        return f"{where}: {type(exc).__name__}: {exc}"

    # -- listing --------------------------------------------------------------------------------------

    def list_keys(self, prefix: str = abid.IMAGE_PREFIX, limit: int | None = None) -> list[str]:
        """Object keys under `prefix` (at most `limit`), in the bucket's order."""
        from botocore.exceptions import BotoCoreError, ClientError

        keys: list[str] = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.settings.bucket, Prefix=prefix,
                PaginationConfig={"MaxItems": limit} if limit else {})
            for page in pages:
                keys += [item["Key"] for item in page.get("Contents", [])]
                if limit and len(keys) >= limit:
                    break
        except (BotoCoreError, ClientError) as exc:
            raise S3Error(f"cannot list {prefix} — {self._explain(exc)}") from None
        return keys[:limit] if limit else keys

    def check(self) -> str:
        """One small listing request; returns a line for the user or raises S3Error saying what is wrong."""
        found = self.list_keys(abid.IMAGE_PREFIX, limit=1)
        return f"{self.settings.describe()} is reachable" + ("" if found else f" but has no {abid.IMAGE_PREFIX} photos")

    # -- fetching -------------------------------------------------------------------------------------

    def cache_path(self, key: str) -> Path:
        return self.cache_dir.joinpath(*safe_key(key).parts)

    def cached(self, key: str) -> Path | None:
        path = self.cache_path(key)
        return path if path.is_file() else None

    def _download(self, key: str, stop: threading.Event) -> Path:
        """Download one key into the cache through a temporary file renamed into place, so no partial file is left.

        botocore retries failed requests, s3transfer a body that breaks off midway; each up to `attempts` times.
        """
        from boto3.s3.transfer import TransferConfig
        from botocore import exceptions as bx

        if stop.is_set():
            raise _Cancelled()
        path = self.cache_path(key)
        # The temporary file sits at the cache's top, so a failed download leaves no empty folders behind either.
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.cache_dir, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                self.client.download_fileobj(
                    self.settings.bucket, key, handle,
                    Config=TransferConfig(num_download_attempts=self.attempts, use_threads=False))
                handle.flush()
                os.fsync(handle.fileno())
            path.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, path)
        except BaseException as exc:
            Path(tmp).unlink(missing_ok=True)
            if isinstance(exc, bx.ClientError) and exc.response.get("Error", {}).get("Code") in _MISSING_CODES:
                raise _Missing(key) from None
            raise
        return path

    def fetch(self, keys, on_progress=None, missing_ok: bool = False) -> dict[str, Path | None]:
        """Local paths of `keys`, downloading the ones not cached yet in parallel.

        `on_progress(fraction, text)` is called from the calling thread. A key absent from the bucket raises
        S3Error (or maps to None with `missing_ok`). Any other failure stops the batch and raises S3Error;
        completed files stay cached, and no partial file is ever left behind.
        """
        keys = list(dict.fromkeys(keys))
        result: dict[str, Path | None] = {}
        todo = []
        for key in keys:
            hit = self.cached(key)
            if hit:
                storage.touch(hit)  # used: the least recently used files go first when the cache is over its cap
                result[key] = hit
            else:
                todo.append(key)
        total, cached = len(keys), len(result)
        if on_progress:
            on_progress(cached / total if total else 1.0, f"{cached:,} of {total:,} files already cached")
        if not todo:
            return result
        self.client  # a bad configuration fails here, once, rather than in every worker
        stop = threading.Event()
        failure: tuple[str, Exception] | None = None
        done = 0
        with ThreadPoolExecutor(max_workers=min(self.workers, len(todo)), thread_name_prefix="s3-fetch") as pool:
            futures = {pool.submit(self._download, key, stop): key for key in todo}
            for future in as_completed(futures):
                key = futures[future]
                try:
                    result[key] = future.result()
                except _Cancelled:
                    continue
                except _Missing:
                    if not missing_ok and failure is None:
                        failure = (key, S3Error(f"{key} is not in {self.settings.describe()}"))
                        stop.set()
                    result[key] = None
                except Exception as exc:  # noqa: BLE001 — any failure stops the batch and is explained below
                    if failure is None:
                        failure = (key, exc)
                        stop.set()
                    continue
                done += 1
                if on_progress and failure is None:
                    on_progress((cached + done) / total, f"Downloaded {cached + done:,} of {total:,} files "
                                                         f"from {self.settings.describe()}")
        storage.prune_after_write("s3-cache")  # what was fetched just now is recent, so it stays
        if failure is not None:
            key, exc = failure
            saved = sum(1 for k in keys if result.get(k) is not None)
            reason = str(exc) if isinstance(exc, S3Error) else self._explain(exc, key)
            raise S3Error(f"Download failed: {reason}. {saved:,} of {total:,} files are complete in the cache "
                          "(nothing partial was kept); run it again to fetch the rest.")
        return {key: result.get(key) for key in keys}

    def fetch_dataset(self, photos, folder: Path, with_metadata: bool = True, on_progress=None) -> Path:
        """Make `folder` an ABID-layout dataset of these bucket photos: bin-images/, metadata/, labels.csv.

        `photos` is a list of image names or a {name: count} mapping (counts go to labels.csv, which the
        index uses when a photo has no metadata). Files come from the cache, downloaded when missing.
        """
        counts = dict(photos) if isinstance(photos, dict) else {name: None for name in photos}
        names = list(counts)
        image_keys = [abid.image_key(name) for name in names]
        meta_keys = [abid.metadata_key(name) for name in names] if with_metadata else []
        # metadata is optional (labels.csv covers photos without it), so absent keys are allowed here
        paths = self.fetch(image_keys + meta_keys, on_progress=on_progress, missing_ok=True)
        absent = [key for key in image_keys if paths[key] is None]
        if absent:
            raise S3Error(f"{len(absent):,} photos are not in {self.settings.describe()}: "
                          + ", ".join(absent[:5]) + (" …" if len(absent) > 5 else ""))
        folder = Path(folder)
        for key in image_keys + meta_keys:
            if paths[key] is not None:
                place_file(paths[key], folder / key)
        write_labels(folder, {n: c for n, c in counts.items() if c is not None})
        return folder


class _Cancelled(Exception):
    """Skipped because another download in the batch already failed."""


def write_labels(folder: Path, counts: dict[str, int]) -> None:
    """Merge image,count rows into folder/labels.csv (new counts win); nothing is written when empty."""
    if not counts:
        return
    labels = {}
    if (folder / "labels.csv").is_file():
        labels, _problems = abid.read_labels_csv(folder / "labels.csv")
    labels.update({name: int(count) for name, count in counts.items()})
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["image", "count"])
    writer.writerows(sorted(labels.items()))
    atomic_write_text(folder / "labels.csv", buffer.getvalue())
