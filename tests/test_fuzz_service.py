"""The prediction service under generated input: schemathesis from its own OpenAPI schema, generated photos (cut,
mislabelled, huge, empty, CMYK, 16-bit, animated, EXIF-rotated) and generated headers. Every answer is 2xx, or 4xx
with a message; never a 5xx, never a hang, and the server stays up."""
from __future__ import annotations

import io
import json
import logging
import socket
import struct
import zlib
from collections import Counter

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from core.data.photos.uploads import photo_problem
from tests.test_serve import small_model

MAX_BODY = 512 * 1024
FUZZ = settings(derandomize=True, deadline=None, database=None, print_blob=True,
                suppress_health_check=list(HealthCheck))
REQUEST_TIMEOUT_S = 30  # far above any answer of this small model; a request that takes longer is a hang


def closed_port() -> int:
    """A local port nobody listens on: s3:// URIs in generated bodies fail fast instead of reaching the internet."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from core.serving.server import BackgroundServer

    model = small_model(tmp_path_factory.mktemp("fuzz_serve"))
    with BackgroundServer(model, max_batch=8, window_ms=2, max_body_bytes=MAX_BODY) as running:
        yield running


@pytest.fixture
def client(server, monkeypatch):
    monkeypatch.setenv("BINSIGHT_S3_ENDPOINT_URL", f"http://127.0.0.1:{closed_port()}")
    with httpx.Client(base_url=server.url, timeout=REQUEST_TIMEOUT_S) as http:
        yield http
    answer = httpx.get(f"{server.url}/ping", timeout=REQUEST_TIMEOUT_S)
    assert answer.status_code == 200, "the server went down"
    assert server.service.batcher._thread.is_alive(), "the batching thread died"


def assert_well_answered(status: int, headers, body: bytes, what) -> dict:
    """2xx, or 4xx with a JSON message and the request id; never a 5xx."""
    assert status < 500, (what, status, body[:300])
    assert headers.get("x-request-id"), what
    if status >= 400:
        answer = httpx.Response(status, content=body).json()
        message = answer.get("error") or answer.get("detail")
        assert message, (what, status, body[:300])
        return answer
    return httpx.Response(status, content=body).json() if body else {}


# -- the schema, fuzzed by schemathesis ------------------------------------------------------------------

def fuzz_schema(url: str, examples: int) -> Counter:
    """schemathesis' positive and negative cases for every operation of the service's schema; (method, status) counts."""
    import schemathesis
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    cases = schema.as_strategy(GenerationMode.POSITIVE) | schema.as_strategy(GenerationMode.NEGATIVE)
    statuses: Counter = Counter()

    @settings(FUZZ, max_examples=examples)
    @given(case=cases)
    def exchange(case):
        # the answer's status, content type and body as the schema documents them (errors included), and no 5xx
        response = case.call_and_validate(base_url=url, timeout=REQUEST_TIMEOUT_S, checks=[
            not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance])
        statuses[(case.method, response.status_code)] += 1
        assert_well_answered(response.status_code, response.headers, response.content,
                             (case.method, case.path, case.media_type, repr(case.body)[:200]))

    exchange()
    return statuses


def test_schemathesis_positive_and_negative_cases_never_get_a_server_error(server, client):
    statuses = fuzz_schema(server.url, 50)
    print("schemathesis:", dict(statuses))
    assert sum(statuses.values()) >= 30 and any(status == 200 for _, status in statuses)
    assert any(status >= 400 for _, status in statuses), "negative cases should be refused"


# -- generated photos ------------------------------------------------------------------------------------

def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def declared_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width × height pixels (the shape of a decompression bomb)."""
    rows = zlib.compress(b"\0" * 1024)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + png_chunk(b"IDAT", rows) + png_chunk(b"IEND", b""))


