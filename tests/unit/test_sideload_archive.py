"""Side-loading archives an attacker could craft (#16 item 14): links, paths out of the archive,
devices, too many members and decompression bombs are refused with a clear message, at once."""

from __future__ import annotations

import gzip
import io
import os
import tarfile
import time
from pathlib import Path

import pytest

from cluster_registry.oci import layout
from cluster_registry.oci.layout import Input, InputError, read_input


def archive(path: Path, *members: tarfile.TarInfo, data: bytes = b"", compress: bool = False) -> Path:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(_file("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'), io.BytesIO(b'{"imageLayoutVersion":"1.0.0"}'))
        for m in members:
            tar.addfile(m, io.BytesIO(data) if m.isfile() else None)
    path.write_bytes(gzip.compress(raw.getvalue()) if compress else raw.getvalue())
    return path


def _file(name: str, data: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info


def link(name: str, target: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


@pytest.mark.parametrize(
    ("member", "message"),
    [
        (link("index.json", "/etc/passwd", tarfile.SYMTYPE), "'index.json' is a symbolic link"),
        (link("blobs/sha256/aa", "../../../etc/shadow", tarfile.SYMTYPE), "is a symbolic link"),
        (link("index.json", "oci-layout", tarfile.LNKTYPE), "'index.json' is a hard link"),
        (_file("../outside", b"x"), "'../outside' leaves the archive"),
        (_file("blobs/../../outside", b"x"), "leaves the archive"),
        (_file("/etc/cron.d/x", b"x"), "'/etc/cron.d/x' leaves the archive"),
        (link("dev", "", tarfile.CHRTYPE), "'dev' is not a file or directory"),
        (link("fifo", "", tarfile.FIFOTYPE), "'fifo' is not a file or directory"),
    ],
)
def test_crafted_members_are_refused(tmp_path: Path, member: tarfile.TarInfo, message: str) -> None:
    path = archive(tmp_path / "in.tar", member, data=b"x")
    with pytest.raises(InputError, match=message):
        read_input(Input(path))


def test_a_gzip_bomb_fails_fast_on_its_header(tmp_path: Path) -> None:
    """A member declaring 64 GiB in a file of a few KiB: refused on its header, nothing decompressed."""
    huge = _file("blobs/sha256/" + "0" * 64, b"")
    huge.size = 64 << 30
    raw = huge.tobuf(tarfile.PAX_FORMAT) + b"\0" * (1 << 20)  # the data is not even there
    path = tmp_path / "bomb.tar.gz"
    path.write_bytes(gzip.compress(raw))
    start = time.monotonic()
    with pytest.raises(InputError, match="refused as a decompression bomb"):
        read_input(Input(path))
    assert time.monotonic() - start < 1.0


def test_a_real_bomb_is_refused_by_its_ratio(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Members of zeros that expand 1000-fold (the floor lowered from 1 GiB to keep the test small)."""
    monkeypatch.setattr(layout, "BOMB_FLOOR", 8 << 20)
    zeros = b"\0" * (4 << 20)
    path = archive(tmp_path / "zeros.tar.gz", *(_file(f"z{i}", zeros) for i in range(8)), data=zeros, compress=True)
    assert os.path.getsize(path) < 200_000
    with pytest.raises(InputError, match=r"expands to more than \d+ bytes from \d+ on disk \(member 'z1'\)"):
        read_input(Input(path))


def test_member_count_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(layout, "MAX_MEMBERS", 50)
    path = archive(tmp_path / "many.tar", *(_file(f"f{i}", b"") for i in range(60)))
    with pytest.raises(InputError, match="more than 50 members"):
        read_input(Input(path))


def test_a_layout_directory_with_a_symlink_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "layout"
    (root / "blobs" / "sha256").mkdir(parents=True)
    (root / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (root / "index.json").symlink_to("/etc/hostname")
    with pytest.raises(InputError, match="index.json is a symbolic link: refused"):
        read_input(Input(root))
