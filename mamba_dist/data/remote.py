"""Shards and manifests behind URLs: `https://`, `http://`, `pipe:CMD` (webdataset's gopen: curl / a shell
command), and every other fsspec protocol (`s3://`, `gs://`, `az://`, ... with s3fs / gcsfs / adlfs installed).

A remote shard is fetched whole the first time a process opens it, streamed to a content-addressed local cache
(`<cache>/shards/<sha256>.tar`, MAMBA_DIST_CACHE as in cache.py, or `shard_cache`) while its sha256 is computed,
and renamed into place only when size and sha256 match the manifest: so verification happens per shard when it is
opened, a rank fetches only the shards it reads, and a cached file is a verified one (other processes on the
host reuse it). The loader then reads members from the local copy with pread, as for local shards. The cache
keeps at most `cache_bytes` (least recently used files go first; 0: no limit).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

from .cache import cache_dir

_GOPEN_SCHEMES = ("http", "https", "pipe")


def is_url(path: str | os.PathLike) -> bool:
    s = str(path)
    if s.startswith("pipe:"):
        return True
    scheme = urlsplit(s).scheme
    return len(scheme) > 1 and scheme != "file"  # one letter: a Windows drive


def join(base: str | os.PathLike, rel: str) -> str | Path:
    """`rel` (a manifest's shard path) under `base` (a directory or URL); a URL or absolute `rel` stays itself."""
    if is_url(rel) or os.path.isabs(rel):
        return rel
    if is_url(base):
        return str(base).rstrip("/") + "/" + rel
    return Path(base) / rel


def open_url(url: str):
    """A readable binary stream."""
    scheme = "pipe" if url.startswith("pipe:") else urlsplit(url).scheme
    if scheme in _GOPEN_SCHEMES:
        import webdataset as wds

        return wds.gopen(url, "rb")
    import fsspec

    return fsspec.open(url, "rb").open()


def read_url(url: str) -> bytes:
    with open_url(url) as f:
        data = f.read()
    return data


class FetchFailed(OSError):
    pass


def fetch_shard(url: str, size: int, sha256: str, cache: str | os.PathLike | None = None,
                cache_bytes: int = 0) -> Path:
    """Local verified copy of the shard at `url`; raises FetchFailed (download error) or ValueError (mismatch)."""
    root = Path(cache) if cache is not None else cache_dir() / "shards"
    root.mkdir(parents=True, exist_ok=True)
    dest = root / f"{sha256}.tar"
    if dest.exists() and dest.stat().st_size == size:
        os.utime(dest)  # recently used
        return dest
    fd, tmp = tempfile.mkstemp(dir=root, prefix=f".{sha256[:16]}.")
    h, n = hashlib.sha256(), 0
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with open_url(url) as f:
                    while chunk := f.read(1 << 20):
                        h.update(chunk)
                        out.write(chunk)
                        n += len(chunk)
            except Exception as e:  # curl exit codes surface as IOError/ValueError from the pipe wrapper
                raise FetchFailed(f"cannot fetch ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
        if n != size:
            raise ValueError(f"fetched {n} bytes, manifest says {size} (truncated or overwritten)")
        if h.hexdigest() != sha256:
            raise ValueError(f"sha256 {h.hexdigest()[:16]}... does not match the manifest's {sha256[:16]}...")
        os.chmod(tmp, 0o444)
        os.replace(tmp, dest)
    finally:
        Path(tmp).unlink(missing_ok=True)
    if cache_bytes:
        _evict(root, cache_bytes, keep=dest)
    return dest


def _evict(root: Path, budget: int, keep: Path) -> None:
    files = []
    for p in root.glob("*.tar"):
        try:
            st = p.stat()
        except FileNotFoundError:  # another process evicted it
            continue
        files.append((st.st_mtime, st.st_size, p))
    total = sum(s for _, s, _ in files)
    for _, s, p in sorted(files):
        if total <= budget:
            break
        if p != keep:  # an open descriptor keeps an unlinked file readable for whoever holds it
            p.unlink(missing_ok=True)
            total -= s


__all__ = ["is_url", "join", "open_url", "read_url", "fetch_shard", "FetchFailed"]
