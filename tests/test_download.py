"""Benchmark download: safe unpacking, verification, resumable fetch. No network: archives are
built here and HTTP is served from 127.0.0.1."""
from __future__ import annotations

import contextlib
import io
import json
import socket
import tarfile
import threading
import warnings
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

import mlilt.datasets as benchmarks
from mlilt.datasets import VerifyReport, load_benchmark, xm3600, xtd10
from mlilt.datasets.fetch import fetch
from mlilt.errors import DataError, MliltError

KEYS = ["000411001ff7dd4f", "0a1b2c3d4e5f6789", "ffeeddccbbaa0011"]


def _jpeg(color=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, format="JPEG")
    return buffer.getvalue()


def _caption_line(key: str) -> str:
    entry = lambda text: {"caption": [text, text + " again"], "caption/tokenized": [text],  # noqa: E731
                          "caption/tokenized/lowercase": [text.lower()]}
    return json.dumps({"image/key": key, "image/locale": "en",
                       "en": entry(f"A photo {key[:4]}"), "de": entry(f"Ein Foto {key[:4]}")})


def _captions_zip(path: Path, keys=KEYS) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("captions.jsonl", "\n".join(_caption_line(k) for k in keys) + "\n")
    return path


def _add(archive: tarfile.TarFile, name: str, data: bytes = b"", **attrs) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for key, value in attrs.items():
        setattr(info, key, value)
    archive.addfile(info, io.BytesIO(data) if data else None)


def _images_tgz(path: Path, names, extra_members=()) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        _add(archive, "images", type=tarfile.DIRTYPE, mode=0o755)
        for name in names:
            _add(archive, f"images/{name}", _jpeg())
        for name, data, attrs in extra_members:
            _add(archive, name, data, **attrs)
    return path


def test_unpack_gives_the_layout_the_loader_reads(tmp_path):
    root = tmp_path / "bench"
    report = xm3600.unpack(_captions_zip(tmp_path / "captions.zip"),
                           _images_tgz(tmp_path / "images.tgz", [f"{k}.jpg" for k in KEYS]),
                           root, expected=len(KEYS))
    assert report.ok, report.summary()
    assert (report.found_images, report.caption_entries) == (3, 3)
    assert sorted(p.name for p in (root / "xm3600" / "images").iterdir()) == [f"{k}.jpg" for k in KEYS]
    assert sorted(p.name for p in root.iterdir()) == ["xm3600"]  # no staging folder left
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a complete set: no "incomplete" warning
        sets = load_benchmark("xm3600", root, langs=["en", "de"])
    assert sets["en"].image_keys == KEYS and len(sets["de"].captions) == 3
    # the real set expects 3,600 images: a small one is reported, not passed
    full = xm3600.verify(root)
    assert not full.ok and "expected 3600" in full.summary()
    with pytest.raises(MliltError, match="already exists"):
        xm3600.unpack(tmp_path / "captions.zip", tmp_path / "images.tgz", root)


def test_verify_reports_missing_image_and_extra_file(tmp_path):
    root = tmp_path / "bench"
    names = [f"{KEYS[0]}.jpg", f"{KEYS[1]}.jpg", "1234567890abcdef.jpg"]  # KEYS[2] has no image
    report = xm3600.unpack(_captions_zip(tmp_path / "c.zip"), _images_tgz(tmp_path / "i.tgz", names),
                           root, expected=3)
    assert not report.ok
    assert report.missing_images == [KEYS[2]]
    assert report.extra_files == ["1234567890abcdef.jpg"]
    assert report.found_images == 3
    text = report.summary()
    assert KEYS[2] in text and "1234567890abcdef.jpg" in text and "INCOMPLETE" in text
    # a broken caption line is reported with its line number
    with open(root / "xm3600" / "captions.jsonl", "a") as handle:
        handle.write("{not json\n")
    assert any("captions.jsonl:4" in e for e in xm3600.verify(root, expected=3).errors)


