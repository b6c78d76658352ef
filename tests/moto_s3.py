"""A real S3-compatible HTTP server on 127.0.0.1 for tests (moto's server mode), seeded with bin photos.

`S3World` holds the server, a public bucket laid out like aft-vbi-pds, a private bucket needing credentials,
and `Relay`: a TCP relay in front of the server that can be stopped abruptly, cutting open downloads.
"""
from __future__ import annotations

import json
import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

PUBLIC_BUCKET = "aft-vbi-pds"
PRIVATE_BUCKET = "private-bins"  # holds the first 4 seeded photos only
PER_COUNT = 16  # bucket photos per count 1–5


@dataclass
class S3World:
    url: str
    port: int
    source: Path  # the folder the photos were seeded from (ABID layout)
    labels: dict[str, int]  # bucket photo name → count
    server: object = field(repr=False, default=None)

    def file_list(self, target: Path) -> Path:
        """A file_list.json (the Udacity format) naming every seeded photo."""
        listed: dict[str, list[str]] = {}
        for name, count in self.labels.items():
            listed.setdefault(str(count), []).append(f"data/metadata/{Path(name).stem}.json")
        target.write_text(json.dumps(listed))
        return target


def _source_photos(tmp_root: Path) -> tuple[Path, pd.DataFrame]:
    from tests.conftest import ABID

    if (ABID / "bin-images").is_dir():
        return ABID, pd.read_csv(ABID / "labels.csv")
    from core.data.layouts.demo import generate_demo

    folder = generate_demo(tmp_root / "demo_for_s3")
    rows = [{"image": p.stem + ".jpg", "count": json.loads(p.read_text())["EXPECTED_QUANTITY"]}
            for p in sorted((folder / "metadata").glob("*.json"))]
    return folder, pd.DataFrame(rows)


def start_world(tmp_root: Path) -> S3World:
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    admin = boto3.client("s3", endpoint_url=url, region_name="us-east-1",
                         aws_access_key_id="test-admin", aws_secret_access_key="test-admin-secret")
    source, labels = _source_photos(tmp_root)
    chosen = labels[labels["count"].between(1, 5)].groupby("count").head(PER_COUNT)
    for bucket in (PUBLIC_BUCKET, PRIVATE_BUCKET):
        admin.create_bucket(Bucket=bucket)
    # AWS authorizes HeadObject (which downloads ask first, for the size) as s3:GetObject; moto wants s3:HeadObject.
    public_read = {"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Principal": "*", "Action": ["s3:GetObject", "s3:HeadObject", "s3:ListBucket"],
        "Resource": [f"arn:aws:s3:::{PUBLIC_BUCKET}", f"arn:aws:s3:::{PUBLIC_BUCKET}/*"]}]}
    admin.put_bucket_policy(Bucket=PUBLIC_BUCKET, Policy=json.dumps(public_read))
    for i, name in enumerate(chosen["image"]):
        body = (source / "bin-images" / name).read_bytes()
        meta = source / "metadata" / (Path(name).stem + ".json")
        for bucket in (PUBLIC_BUCKET, PRIVATE_BUCKET) if i < 4 else (PUBLIC_BUCKET,):
            admin.put_object(Bucket=bucket, Key=f"bin-images/{name}", Body=body)
            if meta.is_file():
                admin.put_object(Bucket=bucket, Key=f"metadata/{meta.name}", Body=meta.read_bytes())
    labels = {str(n): int(c) for n, c in zip(chosen["image"], chosen["count"])}
    return S3World(url, port, source, labels, server)


class Relay:
    """A TCP relay to the S3 server, slowed down, that can die abruptly like a crashed server.

    `stop()` closes the listening socket (new connections are refused) and every open connection
    (downloads in flight are cut in the middle of their bodies).
    """

    def __init__(self, target_port: int, chunk: int = 4096, delay_s: float = 0.002, cut_after: int | None = None,
                 cuts: int = 0):
        """`cuts` connections (the first ones) are cut after `cut_after` bytes of the server's answer."""
        self.target_port, self.chunk, self.delay_s = target_port, chunk, delay_s
        self.cut_after, self.cuts_left = cut_after, cuts
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.stopped = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self._lock:
                if self.stopped.is_set():
                    client.close(), upstream.close()
                    return
                self._sockets |= {client, upstream}
            limit = None
            if self.cuts_left > 0:
                self.cuts_left -= 1
                limit = self.cut_after
            threading.Thread(target=self._pump, args=(client, upstream, 0), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, self.delay_s, limit), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, delay_s: float, limit: int | None = None) -> None:
        sent = 0
        try:
            while data := src.recv(self.chunk):
                if limit is not None and sent + len(data) >= limit:
                    dst.sendall(data[:limit - sent])
                    break  # the server "dies" in the middle of its answer
                dst.sendall(data)
                sent += len(data)
                if delay_s:
                    time.sleep(delay_s)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def stop(self) -> None:
        self.stopped.set()
        self.listener.close()
        with self._lock:
            for sock in self._sockets:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                    sock.close()
                except OSError:
                    pass


def held_subset(world: S3World, folder: Path, held: dict[int, int]) -> Path:
    """An ABID-layout folder with the first held[c] bucket photos of each count c (so the bucket has more)."""
    import shutil

    (folder / "bin-images").mkdir(parents=True)
    (folder / "metadata").mkdir()
    rows = []
    for count, n in held.items():
        for name in [k for k, c in world.labels.items() if c == count][:n]:
            shutil.copy(world.source / "bin-images" / name, folder / "bin-images" / name)
            meta = world.source / "metadata" / (Path(name).stem + ".json")
            if meta.is_file():
                shutil.copy(meta, folder / "metadata" / meta.name)
            rows.append((name, count))
    pd.DataFrame(rows, columns=["image", "count"]).to_csv(folder / "labels.csv", index=False)
    return folder


_CLOSED: socket.socket | None = None


def closed_port_url() -> str:
    """An http URL on 127.0.0.1 where nothing listens: a port this process holds bound (so no one else can take
    it) without ever listening on it, so connections are refused."""
    global _CLOSED
    if _CLOSED is None:
        _CLOSED = socket.socket()
        _CLOSED.bind(("127.0.0.1", 0))
    return f"http://127.0.0.1:{_CLOSED.getsockname()[1]}"


_WORLD: S3World | None = None


def shared_world(tmp_path_factory) -> S3World:
    """One seeded server per test process (moto's buckets live in the process, so they are shared anyway)."""
    global _WORLD
    if _WORLD is None:
        _WORLD = start_world(tmp_path_factory.mktemp("s3_world"))
    return _WORLD


def public_world(tmp_path_factory, monkeypatch) -> S3World:
    """The shared server, with this test's S3 settings pointing at it, unsigned (the public bucket needs no keys)."""
    world = shared_world(tmp_path_factory)
    monkeypatch.setenv("BINSIGHT_S3_ENDPOINT_URL", world.url)
    monkeypatch.setenv("BINSIGHT_S3_UNSIGNED", "1")
    return world


def stop_shared_world() -> None:
    """Stop the shared server and free the closed port (conftest calls this when the session ends)."""
    global _WORLD, _CLOSED
    if _WORLD is not None:
        _WORLD.server.stop()
        _WORLD = None
    if _CLOSED is not None:
        _CLOSED.close()
        _CLOSED = None
