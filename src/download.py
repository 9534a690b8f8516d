"""Download stage: fetch the four MNIST files and verify every byte.

Mirrors come from `data.mirrors` and are tried in order; the environment
variable MNIST_MIRROR (a directory or a URL, e.g. `../shared/mnist`) is tried
first when set. Each `<name>.gz` is decompressed in memory and checked against
the SHA-256 of the real MNIST file before it is written, so a mirror that is
down, truncated, not gzip, or serving other bytes is skipped with a warning.

Inputs:  params.yaml `data`; the network or MNIST_MIRROR.
Outputs: `paths.raw`/ with the four decompressed IDX files (the same bytes
         whichever mirror served them, so the DVC hash is the same for all).
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import io
import os
import sys
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar
from urllib.parse import urlparse

from tqdm import tqdm

from pipeline.errors import PipelineError
from pipeline.files import atomic_path
from pipeline.params import check, load_params, load_paths
from pipeline.process import run

# SHA-256 of the decompressed files of the original MNIST database.
SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
# The largest MNIST file is 47 MB decompressed; refuse to read or inflate more
# than this from any mirror (a wrong URL can serve anything, or a gzip bomb).
MAX_BYTES = 64 * 2**20
MIRROR_ENV = "MNIST_MIRROR"


@dataclass(frozen=True)
class DataParams:
    SECTION: ClassVar[str] = "data"
    mirrors: tuple[str, ...]
    timeout_s: float

    def __post_init__(self) -> None:
        check(self, "mirrors", len(self.mirrors) > 0, "at least one URL")
        check(self, "timeout_s", self.timeout_s > 0, "a number > 0 (seconds)")


class MirrorError(Exception):
    """One mirror failed for one file; the next mirror is tried.
    `unreachable` mirrors are not asked again for the other files."""

    def __init__(self, reason: str, unreachable: bool = False) -> None:
        super().__init__(reason)
        self.unreachable = unreachable


class _SameHostRedirects(urllib.request.HTTPRedirectHandler):
    """Follow a redirect only within the mirror's own host, and never https -> http."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        old, new = urlparse(req.full_url), urlparse(newurl)
        if new.hostname != old.hostname:
            raise MirrorError(f"redirected to another host ({newurl})")
        if old.scheme == "https" and new.scheme != "https":
            raise MirrorError(f"redirected from https to {new.scheme} ({newurl})")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def mirror_sources(mirrors: tuple[str, ...], env_mirror: str | None) -> list[str]:
    """The mirrors to try, in order: MNIST_MIRROR first when it is set."""
    return ([env_mirror] if env_mirror else []) + [m for m in mirrors if m != env_mirror]


def _read_limited(stream: io.BufferedIOBase, total: int | None, label: str) -> bytes:
    data = bytearray()
    with tqdm(total=total, unit="B", unit_scale=True, desc=label, disable=None, leave=False) as bar:
        while chunk := stream.read(1 << 20):
            data += chunk
            bar.update(len(chunk))
            if len(data) > MAX_BYTES:
                raise MirrorError(f"more than {MAX_BYTES} bytes: not an MNIST file")
    if total is not None and len(data) != total:
        raise MirrorError(f"truncated: got {len(data)} of {total} bytes")
    return bytes(data)


def fetch(source: str, filename: str, timeout_s: float) -> bytes:
    """The bytes of `filename` from a mirror: an http(s) or file URL, or a directory."""
    scheme = urlparse(source).scheme
    if scheme in ("http", "https"):
        url = source.rstrip("/") + "/" + filename
        opener = urllib.request.build_opener(_SameHostRedirects)
        try:
            with opener.open(url, timeout=timeout_s) as response:
                length = response.headers.get("Content-Length", "")
                total = int(length) if length.isdigit() else None  # absent or malformed
                return _read_limited(response, total, filename)
        except urllib.error.HTTPError as error:
            raise MirrorError(f"HTTP {error.code} {error.reason}") from None
        except http.client.IncompleteRead as error:
            got = len(error.partial)
            raise MirrorError(f"truncated: got {got} bytes, then the connection closed") from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as error:
            reason = getattr(error, "reason", error)
            raise MirrorError(f"unreachable ({reason})", unreachable=True) from None
    if scheme == "file":
        source = urllib.request.url2pathname(urlparse(source).path)
    elif scheme and len(scheme) > 1:  # one letter is a Windows drive, not a scheme
        raise MirrorError(f"unsupported URL scheme '{scheme}' (use http, https, file or a folder)")
    path = Path(source) / filename
    if not path.parent.is_dir():  # e.g. a relative MNIST_MIRROR seen from a queued run's copy
        where = ""
        if not path.parent.is_absolute():
            where = (
                f" (relative to {Path.cwd()}: queued experiments run in a copy under"
                " .dvc/tmp/exps/, so give an absolute path)"
            )
        raise MirrorError(f"no such folder {path.parent}{where}", unreachable=True)
    try:
        with open(path, "rb") as f:
            return _read_limited(f, None, filename)
    except OSError as error:
        raise MirrorError(f"cannot read {path} ({error.strerror})") from None


def decompress_and_verify(data: bytes, expected_sha256: str) -> bytes:
    """Gunzip `data` (at most MAX_BYTES) and check the result's SHA-256."""
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(data)) as f:
            raw = f.read(MAX_BYTES + 1)
    except (gzip.BadGzipFile, EOFError, zlib.error, OSError) as error:
        raise MirrorError(f"not a complete gzip file ({error})") from None
    if len(raw) > MAX_BYTES:
        raise MirrorError(f"inflates to more than {MAX_BYTES} bytes: not an MNIST file")
    digest = hashlib.sha256(raw).hexdigest()
    if digest != expected_sha256:
        raise MirrorError(f"wrong SHA-256 {digest[:16]}..., expected {expected_sha256[:16]}...")
    return raw


def download_file(
    name: str, sources: list[str], expected_sha256: str, timeout_s: float, unreachable: dict
) -> bytes:
    """The verified, decompressed bytes of MNIST file `name` from the first good mirror.
    Mirrors found unreachable are recorded in `unreachable` and skipped afterwards."""
    failures = []
    for source in sources:
        if source in unreachable:
            failures.append(f"  {source}: {unreachable[source]} (skipped)")
            continue
        try:
            return decompress_and_verify(fetch(source, name + ".gz", timeout_s), expected_sha256)
        except MirrorError as error:
            failures.append(f"  {source}: {error}")
            print(f"warning: mirror {source} failed for {name}.gz: {error}", file=sys.stderr)
            if error.unreachable:
                unreachable[source] = str(error)
    raise PipelineError(f"every mirror failed for {name}.gz:\n" + "\n".join(failures))


def download_all(
    sources: list[str], out_dir: Path, timeout_s: float, checksums: dict[str, str] = SHA256
) -> None:
    """Write every verified file into `out_dir`, which appears only when all are good."""
    unreachable: dict[str, str] = {}
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        for name, sha in checksums.items():
            (tmp / name).write_bytes(download_file(name, sources, sha, timeout_s, unreachable))
            print(f"{name}: ok (sha256 {sha[:12]}...)")


def main() -> None:
    params = load_params(DataParams)
    paths = load_paths()
    sources = mirror_sources(params.mirrors, os.environ.get(MIRROR_ENV))
    download_all(sources, Path(paths.raw), params.timeout_s)


if __name__ == "__main__":
    run(main, stage="download")