def encode(mode: str, size: tuple[int, int], fmt: str, frames: int, orientation: int | None, seed: int) -> bytes:
    """A photo of this mode, size and format (converted where the format cannot hold the mode)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    base = Image.fromarray(pixels, "RGB")
    if mode == "I;16":
        image = Image.fromarray(np.asarray(base.convert("L"), dtype=np.uint16) * 257)
    else:
        image = base.convert(mode)
    options = {}
    if orientation:
        exif = Image.Exif()
        exif[0x0112] = orientation
        options["exif"] = exif
    if frames > 1 and fmt in ("GIF", "PNG", "WEBP"):
        options.update(save_all=True, append_images=[image.rotate(90 * i) for i in range(1, frames)], duration=50)
    buffer = io.BytesIO()
    try:
        image.save(buffer, fmt, **options)
    except (OSError, ValueError, KeyError):
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, fmt, **{k: v for k, v in options.items() if k == "exif"})
    return buffer.getvalue()


photos = st.builds(encode, st.sampled_from(["RGB", "L", "CMYK", "I;16", "RGBA", "P", "1", "LA"]),
                   st.tuples(st.integers(1, 80), st.integers(1, 80)),
                   st.sampled_from(["JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"]), st.sampled_from([1, 1, 1, 3]),
                   st.none() | st.integers(1, 8), st.integers(0, 2**16))
MAGICS = [b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"RIFF\0\0\0\0WEBP", b"BM", b"GIF89a", b"%PDF-1.4", b"PK\x03\x04"]


@st.composite
def damaged(draw, photo: bytes) -> bytes:
    """The photo cut short, with bytes flipped, behind another format's magic, or replaced by junk."""
    how = draw(st.sampled_from(["as is", "cut", "flipped", "wrong magic", "junk", "empty"]))
    if how == "cut":
        return photo[: draw(st.integers(0, max(0, len(photo) - 1)))]
    if how == "flipped":
        data = bytearray(photo)
        for _ in range(draw(st.integers(1, 6))):
            data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
        return bytes(data)
    if how == "wrong magic":
        magic = draw(st.sampled_from(MAGICS))
        return magic + photo[len(magic):]
    if how == "junk":
        return draw(st.binary(max_size=300))
    if how == "empty":
        return b""
    return photo


images = st.one_of(photos.flatmap(damaged), st.builds(declared_png, st.integers(1, 2**31 - 1), st.integers(1, 2**31 - 1)),
                   st.builds(declared_png, st.just(9000), st.just(9000)),
                   # thin strips: few pixels in all, each side enormous
                   st.tuples(st.integers(1, 4), st.integers(30_000, 39_000_000)).map(
                       lambda sides: declared_png(*sides) if sides[0] % 2 else declared_png(*reversed(sides))))


def fuzz_photos(url: str, examples: int) -> Counter:
    """Generated photos posted one by one: a count exactly when the Predict page would take the file, else its message."""
    kinds: Counter = Counter()

    @settings(FUZZ, max_examples=examples)
    @given(data=images, kind=st.sampled_from(["image/jpeg", "image/png", "application/x-image", "image/webp"]))
    def exchange(data, kind):
        answer = httpx.post(f"{url}/invocations", content=data, headers={"content-type": kind},
                            timeout=REQUEST_TIMEOUT_S)
        body = assert_well_answered(answer.status_code, answer.headers, answer.content, data[:40])
        problem = photo_problem(data, "photo")
        if problem is None:
            assert answer.status_code == 200, (data[:40], answer.text)
            assert body["count"] in range(1, 6) and abs(sum(body["probabilities"].values()) - 1) < 1e-4
            kinds["counted"] += 1
        else:
            assert answer.status_code == 400 and body["error"] == problem, (data[:40], answer.text)
            kinds["refused"] += 1

    exchange()
    return kinds


def test_generated_photos_get_a_count_or_the_upload_pages_message(server, client):
    kinds = fuzz_photos(server.url, 60)
    print("generated photos:", dict(kinds))
    assert kinds["counted"] >= 10 and kinds["refused"] >= 10


# -- generated headers, content types and JSON bodies --------------------------------------------------------

header_text = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40)
content_types = st.one_of(st.sampled_from(["image/jpeg", "IMAGE/PNG; charset=binary", "application/json",
                                           "application/json; charset=utf-16", "multipart/form-data; boundary=x",
                                           "text/plain", "", ";", "image/", "application/x-image;;;"]), header_text)
