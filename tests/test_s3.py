"""The S3 source against a real S3-compatible server on 127.0.0.1: listing, fetching, cache, credentials, failures."""
from pathlib import Path

import pytest

from core import config
from core.cli import main as cli_main
from core.data.remote.s3 import S3Error, S3Source, s3_settings
from tests.moto_s3 import PRIVATE_BUCKET, closed_port_url, shared_world


@pytest.fixture
def world(tmp_path_factory):
    return shared_world(tmp_path_factory)


def assert_whole_files(world, paths: dict, keys: list[str]) -> None:
    """Every requested key came back, as a non-empty file identical to the bucket's photo."""
    assert sorted(paths) == sorted(keys)
    for key, path in paths.items():
        expected = (world.source / key).read_bytes()
        assert expected and path.read_bytes() == expected


def names_of(world, count, n):
    return [name for name, c in world.labels.items() if c == count][:n]


def leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".")]


def test_lists_and_fetches_the_public_bucket_unsigned(world):
    source = S3Source(s3_settings(endpoint_url=world.url))
    assert source.settings.anonymous  # the public ABID bucket needs no credentials
    keys = source.list_keys("bin-images/")
    assert sorted(keys) == sorted(f"bin-images/{n}" for n in world.labels)
    assert len(source.list_keys("bin-images/", limit=3)) == 3
    assert "reachable" in source.check()

    wanted = [f"bin-images/{n}" for n in names_of(world, 3, 4)]
    seen = []
    paths = source.fetch(wanted, on_progress=lambda f, text: seen.append(f))
    assert_whole_files(world, paths, wanted)
    assert all(config.home() in path.parents for path in paths.values())  # the cache lives under BINSIGHT_HOME
    assert seen[-1] == pytest.approx(1.0) and seen == sorted(seen)


def test_a_cache_hit_needs_no_server(world, relay, tmp_path_factory):
    relay = relay(world.port, delay_s=0)
    cache = tmp_path_factory.mktemp("cache")
    keys = [f"bin-images/{n}" for n in names_of(world, 1, 3)]
    first = S3Source(s3_settings(endpoint_url=relay.url), cache_dir=cache).fetch(keys)
    assert_whole_files(world, first, keys)
    stamps = {k: p.stat().st_mtime_ns for k, p in first.items()}
    relay.stop()
    offline = S3Source(s3_settings(endpoint_url=relay.url), cache_dir=cache, attempts=1)
    progress = []
    again = offline.fetch(keys, on_progress=lambda f, text: progress.append(text))
    assert again == first and {k: p.stat().st_mtime_ns for k, p in again.items()} == stamps
    assert progress == ["3 of 3 files already cached"]
    with pytest.raises(S3Error, match="cannot reach"):
        offline.fetch(keys + [f"bin-images/{names_of(world, 1, 4)[-1]}"])


def test_private_bucket_needs_credentials_from_the_environment(world, monkeypatch):
    config.save_settings(s3={"bucket": PRIVATE_BUCKET, "endpoint_url": closed_port_url()})
    monkeypatch.setenv("BINSIGHT_S3_ENDPOINT_URL", world.url)  # the environment overrides settings.json
    key = f"bin-images/{next(iter(world.labels))}"  # the private bucket holds the first 4 photos
    with pytest.raises(S3Error, match="access denied.*BINSIGHT_S3_ACCESS_KEY_ID"):
        S3Source(s3_settings(unsigned=True), attempts=1).fetch([key])
    monkeypatch.setenv("BINSIGHT_S3_ACCESS_KEY_ID", "reader")
    monkeypatch.setenv("BINSIGHT_S3_SECRET_ACCESS_KEY", "reader-secret")
    settings = s3_settings()
    assert settings.bucket == PRIVATE_BUCKET and not settings.anonymous
    assert "reader-secret" not in repr(settings) and "reader-secret" not in str(settings.public_dict())
    assert_whole_files(world, S3Source(settings).fetch([key]), [key])


def test_missing_keys_bad_endpoints_and_unreachable_servers_are_explained(world):
    source = S3Source(s3_settings(endpoint_url=world.url), attempts=1)
    with pytest.raises(S3Error, match="bin-images/nope.jpg is not in s3://aft-vbi-pds"):
        source.fetch(["bin-images/nope.jpg"])
    assert source.fetch(["metadata/nope.json"], missing_ok=True) == {"metadata/nope.json": None}
    with pytest.raises(S3Error, match="does not exist"):
        S3Source(s3_settings(endpoint_url=world.url, bucket="no-such-bucket", unsigned=True), attempts=1).check()
    with pytest.raises(S3Error, match="must look like http"):
        s3_settings(endpoint_url="127.0.0.1:9000")
    down = S3Source(s3_settings(endpoint_url=closed_port_url()), attempts=1)
    with pytest.raises(S3Error, match="cannot reach the S3 server"):
        down.check()
    with pytest.raises(S3Error, match="cannot reach the S3 server.*0 of 2 files"):
        down.fetch([f"bin-images/{n}" for n in names_of(world, 4, 2)])
    assert not down.cache_dir.exists() or not any(down.cache_dir.rglob("*"))