@pytest.mark.parametrize("member", [
    ("images/../../evil.jpg", b"x", {}),
    ("../evil.jpg", b"x", {}),
    ("/tmp/mlilt-absolute-evil.jpg", b"x", {}),
    ("images/link.jpg", b"", {"type": tarfile.SYMTYPE, "linkname": "../../evil.jpg"}),
    ("images/hard.jpg", b"", {"type": tarfile.LNKTYPE, "linkname": "/etc/passwd"}),
    ("images/dev.jpg", b"", {"type": tarfile.CHRTYPE, "devmajor": 1, "devminor": 3}),
], ids=["dotdot-nested", "dotdot", "absolute", "symlink", "hardlink", "device"])
def test_malicious_tar_is_refused_and_nothing_is_written(tmp_path, member):
    root = tmp_path / "root"
    root.mkdir()
    tgz = _images_tgz(tmp_path / "images.tgz", [f"{KEYS[0]}.jpg"], extra_members=[member])
    with pytest.raises(DataError, match="refusing member"):
        xm3600.unpack(_captions_zip(tmp_path / "captions.zip"), tgz, root)
    assert list(root.iterdir()) == []  # no xm3600, no half-written staging folder
    assert not (tmp_path / "evil.jpg").exists() and not Path("/tmp/mlilt-absolute-evil.jpg").exists()


def test_zip_with_escaping_member_is_refused(tmp_path):
    bad = tmp_path / "captions.zip"
    with zipfile.ZipFile(bad, "w") as archive:
        archive.writestr("../captions.jsonl", "{}")
    root = tmp_path / "root"
    with pytest.raises(DataError, match="refusing member"):
        xm3600.unpack(bad, _images_tgz(tmp_path / "i.tgz", []), root)
    assert not root.exists() or list(root.iterdir()) == []


def test_verify_xtd10_lists_missing_coco_images(tmp_path):
    folder = tmp_path / "xtd10"
    (folder / "images").mkdir(parents=True)
    names = ["COCO_train2014_000000000009.jpg", "COCO_train2014_000000000025.jpg"]
    (folder / "test_image_names.txt").write_text("\n".join(names) + "\n")
    for lang in xtd10.LANGUAGES:
        (folder / f"test_1kcaptions_{lang}.txt").write_text("one\ntwo\n")
    (folder / "images" / names[0]).write_bytes(_jpeg())
    report = xtd10.verify(tmp_path)
    assert report.missing_images == [names[1]] and report.found_images == 1
    assert not report.ok and "COCO train2014" in report.summary() and not report.errors


# --------------------------------------------------------------------------- HTTP


class _Handler(BaseHTTPRequestHandler):
    payload = b""
    honour_range = True
    ranges: list = []

    def do_GET(self):  # noqa: N802
        data, start = self.payload, 0
        wanted = self.headers.get("Range")
        type(self).ranges.append(wanted)
        if wanted and self.honour_range:
            start = int(wanted.split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:])

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    handler = type("Handler", (_Handler,), {"payload": bytes(range(256)) * 4000, "ranges": []})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield handler, f"http://127.0.0.1:{httpd.server_address[1]}/file.bin"
    httpd.shutdown()
    httpd.server_close()


def test_fetch_resumes_a_partial_download(tmp_path, server):
    handler, url = server
    dest = tmp_path / "file.bin"
    half = len(handler.payload) // 2
    (tmp_path / "file.bin.part").write_bytes(handler.payload[:half])
    seen = []
    assert fetch(url, dest, lambda done, total: seen.append((done, total))) == dest
    assert dest.read_bytes() == handler.payload
    assert handler.ranges == [f"bytes={half}-"]
    assert seen[0] == (half, len(handler.payload)) and seen[-1] == (len(handler.payload),) * 2
    assert not (tmp_path / "file.bin.part").exists()


def test_fetch_from_scratch_and_complete_part(tmp_path, server):
    handler, url = server
    fetch(url, tmp_path / "a.bin")
    assert (tmp_path / "a.bin").read_bytes() == handler.payload and handler.ranges == [None]
    # a .part that already holds everything: the server says 416, the file is fetched anew
    (tmp_path / "b.bin.part").write_bytes(handler.payload)
    fetch(url, tmp_path / "b.bin")
    assert (tmp_path / "b.bin").read_bytes() == handler.payload


def test_fetch_when_server_ignores_range(tmp_path, server):
    handler, url = server
    handler.honour_range = False
    (tmp_path / "file.bin.part").write_bytes(b"garbage that is not the start of the file")
    fetch(url, tmp_path / "file.bin")
    assert (tmp_path / "file.bin").read_bytes() == handler.payload
    assert handler.ranges[0] is not None  # a resume was asked for and ignored


def test_fetch_unreachable_names_the_url(tmp_path):
    with socket.socket() as sock:  # a port that was free a moment ago and is closed now
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/captions.zip"
    with pytest.raises(MliltError, match=f"127.0.0.1:{port}/captions.zip") as info:
        fetch(url, tmp_path / "captions.zip", timeout=5)
    assert "again" in str(info.value)
    assert not (tmp_path / "captions.zip").exists()


