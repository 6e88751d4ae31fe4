"""ROM format: deterministic builds, embedding, and refusal of hostile archives."""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import struct
import zipfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ww.rom import (
    MAX_FILE_BYTES,
    MAX_FILES,
    MAX_ROM_BYTES,
    MAX_TOTAL_BYTES,
    Rom,
    RomError,
    build_rom,
    build_rom_file,
)


def write_source(root: Path, files: dict[str, str], toml: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "rom.toml").write_text(toml)
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


HELLO_TOML = 'name = "hi"\nversion = "1.0"\nentry = "hi:main"\nrequires = ["trio"]\n'
HELLO_PY = "async def main(host, args):\n    return 0\n"


@pytest.fixture
def src(tmp_path: Path) -> Path:
    return write_source(tmp_path / "hi", {"hi.py": HELLO_PY}, HELLO_TOML)


def manifest(**overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "format": 1,
        "name": "x",
        "version": "1",
        "entry": "m:main",
        "requires": [],
        "modules": ["m.py"],
        "data": [],
    }
    doc.update(overrides)
    return doc


def archive(members: list[tuple[str | zipfile.ZipInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, content in members:
            zf.writestr(name, content)
    return buf.getvalue()


def rom_with(doc: dict[str, Any] | None, *extra: tuple[str | zipfile.ZipInfo, bytes]) -> bytes:
    members: list[tuple[str | zipfile.ZipInfo, bytes]] = []
    if doc is not None:
        members.append(("manifest.json", json.dumps(doc).encode()))
    members.append(("src/m.py", HELLO_PY.encode()))
    members.extend(extra)
    return archive(members)


def refused(data: bytes, *words: str) -> str:
    with pytest.raises(RomError) as info:
        Rom.load(data)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message
    return message


# ------------------------------------------------------------------------------------------
# Building


def test_build_is_deterministic_and_cid_is_sha256(src: Path) -> None:
    first = build_rom(src)
    os.utime(src / "hi.py", (1_000_000, 1_000_000))
    (src / "hi.py").chmod(0o600)
    second = build_rom(src)
    assert first == second
    rom = Rom.load(first)
    assert rom.cid == hashlib.sha256(first).hexdigest()
    assert rom.manifest.name == "hi"
    assert rom.manifest.version == "1.0"
    assert rom.manifest.entry == "hi:main"
    assert rom.manifest.requires == ("trio",)
    assert rom.manifest.modules == ("hi.py",)
    assert "hi.py" in repr(rom) and len(repr(rom)) < 400  # no archive bytes in the repr
    with zipfile.ZipFile(io.BytesIO(first)) as zf:
        names = zf.namelist()
        assert names == ["manifest.json", "src/hi.py"]
        assert {i.date_time for i in zf.infolist()} == {(1980, 1, 1, 0, 0, 0)}


def test_build_changes_cid_when_a_module_changes(src: Path) -> None:
    before = Rom.load(build_rom(src)).cid
    (src / "hi.py").write_text(HELLO_PY + "# changed\n")
    assert Rom.load(build_rom(src)).cid != before


def test_build_collects_packages_and_skips_caches_and_hidden(tmp_path: Path) -> None:
    root = write_source(
        tmp_path / "app",
        {
            "app/__init__.py": "",
            "app/core.py": HELLO_PY,
            "app/__pycache__/core.py": "stale",
            ".hidden/x.py": "",
            "README.txt": "not a module",
        },
        'name = "app"\nversion = "1"\nentry = "app.core:main"\n',
    )
    (root / "loop").symlink_to(root.parent)  # not followed
    rom = Rom.load(build_rom(root))
    assert rom.manifest.modules == ("app/__init__.py", "app/core.py")
    assert rom.find_module("app") == ("app/__init__.py", True)
    assert rom.find_module("app.core") == ("app/core.py", False)
    assert rom.find_module("nope") is None


def test_inner_rom_rides_inside_outer_as_data(tmp_path: Path) -> None:
    outer = write_source(
        tmp_path / "outer",
        {"outer.py": HELLO_PY, "notes.txt": "hello"},
        'name = "outer"\nversion = "1"\nentry = "outer:main"\n'
        '[embed]\n"inner.rom" = "inner"\n"notes" = "notes.txt"\n',
    )
    write_source(
        outer / "inner",
        {"inner.py": HELLO_PY},
        'name = "inner"\nversion = "2"\nentry = "inner:main"\n',
    )
    rom = Rom.load(build_rom(outer))
    assert rom.manifest.modules == ("outer.py",)  # the inner ROM's modules are not the outer's
    assert rom.manifest.data == ("inner.rom", "notes")
    inner = Rom.load(rom.read("inner.rom"))
    assert inner.manifest.name == "inner"
    assert inner.data == build_rom(outer / "inner")
    assert rom.read("notes") == b"hello"
    with pytest.raises(RomError, match="no embedded data 'missing'"):
        rom.read("missing")


def test_build_rom_file_writes_the_rom_and_returns_its_cid(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "hi.rom"
    cid = build_rom_file(src, out)
    assert out.read_bytes() == build_rom(src)
    assert cid == Rom.load(out.read_bytes()).cid


@pytest.mark.parametrize(
    ("toml", "files", "words"),
    [
        (None, {}, ("rom.toml not found",)),
        ("name = ", {}, ("not valid TOML",)),
        ('name = "a"\nversion = "1"\n', {}, ("missing 'entry'",)),
        ('name = "a"\nversion = "1"\nentry = "m:main"\nrequire = []\n', {}, ("unknown key",)),
        ('name = "a"\nversion = "1"\nentry = "main"\n', {}, ("module:function",)),
        ('name = "a b"\nversion = "1"\nentry = "m:main"\n', {}, ("'name'",)),
        ('name = "a"\nversion = "1"\nentry = "m:main"\nrequires = "trio"\n', {}, ("requires",)),
        ('name = "a"\nversion = "1"\nentry = "gone:main"\n', {}, ("module 'gone' is not in",)),
        ('name = "a"\nversion = "1"\nentry = "m:main"\n', {"my-mod.py": ""}, ("identifiers",)),
        ('name = "a"\nversion = "1"\nentry = "m:main"\n', {"queue.py": ""}, ("shadow",)),
        ('name = "a"\nversion = "1"\nentry = "m:main"\n[embed]\n"x" = "nope"\n', {}, ("nope",)),
        ('name = "a"\nversion = "1"\nentry = "m:main"\n[embed]\n"../x" = "m.py"\n', {}, ("..",)),
    ],
)
def test_bad_sources_are_refused_with_one_line(
    tmp_path: Path, toml: str | None, files: dict[str, str], words: tuple[str, ...]
) -> None:
    root = tmp_path / "bad"
    root.mkdir()
    (root / "m.py").write_text(HELLO_PY)
    for rel, text in files.items():
        (root / rel).write_text(text)
    if toml is not None:
        (root / "rom.toml").write_text(toml)
    with pytest.raises(RomError) as info:
        build_rom(root)
    assert "\n" not in str(info.value)
    for word in words:
        assert word in str(info.value)


def test_embed_cycle_is_refused(tmp_path: Path) -> None:
    root = write_source(
        tmp_path / "loop",
        {"m.py": HELLO_PY},
        'name = "loop"\nversion = "1"\nentry = "m:main"\n[embed]\n"self.rom" = "."\n',
    )
    with pytest.raises(RomError, match="embeds itself"):
        build_rom(root)


def test_requires_names_the_missing_package(src: Path) -> None:
    Rom.load(build_rom(src)).check_requires()  # trio is installed
    (src / "rom.toml").write_text(HELLO_TOML.replace('["trio"]', '["trio", "no_such_pkg_ww"]'))
    rom = Rom.load(build_rom(src))
    with pytest.raises(RomError, match="requires the Python package 'no_such_pkg_ww'"):
        rom.check_requires()


# ------------------------------------------------------------------------------------------
# Hostile archives


def test_a_well_formed_handmade_archive_loads() -> None:
    rom = Rom.load(rom_with(manifest()))
    assert rom.manifest.entry == "m:main"


def test_not_a_zip_is_refused() -> None:
    refused(b"hello, this is not a zip", "not a zip archive")
    refused(b"", "not a zip archive")


def test_wrong_type_is_refused() -> None:
    with pytest.raises(RomError, match="bytes"):
        Rom.load("a string")  # type: ignore[arg-type]


def test_oversized_archive_is_refused_before_parsing() -> None:
    refused(b"\0" * (MAX_ROM_BYTES + 1), "limit")


def test_missing_manifest_is_refused() -> None:
    refused(rom_with(None), "no manifest.json")


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (b"{not json", ("not valid JSON",)),
        (b"\xff\xfe{}", ("not valid JSON",)),
        (b"[" * 60_000, ("not valid JSON",)),
        (b"[1, 2]", ("JSON object",)),
        (json.dumps(manifest(format=2)).encode(), ("format 2",)),
        (json.dumps({k: v for k, v in manifest().items() if k != "name"}).encode(), ("'name'",)),
        (json.dumps(manifest(version=3)).encode(), ("'version'",)),
        (json.dumps(manifest(entry=["m", "main"])).encode(), ("'entry'",)),
        (json.dumps(manifest(entry="m.main")).encode(), ("module:function",)),
        (json.dumps(manifest(entry="m:main:x")).encode(), ("module:function",)),
        (json.dumps(manifest(requires="trio")).encode(), ("'requires'",)),
        (json.dumps(manifest(requires=["os; rm -rf"])).encode(), ("'requires'",)),
        (json.dumps(manifest(modules="m.py")).encode(), ("'modules'",)),
        (json.dumps(manifest(modules=["m.py", "n.py"])).encode(), ("lists modules",)),
        (json.dumps(manifest(data=["x"])).encode(), ("lists data",)),
        (json.dumps(manifest(entry="other:main")).encode(), ("module 'other' is not in",)),
    ],
)
def test_bad_manifests_are_refused(raw: bytes, words: tuple[str, ...]) -> None:
    refused(archive([("manifest.json", raw), ("src/m.py", b"")]), *words)


@pytest.mark.parametrize(
    "name",
    [
        "/etc/passwd",
        "src/../../escape.py",
        "data/../../../x",
        "src\\..\\evil.py",
        "C:/windows/evil",
        "src//m2.py",
        "src/./m2.py",
        "data/",
    ],
)
def test_names_that_escape_the_archive_are_refused(name: str) -> None:
    refused(rom_with(manifest(), (name, b"x")), repr(name))


def test_members_outside_the_layout_are_refused() -> None:
    refused(rom_with(manifest(), ("evil.sh", b"#!/bin/sh")), "outside its layout")


def test_symlinks_are_refused() -> None:
    link = zipfile.ZipInfo("data/link")
    link.create_system = 3
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    refused(rom_with(manifest(data=["link"]), (link, b"/etc/passwd")), "symbolic link")


def test_encrypted_members_are_refused() -> None:
    data = bytearray(rom_with(manifest()))
    # Set the "encrypted" flag of the first central directory entry.
    at = data.index(b"PK\x01\x02")
    flags = struct.unpack_from("<H", data, at + 8)[0]
    struct.pack_into("<H", data, at + 8, flags | 0x1)
    refused(bytes(data), "encrypted")


def test_duplicate_members_are_refused() -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate we want
        data = rom_with(manifest(), ("src/m.py", b"# second"))
    refused(data, "two members")


def test_too_many_files_are_refused() -> None:
    extra = [(f"data/f{i}", b"") for i in range(MAX_FILES)]
    refused(rom_with(manifest(data=[f"f{i}" for i in range(MAX_FILES)]), *extra), "files")


def test_per_file_bomb_is_refused() -> None:
    bomb = b"\0" * (MAX_FILE_BYTES + 1)  # deflates to a few KB
    refused(rom_with(manifest(data=["bomb"]), ("data/bomb", bomb)), "per-file limit")


def central_entries(data: bytes) -> list[int]:
    """Offsets of the central directory entries of a zip archive."""
    offsets, at = [], data.find(b"PK\x01\x02")
    while at != -1:
        offsets.append(at)
        at = data.find(b"PK\x01\x02", at + 46)
    return offsets


def test_total_bomb_is_refused() -> None:
    count = MAX_TOTAL_BYTES // MAX_FILE_BYTES + 1
    names = [f"b{i}" for i in range(count)]
    data = bytearray(rom_with(manifest(data=names), *[(f"data/{n}", b"") for n in names]))
    # Each member claims the per-file maximum; together they claim past the total limit.
    for at in central_entries(bytes(data)):
        if data[at + 46 : at + 51] == b"data/":
            struct.pack_into("<I", data, at + 24, MAX_FILE_BYTES)
    refused(bytes(data), "unpacks to", str(MAX_TOTAL_BYTES))


def test_bomb_with_a_lying_size_header_is_refused() -> None:
    data = bytearray(rom_with(manifest(data=["bomb"]), ("data/bomb", b"\0" * (4 << 20))))
    # The bomb's central directory entry claims it unpacks to 100 bytes.
    at = central_entries(bytes(data))[-1]
    assert data[at + 46 : at + 46 + 9] == b"data/bomb"
    struct.pack_into("<I", data, at + 24, 100)
    refused(bytes(data), "'data/bomb'")


def test_corrupt_member_is_refused() -> None:
    data = bytearray(rom_with(manifest()))
    at = data.index(b"src/m.py") + len("src/m.py")  # compressed bytes follow the local name
    data[at : at + 4] = b"\xff\xff\xff\xff"
    refused(bytes(data), "corrupt")


_VALID = rom_with(manifest(data=["d"]), ("data/d", b"some embedded data " * 20))


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    st.lists(
        st.tuples(st.integers(0, len(_VALID) - 1), st.integers(0, 255)), min_size=1, max_size=8
    )
)
def test_fuzz_mutated_archives_load_or_raise_rom_error(edits: list[tuple[int, int]]) -> None:
    data = bytearray(_VALID)
    for at, value in edits:
        data[at] = value
    try:
        Rom.load(bytes(data))
    except RomError as exc:
        assert "\n" not in str(exc)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.binary(max_size=512))
