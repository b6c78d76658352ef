"""Where a shard set lives — a folder or s3://bucket/prefix — and its index file, shards.json."""
from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

from core import config
from core.data.dataset import DatasetError
from core.files import atomic_write_bytes

INDEX_NAME = "shards.json"
INDEX_FORMAT = "binsight-shards/1"
# tarfile reads a stream 10 KB at a time; through one large buffer a shard costs a few big reads instead
# (from a bucket each small read of the HTTP body is a round through urllib3 — bench/shards_speed.py measures it)
READ_BUFFER = 4 * 1024 * 1024


class ShardError(DatasetError):
    """A shard set that cannot be written or read as asked; the message names the shard and what to do."""


# -- where a shard set lives ---------------------------------------------------------------------------

class ShardStore:
    """A folder of shards, local or in a bucket: read and write small files, publish finished shards, stream shards."""

    location: str

    def read_bytes(self, name: str) -> bytes | None:
        raise NotImplementedError

    def write_bytes(self, name: str, data: bytes) -> None:
        raise NotImplementedError

    def publish(self, staged: Path, name: str) -> None:
        """Make the finished file `staged` the shard `name` (all at once), and remove `staged`."""
        raise NotImplementedError

    def open(self, name: str):
        """A readable binary stream of the shard `name`."""
        raise NotImplementedError

    def staging_dir(self) -> Path:
        raise NotImplementedError

    def read_index(self) -> dict | None:
        data = self.read_bytes(INDEX_NAME)
        if data is None:
            return None
        try:
            index = json.loads(data)
        except ValueError as exc:
            raise ShardError(f"{self.location}/{INDEX_NAME} is not valid JSON ({exc})") from None
        if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
            raise ShardError(f"{self.location}/{INDEX_NAME} is not a Binsight shard index")
        return index

    def write_index(self, index: dict) -> None:
        self.write_bytes(INDEX_NAME, json.dumps(index, separators=(",", ":")).encode())


class LocalStore(ShardStore):
    def __init__(self, folder: str | Path):
        self.folder = Path(folder).expanduser()
        self.location = str(self.folder)

    def read_bytes(self, name):
        try:
            return (self.folder / name).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ShardError(f"{self.folder / name} cannot be read ({exc})") from None

    def write_bytes(self, name, data):
        atomic_write_bytes(self.folder / name, data)

    def publish(self, staged, name):
        os.replace(staged, self.folder / name)  # staged in the same folder: the rename is atomic

    def open(self, name):
        try:
            return open(self.folder / name, "rb", buffering=READ_BUFFER)
        except OSError as exc:
            raise ShardError(f"shard {name} cannot be opened in {self.folder} ({exc})") from None

    def staging_dir(self):
        self.folder.mkdir(parents=True, exist_ok=True)
        return self.folder


class S3Store(ShardStore):
    """s3://bucket/prefix on the configured endpoint, with the configured credentials."""

    def __init__(self, url: str, settings=None):
        from core.data.remote.s3 import S3Source, s3_settings

        bucket, _, prefix = url[len("s3://"):].partition("/")
        if not bucket:
            raise ShardError(f"{url!r}: expected s3://bucket/prefix")
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.location = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self.source = S3Source(settings or s3_settings(bucket=bucket))
        self._clients: dict[int, object] = {}

    @property
    def client(self):
        """One client per process: DataLoader workers are forked, and a client's connections must not be shared."""
        pid = os.getpid()
        if pid not in self._clients:
            self._clients[pid] = self.source._make_client()
        return self._clients[pid]

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def read_bytes(self, name):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=self.key(name))["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in {"NoSuchKey", "404", "NotFound"}:
                return None
            raise ShardError(f"cannot read {self.location}/{name}: {self.source._explain(exc, name)}") from None
        except BotoCoreError as exc:
            raise ShardError(f"cannot read {self.location}/{name}: {self.source._explain(exc, name)}") from None

    def write_bytes(self, name, data):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.put_object(Bucket=self.bucket, Key=self.key(name), Body=data)
        except (BotoCoreError, ClientError) as exc:
            raise ShardError(f"cannot write {self.location}/{name}: {self.source._explain(exc, name)}") from None

    def publish(self, staged, name):
        from botocore.exceptions import BotoCoreError, ClientError

        try:  # an object appears only when its upload completes
            self.client.upload_file(str(staged), self.bucket, self.key(name))
        except (BotoCoreError, ClientError) as exc:
            raise ShardError(f"cannot upload {name} to {self.location}: {self.source._explain(exc, name)}") from None
        Path(staged).unlink(missing_ok=True)

    def open(self, name):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self.key(name))["Body"]
        except (BotoCoreError, ClientError) as exc:
            raise ShardError(f"shard {name} cannot be opened in {self.location}: "
                             f"{self.source._explain(exc, name)}") from None
        return io.BufferedReader(body, buffer_size=READ_BUFFER)

    def staging_dir(self):
        folder = config.home() / "shards-staging" / hashlib.sha1(self.location.encode()).hexdigest()[:12]
        folder.mkdir(parents=True, exist_ok=True)
        return folder


