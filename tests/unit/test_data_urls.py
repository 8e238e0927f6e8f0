import pytest

from clipkit.data.urls import expand_urls
from clipkit.errors import ClipkitConfigError


def _touch(tmp_path, names):
    for name in names:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")


def test_braces_expand_in_order(tmp_path):
    _touch(tmp_path, [f"{i:03d}.tar" for i in range(3)])
    assert expand_urls(f"{tmp_path}/{{000..002}}.tar") == [f"{tmp_path}/{i:03d}.tar" for i in range(3)]


def test_double_colon_joins_sources(tmp_path):
    _touch(tmp_path, ["a/0.tar", "a/1.tar", "b/00.tar"])
    spec = f"{tmp_path}/a/{{0..1}}.tar::{tmp_path}/b/{{00..00}}.tar"
    assert expand_urls(spec) == [f"{tmp_path}/a/0.tar", f"{tmp_path}/a/1.tar", f"{tmp_path}/b/00.tar"]
    assert expand_urls([f"{tmp_path}/a/0.tar", f"{tmp_path}/b/00.tar"]) == [
        f"{tmp_path}/a/0.tar", f"{tmp_path}/b/00.tar"]


def test_missing_local_shards_are_named_in_one_line(tmp_path):
    _touch(tmp_path, ["0.tar"])
    spec = f"{tmp_path}/{{0..3}}.tar"
    with pytest.raises(ClipkitConfigError) as info:
        expand_urls(spec)
    assert str(info.value) == f"shard not found: {tmp_path}/1.tar (and 2 more missing) in '{spec}'"
    assert "\n" not in str(info.value)


def test_pipe_and_remote_urls_pass_unchecked():
    urls = expand_urls("pipe:aws s3 cp s3://bucket/{0..1}.tar -::https://host/x.tar")
    assert urls == ["pipe:aws s3 cp s3://bucket/0.tar -", "pipe:aws s3 cp s3://bucket/1.tar -", "https://host/x.tar"]


def test_empty_spec_is_an_error():
    with pytest.raises(ClipkitConfigError):
        expand_urls("")