def test_fuzz_arbitrary_bytes_never_escape_as_anything_but_rom_error(data: bytes) -> None:
    with pytest.raises(RomError):
        Rom.load(b"PK\x03\x04" + data)


def test_permissions_come_from_the_vocabulary_and_stay_out_of_manifests_without_them(
    tmp_path: Path,
) -> None:
    from ww.rom.permissions import parse_allow

    src = tmp_path / "p"
    src.mkdir()
    (src / "m.py").write_text("async def main(host, args):\n    pass\n")
    base = 'name = "p"\nversion = "1"\nentry = "m:main"\n'
    (src / "rom.toml").write_text(base)
    plain = Rom.load(build_rom(src))
    assert plain.permissions == () and b"permissions" not in plain.files["manifest.json"]
    (src / "rom.toml").write_text(base + 'permissions = ["volume", "net.connect"]\n')
    asking = Rom.load(build_rom(src))
    assert asking.permissions == ("net.connect", "volume")
    for bad, message in (
        ('["net.listen"]', "unknown permission 'net.listen'"),
        ('["volume", "volume"]', "names a permission twice"),
        ('"volume"', "must be a list"),
    ):
        (src / "rom.toml").write_text(base + f"permissions = {bad}\n")
        with pytest.raises(RomError, match=message):
            build_rom(src)
    assert parse_allow("volume, net.connect") == {"volume", "net.connect"}
    assert parse_allow("none") == frozenset()
    with pytest.raises(ValueError, match="not a list of permissions"):
        parse_allow("everything")
