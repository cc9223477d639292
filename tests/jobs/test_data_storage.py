"""URL safety and resolution: pipe: refused, allowed roots enforced, patterns/prefixes/manifests resolved."""

from __future__ import annotations

import pytest

from jobs.data import storage
from jobs.data.manifest import resolve_shards
from tests.jobs.data_helpers import write_shards


@pytest.mark.parametrize("url", ["pipe:curl -s http://x/a.tar", "PIPE:cat a.tar", "pipe:rm -rf /"])
def test_pipe_urls_are_refused(url: str, tmp_path) -> None:
    with pytest.raises(ValueError, match="pipe:.*not allowed"):
        storage.check_url(url)
    with pytest.raises(ValueError, match="pipe"):
        resolve_shards(url)
    with pytest.raises(ValueError, match="pipe"):
        resolve_shards([str(tmp_path / "a.tar"), url])


def test_pipe_url_inside_a_manifest_is_refused(tmp_path) -> None:
    write_shards(str(tmp_path), [2])
    m = (tmp_path / "manifest.json").read_text().replace('"part-000000.tar"', '"pipe:cat /etc/passwd"')
    (tmp_path / "manifest.json").write_text(m)
    with pytest.raises(ValueError, match="pipe:cat /etc/passwd"):
        resolve_shards(str(tmp_path / "manifest.json"))


def test_unknown_schemes_are_refused() -> None:
    for url in ("ftp://host/a.tar", "ssh://host/a.tar", "memory://a.tar"):
        with pytest.raises(ValueError, match="unsupported scheme"):
            storage.check_url(url)


def test_allowed_roots(tmp_path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    inside = str(root / "x-000000.tar")
    assert storage.check_url(inside, [root]) == inside
    assert storage.check_url("file://" + inside, [root])
    for outside in (str(tmp_path / "other.tar"), str(root / ".." / "other.tar"), "/etc/passwd"):
        with pytest.raises(ValueError, match="outside the allowed data roots"):
            storage.check_url(outside, [root])
    (tmp_path / "evil").symlink_to("/etc")
    with pytest.raises(ValueError, match="outside"):
        storage.check_url(str(root / ".." / "evil" / "passwd"), [root])
    # remote URLs are not local paths and pass the root check
    assert storage.check_url("s3://bucket/a.tar", [root])


def test_resolve_pattern_prefix_and_manifest_agree(tmp_path) -> None:
    write_shards(str(tmp_path), [5, 3, 4])
    by_pattern = resolve_shards(str(tmp_path / "part-{000000..000002}.tar"))
    by_prefix = resolve_shards(str(tmp_path))
    by_manifest = resolve_shards(str(tmp_path / "manifest.json"))
    assert by_pattern.urls == by_prefix.urls == by_manifest.urls
    assert by_pattern.counts == by_prefix.counts == by_manifest.counts == [5, 3, 4]
    sub = resolve_shards(str(tmp_path / "part-{000001..000002}.tar"))
    assert sub.counts == [3, 4]  # counts found in the sibling manifest
    (tmp_path / "manifest.json").unlink()
    assert resolve_shards(str(tmp_path / "part-")).counts is None
    with pytest.raises(FileNotFoundError, match="no shard files"):
        resolve_shards(str(tmp_path / "nothing-"))
    with pytest.raises(ValueError, match="allowed data roots"):
        resolve_shards(str(tmp_path), allowed_roots=[tmp_path / "elsewhere"])


def test_s3_options_from_job_and_environment(monkeypatch) -> None:
    opts = storage.s3_options({"endpoint_url": "http://127.0.0.1:1", "aws_access_key_id": "k",
                               "aws_secret_access_key": "s", "region": "eu-west-1"})
    assert opts == {"endpoint_url": "http://127.0.0.1:1", "key": "k", "secret": "s",
                    "client_kwargs": {"region_name": "eu-west-1"}}
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:2")
    assert storage.s3_options(None) == {"endpoint_url": "http://127.0.0.1:2"}
    assert storage.fs_options("s3://b/x", {"s3": {"key": "a"}, "gs": {"token": "t"}})["key"] == "a"
    assert storage.fs_options("gs://b/x", {"s3": {"key": "a"}, "gs": {"token": "t"}}) == {"token": "t"}
