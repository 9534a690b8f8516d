"""The real download code against synthetic mirrors: a folder, file:// and a local
HTTP server that can be made to fail in every way a public mirror can."""

from __future__ import annotations

import gzip
import socket
import threading
from pathlib import Path

import pytest
from conftest import committed_params_text

import download
from pipeline.errors import PipelineError


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_folder_mirror_writes_verified_decompressed_files(
    tmp_path: Path, synthetic_mirror: Path, synthetic_files: dict, synthetic_checksums: dict
) -> None:
    out = tmp_path / "raw"
    download.download_all([str(synthetic_mirror)], out, 5, synthetic_checksums)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == synthetic_files


def test_file_url_mirror(tmp_path: Path, synthetic_mirror: Path, synthetic_checksums: dict) -> None:
    out = tmp_path / "raw"
    download.download_all([synthetic_mirror.as_uri()], out, 5, synthetic_checksums)
    assert sorted(p.name for p in out.iterdir()) == sorted(synthetic_checksums)


@pytest.mark.parametrize("mode", ["ok", "samehost", "badlength"])
def test_http_mirror(
    tmp_path: Path, http_mirror: str, synthetic_files: dict, synthetic_checksums: dict, mode: str
) -> None:
    out = tmp_path / "raw"
    download.download_all([http_mirror + mode + "/"], out, 5, synthetic_checksums)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == synthetic_files


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("missing", "HTTP 404"),
        ("short", "truncated"),
        ("cut", "not a complete gzip file"),
        ("notgzip", "not a complete gzip file"),
        ("wrongsum", "wrong SHA-256"),
        ("redirect", "redirected to another host"),
    ],
)
def test_bad_mirror_is_skipped_with_a_warning(
    tmp_path: Path,
    http_mirror: str,
    synthetic_mirror: Path,
    synthetic_files: dict,
    synthetic_checksums: dict,
    capsys: pytest.CaptureFixture,
    mode: str,
    reason: str,
) -> None:
    bad = http_mirror + mode + "/"
    out = tmp_path / "raw"
    download.download_all([bad, str(synthetic_mirror)], out, 5, synthetic_checksums)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == synthetic_files
    warnings = capsys.readouterr().err
    assert f"warning: mirror {bad} failed" in warnings
    assert reason in warnings


def test_all_mirrors_failing_lists_each_and_writes_nothing(
    tmp_path: Path, http_mirror: str, synthetic_checksums: dict
) -> None:
    unreachable = f"http://127.0.0.1:{closed_port()}/mnist/"
    mirrors = [
        unreachable,
        http_mirror + "missing/",
        http_mirror + "wrongsum/",
        str(tmp_path / "no-such-folder"),
        "ftp://example.invalid/",
    ]
    out = tmp_path / "raw"
    with pytest.raises(PipelineError) as error:
        download.download_all(mirrors, out, 5, synthetic_checksums)
    message = str(error.value)
    assert "every mirror failed for train-images-idx3-ubyte.gz" in message
    for mirror, reason in zip(
        mirrors,
        ["unreachable", "HTTP 404", "wrong SHA-256", "no such folder", "unsupported URL scheme"],
        strict=True,
    ):
        assert f"{mirror}: {reason}" in message
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [tmp_path / "mirror"]  # no temp folder left behind


def test_a_relative_folder_that_is_not_there_says_where_it_was_looked_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, synthetic_checksums: dict
) -> None:
    monkeypatch.chdir(tmp_path)  # as a queued experiment runs in .dvc/tmp/exps/<copy>
    with pytest.raises(PipelineError) as error:
        download.download_all(["../shared/mnist"], tmp_path / "raw", 5, synthetic_checksums)
    assert (
        f"../shared/mnist: no such folder ../shared/mnist (relative to {tmp_path}: queued "
        "experiments run in a copy under .dvc/tmp/exps/, so give an absolute path)"
    ) in str(error.value)


def test_failure_after_some_files_keeps_previous_output(
    tmp_path: Path, synthetic_mirror: Path, synthetic_checksums: dict
) -> None:
    out = tmp_path / "raw"
    download.download_all([str(synthetic_mirror)], out, 5, synthetic_checksums)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (synthetic_mirror / "t10k-labels-idx1-ubyte.gz").write_bytes(b"garbage")
    with pytest.raises(PipelineError, match="t10k-labels-idx1-ubyte.gz"):
        download.download_all([str(synthetic_mirror)], out, 5, synthetic_checksums)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_gzip_bomb_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(download, "MAX_BYTES", 1000)
    with pytest.raises(download.MirrorError, match="inflates to more than 1000 bytes"):
        download.decompress_and_verify(gzip.compress(bytes(5000)), "0" * 64)


@pytest.mark.parametrize("kind", ["folder", "http"])
def test_a_mirror_serving_too_much_is_cut_off_while_reading(
    http_mirror: str, synthetic_mirror: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """A wrong URL can serve anything: reading stops past MAX_BYTES, before the
    whole of it is in memory (the gzip check would only come after)."""
    monkeypatch.setattr(download, "MAX_BYTES", 1000)
    source = str(synthetic_mirror) if kind == "folder" else http_mirror + "ok/"
    with pytest.raises(download.MirrorError, match="^more than 1000 bytes: not an MNIST file"):
        download.fetch(source, "train-images-idx3-ubyte.gz", 5)


def test_a_mirror_that_stops_answering_times_out() -> None:
    """A server that accepts the connection and never answers: the mirror counts as
    unreachable after data.timeout_s, instead of hanging the stage."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()  # connections complete, but nothing ever reads or answers them
        url = f"http://127.0.0.1:{server.getsockname()[1]}/"
        errors = []

        def fetch() -> None:
            try:
                download.fetch(url, "train-images-idx3-ubyte.gz", 0.5)
            except download.MirrorError as error:
                errors.append(error)

        thread = threading.Thread(target=fetch, daemon=True)
        thread.start()
        thread.join(timeout=10)
        assert not thread.is_alive(), "still waiting after 10 s with a 0.5 s timeout"
    assert len(errors) == 1 and errors[0].unreachable
    assert "timed out" in str(errors[0])


def test_env_mirror_comes_first_and_is_not_repeated() -> None:
    mirrors = ("https://a/", "https://b/")
    assert download.mirror_sources(mirrors, None) == ["https://a/", "https://b/"]
    assert download.mirror_sources(mirrors, "../m") == ["../m", "https://a/", "https://b/"]
    assert download.mirror_sources(mirrors, "https://b/") == ["https://b/", "https://a/"]


def test_default_mirrors_are_torchvisions() -> None:
    import yaml

    params = yaml.safe_load(committed_params_text())
    assert params["data"]["mirrors"] == [
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    ]


def test_unreachable_mirror_is_asked_once(
    tmp_path: Path, synthetic_mirror: Path, synthetic_checksums: dict, capsys: pytest.CaptureFixture
) -> None:
    dead = f"http://127.0.0.1:{closed_port()}/"
    download.download_all([dead, str(synthetic_mirror)], tmp_path / "raw", 5, synthetic_checksums)
    assert capsys.readouterr().err.count(f"warning: mirror {dead} failed") == 1


def test_https_to_http_redirect_is_refused() -> None:
    import urllib.request

    handler = download._SameHostRedirects()
    request = urllib.request.Request("https://mirror.example/mnist/a.gz")
    with pytest.raises(download.MirrorError, match="from https to http"):
        handler.redirect_request(request, None, 302, "Found", {}, "http://mirror.example/a.gz")