def is_shard_source(source: str | Path) -> bool:
    text = str(source)
    if text.startswith("s3://"):
        return True
    path = Path(text).expanduser()
    return path.name == INDEX_NAME or (path.is_dir() and (path / INDEX_NAME).is_file())


def open_store(source: str | Path) -> ShardStore:
    """The store of a shard set: s3://bucket/prefix, a folder, or the shards.json inside one."""
    text = str(source)
    if text.startswith("s3://"):
        return S3Store(text)
    path = Path(text).expanduser()
    return LocalStore(path.parent if path.name == INDEX_NAME else path)


def read_complete_index(store: ShardStore) -> dict:
    index = store.read_index()
    if index is None:
        raise ShardError(f"{store.location} holds no {INDEX_NAME}: pack a dataset there with `python -m core shards`")
    problem = index_problem(index)
    if problem:
        raise ShardError(f"{store.location}/{INDEX_NAME} is damaged ({problem}): pack the dataset again")
    if not index.get("complete"):
        raise ShardError(f"{store.location}/{INDEX_NAME}: packing is not finished ({len(index['shards'])} shards "
                         "so far); run the same `python -m core shards` command again to resume it")
    return index


def _is_text(value) -> bool:
    return isinstance(value, str) and bool(value)


def index_problem(index: dict) -> str | None:
    """What makes a shard index unusable (a hand edit, a damaged copy), or None when every part readers use is sound."""
    from core.data.classes import ClassRange

    shards, skipped = index.get("shards"), index.get("skipped", [])
    if not isinstance(shards, list) or not all(isinstance(shard, dict) for shard in shards):
        return "'shards' is not a list of shards"
    for number, shard in enumerate(shards, start=1):
        photos = shard.get("photos")
        if not (_is_text(shard.get("name")) and "/" not in shard["name"] and _is_text(shard.get("split"))):
            return f"shard {number} has no usable name and split"
        if not isinstance(shard.get("samples"), int) or not isinstance(photos, list):
            return f"shard {shard['name']} has no list of photos"
        for photo in photos:
            if not (isinstance(photo, list) and len(photo) == 3 and _is_text(photo[0]) and _is_text(photo[1])
                    and isinstance(photo[2], int) and not isinstance(photo[2], bool) and 0 <= photo[2] < 2**31):
                return f"shard {shard['name']} lists {str(photo)[:60]} instead of [key, name, count]"
    if not isinstance(skipped, list) or not all(isinstance(entry, dict) and "split" in entry and "name" in entry
                                                for entry in skipped):
        return "'skipped' is not a list of photos left out"
    if not isinstance(index.get("seed"), int) or not isinstance(index.get("fingerprint"), str):
        return "no seed or fingerprint"
    try:
        usable = ClassRange.from_dict(index.get("class_range")).hi <= 1000
    except (TypeError, ValueError, AttributeError, OverflowError):
        usable = False
    if not usable:
        return f"class range {str(index.get('class_range'))[:60]} is not a range of counts"
    return None