def test_download_lists_what_could_not_be_fetched(tmp_path, monkeypatch):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setattr(xm3600, "SOURCES", {name: f"http://127.0.0.1:{port}/{name}"
                                         for name in xm3600.SOURCES})
    report = xm3600.download(tmp_path)
    assert not report.ok and len(report.not_fetched) == 2
    assert "could not be fetched" in report.summary() and not (tmp_path / "xm3600").exists()


@contextlib.contextmanager
def _serving(files: dict[str, bytes]):
    """Serve ``files`` (name -> bytes) on a local port; yield the base URL."""
    class Files(_Handler):
        def do_GET(self):  # noqa: N802
            type(self).payload = files[self.path.strip("/")]
            super().do_GET()

    Files.ranges = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Files)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_download_xm3600_end_to_end_from_local_server(tmp_path, monkeypatch):
    files = {"captions.zip": _captions_zip(tmp_path / "c.zip").read_bytes(),
             "images.tgz": _images_tgz(tmp_path / "i.tgz", [f"{k}.jpg" for k in KEYS]).read_bytes()}

    with _serving(files) as base:
        monkeypatch.setattr(xm3600, "SOURCES", {name: base + name for name in files})
        monkeypatch.setattr(xm3600, "IMAGES", 3)
        calls = []
        report = xm3600.download(tmp_path / "root", lambda *a: calls.append(a))
    assert report.found_images == 3 and not report.missing_images and not report.errors
    assert {label for label, _, _ in calls} == set(files)
    assert (tmp_path / "root" / ".downloads" / "xm3600" / "images.tgz").is_file()


def test_zip_symlink_member_is_refused(tmp_path):
    bad = tmp_path / "captions.zip"
    with zipfile.ZipFile(bad, "w") as archive:
        info = zipfile.ZipInfo("captions.jsonl")
        info.external_attr = (0o120777 << 16)  # a symlink entry
        archive.writestr(info, "/etc/passwd")
    with pytest.raises(DataError, match="refusing member"):
        xm3600.unpack(bad, _images_tgz(tmp_path / "i.tgz", []), tmp_path / "root")
    assert not (tmp_path / "root" / "xm3600").exists()


def test_cli_prints_summary_and_fails_when_incomplete(tmp_path, monkeypatch):
    import typer
    from typer.testing import CliRunner

    from mlilt.cli.download import download_command

    app = typer.Typer()
    app.command("download")(download_command)
    app.command("other")(lambda: None)  # two commands: "download" stays a sub-command

    def fake(root, progress=None, overwrite=False):
        progress("captions.zip", 5, 10)
        progress("captions.zip", 10, 10)
        report = VerifyReport("xm3600", Path(root) / "xm3600", 3, found_images=2, caption_entries=3,
                              missing_images=[KEYS[2]])
        return report

    monkeypatch.setitem(benchmarks.DOWNLOADS, "xm3600", fake)
    result = CliRunner().invoke(app, ["download", "xm3600", "--root", str(tmp_path)])
    assert result.exit_code == 1, result.output
    assert "INCOMPLETE" in result.output and KEYS[2] in result.output

    monkeypatch.setitem(benchmarks.DOWNLOADS, "xtd10", lambda root, progress=None, overwrite=False: VerifyReport(
        "xtd10", Path(root) / "xtd10", None))
    result = CliRunner().invoke(app, ["download", "xtd10", "--root", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "OK" in result.output


def test_download_xtd10_fetches_captions_and_lists_missing_images(tmp_path, monkeypatch):
    names = ["COCO_train2014_000000000009.jpg", "COCO_train2014_000000000025.jpg"]
    files = {"test_image_names.txt": ("\n".join(names) + "\n").encode()}
    files.update({f"test_1kcaptions_{lang}.txt": f"{lang} one\n{lang} two\n".encode()
                  for lang in xtd10.LANGUAGES})

    with _serving(files) as base:
        monkeypatch.setattr(xtd10, "SOURCES", {name: base + name for name in files})
        root = tmp_path / "root"
        report = xtd10.download(root)
        assert report.missing_images == names and not report.errors and not report.not_fetched
        assert str(root / "xtd10" / "images") in report.summary()
        (root / "xtd10" / "images" / names[0]).write_bytes(_jpeg())
        (root / "xtd10" / "images" / names[1]).write_bytes(_jpeg())
        again = xtd10.download(root)  # re-run: user images kept, caption files rewritten
    assert again.found_images == 2 and not again.missing_images
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sets = load_benchmark("xtd10", root, langs=["jp"])
    assert sets["jp"].captions == ["jp one", "jp two"]