s3_uris = st.from_regex(r"s3://[a-z0-9.\-]{3,12}/[ -~]{0,30}", fullmatch=True)
json_bodies = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30) | s3_uris,
                           lambda inner: st.lists(inner, max_size=5) | st.dictionaries(
                               st.sampled_from(["uris", "s3_uris", "x"]), inner, max_size=2), max_leaves=8)


def raw_exchange(port: int, method: str, path: str, headers: list[tuple[str, str]], body: bytes, short: bool):
    """One request written by hand (a client library refuses a lying content-length) on its own connection; a
    `short` body (less than its declared length) is followed by hanging up, as a client that gives up would.
    (status, headers, body) of the answer, or None when the server closed the connection unanswered."""
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"] + [f"{k}: {v}" for k, v in headers]
    with socket.create_connection(("127.0.0.1", port), timeout=REQUEST_TIMEOUT_S) as connection:
        connection.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        received = b""
        if short:
            connection.settimeout(0.2)
            try:
                received = connection.recv(65536)
            except TimeoutError:
                connection.shutdown(socket.SHUT_WR)  # the server waits for the rest of the body: give up on it
            connection.settimeout(REQUEST_TIMEOUT_S)
        try:
            while chunk := connection.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
    if not received:
        return None
    head, _, content = received.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    answer_headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in header_lines)}
    return int(status_line.split()[1]), answer_headers, content


def fuzz_headers(port: int, examples: int) -> Counter:
    """Hand-written requests with generated methods, paths, content types, request ids, lengths and bodies."""
    statuses: Counter = Counter()
    good = encode("RGB", (40, 30), "JPEG", 1, None, 0)

    @settings(FUZZ, max_examples=examples)
    @given(kind=st.sampled_from(["image/jpeg", "application/json"]) | st.none() | content_types,
           request_id=st.none() | header_text,
           body=st.one_of(st.just(good), st.binary(max_size=200), json_bodies.map(lambda v: json.dumps(v).encode()),
                          st.lists(s3_uris, min_size=1, max_size=3).map(lambda v: json.dumps(v).encode())),
           declared=st.none() | st.sampled_from(["0", "5", "-1", "abc", str(MAX_BODY * 4), "99999999999999999999"]),
           chunked=st.booleans(), method=st.sampled_from(["POST", "POST", "POST", "GET", "PUT"]),
           path=st.sampled_from(["/invocations"] * 4
                                + ["/ping", "/model", "/invocations/", "/%2e%2e/x", "/invocations?x=1"]))
    def exchange(kind, request_id, body, declared, chunked, method, path):
        headers = [("Content-Type", kind)] if kind is not None else []
        if request_id is not None:
            headers.append(("X-Request-Id", request_id))
        if chunked and declared is None:
            headers.append(("Transfer-Encoding", "chunked"))
            body = (f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n") if body else b"0\r\n\r\n"
        else:
            headers.append(("Content-Length", declared if declared is not None else str(len(body))))
        short = declared is not None and declared.isdigit() and int(declared) > len(body)
        answer = raw_exchange(port, method, path, headers, body, short)
        if answer is None:  # only a client that hung up mid-body goes unanswered
            assert short, (method, path, headers)
            statuses["hung up"] += 1
            return
        status, answer_headers, content = answer
        statuses[status] += 1
        assert status < 500, (method, path, headers, content[:300])
        if 400 <= status < 500 and answer_headers.get("x-request-id"):  # the app answered (not uvicorn's parser)
            answered = json.loads(content)
            assert answered.get("error") or answered.get("detail"), content[:300]
            if "request_id" in answered:
                assert answered["request_id"] == answer_headers["x-request-id"]
        if status == 200 and path.startswith("/invocations") and method == "POST":
            answered = json.loads(content)
            assert "count" in answered or all("error" in row or "count" in row for row in answered["results"])

    exchange()
    return statuses


def test_generated_headers_and_bodies_never_get_a_server_error(server, client, caplog):
    statuses = fuzz_headers(server.port, 70)
    print("generated headers:", dict(statuses))
    failed = [r.getMessage() for r in caplog.records if r.name == "binsight.serve" and r.levelno >= logging.ERROR]
    assert not failed, failed  # a client's mistake is not logged as an internal error
    assert statuses[200] >= 5 and sum(n for s, n in statuses.items() if isinstance(s, int) and 400 <= s < 500) >= 20