def test_server_stopped_mid_download_leaves_no_partial_file(world, relay, tmp_path_factory):
    relay = relay(world.port, chunk=2048, delay_s=0.003)  # slow enough that downloads are in flight
    cache = tmp_path_factory.mktemp("cache")
    source = S3Source(s3_settings(endpoint_url=relay.url), cache_dir=cache, workers=4, attempts=2)
    keys = [f"bin-images/{n}" for n in world.labels]

    def stop_after_three(fraction, text):
        if text.startswith("Downloaded 3 "):
            relay.stop()

    with pytest.raises(S3Error) as failure:
        source.fetch(keys, on_progress=stop_after_three)
    message = str(failure.value)
    assert "Download failed" in message and "nothing partial was kept" in message
    assert "cannot reach" in message or "broke while downloading" in message
    saved = sorted(p for p in cache.rglob("*") if p.is_file())
    assert 3 <= len(saved) < len(keys)
    assert not leftovers(cache)
    assert_whole_files(world, {p.relative_to(cache).as_posix(): p for p in saved},  # every file in the cache is whole
                       [p.relative_to(cache).as_posix() for p in saved])

    # Run it again against the server: only the rest is downloaded.
    progress = []
    resumed = S3Source(s3_settings(endpoint_url=world.url), cache_dir=cache).fetch(
        keys, on_progress=lambda f, text: progress.append(text))
    assert progress[0] == f"{len(saved)} of {len(keys)} files already cached"
    assert_whole_files(world, resumed, keys)


def test_a_body_cut_midway_is_retried_and_reported_when_it_keeps_failing(world, relay, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    first, second = [f"bin-images/{n}" for n in names_of(world, 5, 2)]
    once = relay(world.port, delay_s=0, cut_after=3000, cuts=1)  # the first answer breaks off after 3 kB
    fetched = S3Source(s3_settings(endpoint_url=once.url), cache_dir=cache, workers=1, attempts=2).fetch([first])
    assert_whole_files(world, fetched, [first])

    always = relay(world.port, delay_s=0, cut_after=3000, cuts=100)
    with pytest.raises(S3Error, match="broke while downloading bin-images/"):
        S3Source(s3_settings(endpoint_url=always.url), cache_dir=cache, workers=1, attempts=2).fetch([second])
    assert sorted(p.name for p in cache.rglob("*") if p.is_file()) == [Path(first).name]


def test_fetch_dataset_makes_an_abid_folder_that_indexes(world, tmp_path):
    from core.data.layouts.registry import load_dataset

    photos = {n: world.labels[n] for c in (1, 3, 5) for n in names_of(world, c, 2)}
    folder = S3Source(s3_settings(endpoint_url=world.url)).fetch_dataset(photos, tmp_path / "fetched")
    assert sorted(p.name for p in (folder / "bin-images").iterdir()) == sorted(photos)
    assert not leftovers(folder)
    frame = load_dataset(folder).frame.set_index("name")
    assert frame["count"].to_dict() == photos
    assert frame["path"].notna().all()


def test_cli_fetch_from_a_file_list_and_its_errors(world, tmp_path, capsys):
    file_list = world.file_list(tmp_path / "file_list.json")
    target = tmp_path / "subset"
    code = cli_main(["fetch", "--list", str(file_list), "--per-class", "2", "--to", str(target),
                     "--endpoint-url", world.url, "--quiet"])
    assert code == 0
    fetched = sorted(p.name for p in (target / "bin-images").iterdir())
    assert set(fetched) <= set(world.labels)
    assert sorted(world.labels[name] for name in fetched) == [c for c in (1, 2, 3, 4, 5) for _ in range(2)]
    assert "10 photos" in capsys.readouterr().out

    assert cli_main(["fetch", "--ls", "--limit", "4", "--endpoint-url", world.url]) == 0
    assert len(capsys.readouterr().out.split()) == 4

    code = cli_main(["fetch", "00001.jpg", "--to", str(tmp_path / "x"), "--endpoint-url", closed_port_url(),
                     "--quiet"])
    assert code == 1 and "cannot reach the S3 server" in capsys.readouterr().err
    assert not (tmp_path / "x" / "bin-images").exists()
    assert cli_main(["fetch", "--to", str(tmp_path / "y"), "--endpoint-url", "nonsense"]) == 2
