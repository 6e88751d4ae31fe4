"""ROMs: programs shipped to hosts as one file.

A ROM is a zip archive laid out as

    manifest.json      name, version, entry "module:function", requires, modules, data
    src/<path>.py      the ROM's own modules (importable by their dotted names)
    data/<name>        embedded data, e.g. an inner ROM carried by an outer one

`build_rom(src_dir)` builds one from a source directory holding `rom.toml` and the modules.
Builds are deterministic (fixed timestamps and modes, sorted names), so the content id
(`Rom.cid`, the sha256 of the file) is stable. `Rom.load(data)` validates an archive before
anything uses it: layout, names, manifest, and sizes measured on the decompressed bytes.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import re
import stat
import sys
import tomllib
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ww.rom.permissions import check_permissions

__all__ = [
    "MAX_FILES",
    "MAX_FILE_BYTES",
    "MAX_ROM_BYTES",
    "MAX_TOTAL_BYTES",
    "Manifest",
    "Rom",
    "RomError",
    "build_rom",
    "build_rom_file",
]

MAX_ROM_BYTES = 64 * 1024 * 1024  # the archive itself
MAX_TOTAL_BYTES = 64 * 1024 * 1024  # all members, decompressed
MAX_FILE_BYTES = 16 * 1024 * 1024  # one member, decompressed
MAX_FILES = 1024
MAX_MANIFEST_BYTES = 64 * 1024
MAX_NAME_LENGTH = 255
MAX_EMBED_DEPTH = 8
FORMAT = 1

MANIFEST = "manifest.json"
SRC = "src/"
DATA = "data/"

_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
_CHUNK = 64 * 1024

_ROM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_DOTTED = re.compile(rf"{_IDENT}(\.{_IDENT})*")
_ENTRY = re.compile(rf"(?P<module>{_IDENT}(\.{_IDENT})*):(?P<function>{_IDENT})")
_SEGMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
_SOURCE_KEYS = {"name", "version", "entry", "requires", "embed", "permissions"}


class RomError(Exception):
    """A ROM (or its source) is unusable. str() is one line: what is wrong and what to do."""


@dataclass(frozen=True, slots=True)
class Manifest:
    """What a ROM says about itself (`manifest.json`)."""

    name: str
    version: str
    entry: str
    requires: tuple[str, ...] = ()
    modules: tuple[str, ...] = ()  # paths under src/, e.g. "hello.py", "pkg/__init__.py"
    data: tuple[str, ...] = ()  # names under data/, e.g. "inner.rom"
    format: int = FORMAT
    permissions: tuple[str, ...] = ()  # what it may touch besides capabilities (ww.rom.permissions)

    @property
    def entry_module(self) -> str:
        return self.entry.partition(":")[0]

    @property
    def entry_function(self) -> str:
        return self.entry.partition(":")[2]

    def to_json(self) -> bytes:
        doc = {
            "format": self.format,
            "name": self.name,
            "version": self.version,
            "entry": self.entry,
            "requires": list(self.requires),
            "modules": list(self.modules),
            "data": list(self.data),
        }
        if self.permissions:  # left out when empty, so older ROMs keep their content ids
            doc["permissions"] = list(self.permissions)
        return json.dumps(doc, sort_keys=True, indent=1).encode() + b"\n"

    @classmethod
    def from_json(cls, raw: bytes) -> Manifest:
        try:
            doc = json.loads(raw)
        except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, or nested too deep
            raise RomError(f"{MANIFEST} is not valid JSON ({exc}); rebuild the ROM") from None
        if not isinstance(doc, dict):
            raise RomError(f"{MANIFEST} must be a JSON object; rebuild the ROM")
        fmt = doc.get("format")
        if fmt != FORMAT:
            raise RomError(
                f"{MANIFEST}: format {fmt!r} is not supported (this host reads format {FORMAT}); "
                "rebuild the ROM with this version of ww"
            )
        return cls(
            name=_name_field(doc.get("name"), MANIFEST),
            version=_version_field(doc.get("version"), MANIFEST),
            entry=_entry_field(doc.get("entry"), MANIFEST),
            requires=_requires_field(doc.get("requires"), MANIFEST),
            modules=_str_list(doc.get("modules"), "modules", MANIFEST),
            data=_str_list(doc.get("data"), "data", MANIFEST),
            permissions=_permissions_field(doc.get("permissions"), MANIFEST),
        )


@dataclass(frozen=True, slots=True, eq=False)
class Rom:
    """A validated ROM. Build one with `Rom.load(data)`."""

    data: bytes = field(repr=False)
    cid: str  # sha256 hex of `data`
    manifest: Manifest
    files: Mapping[str, bytes] = field(repr=False)  # every member, decompressed, by name

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def permissions(self) -> tuple[str, ...]:
        """What it asks to touch besides its capabilities (see ww.rom.permissions)."""
        return self.manifest.permissions

    @classmethod
    def load(cls, data: bytes) -> Rom:
        """Validate `data` as a ROM archive; raise RomError (one line) if it is not one."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise RomError(f"a ROM is bytes, not {type(data).__name__}")
        data = bytes(data)
        if len(data) > MAX_ROM_BYTES:
            raise RomError(
                f"ROM is {len(data)} bytes, over the {MAX_ROM_BYTES} byte limit; make it smaller"
            )
        files = _read_archive(data)
        raw = files.get(MANIFEST)
        if raw is None:
            raise RomError(f"ROM has no {MANIFEST}; build it with `ww build DIR -o FILE.rom`")
        if len(raw) > MAX_MANIFEST_BYTES:
            raise RomError(f"{MANIFEST} is over {MAX_MANIFEST_BYTES} bytes; rebuild the ROM")
        manifest = Manifest.from_json(raw)
        _check_contents(manifest, files)
        return cls(data, hashlib.sha256(data).hexdigest(), manifest, MappingProxyType(files))

    def read(self, name: str) -> bytes:
        """Data embedded under `name` (e.g. an inner ROM)."""
        found = self.files.get(DATA + name) if isinstance(name, str) else None
        if found is None:
            have = ", ".join(self.manifest.data) or "none"
            raise RomError(f"ROM {self.name!r} has no embedded data {name!r} (it has: {have})")
        return found

    def find_module(self, fullname: str) -> tuple[str, bool] | None:
        """(path under src/, is_package) of a module of this ROM, or None."""
        base = fullname.replace(".", "/")
        for path, is_package in ((base + "/__init__.py", True), (base + ".py", False)):
            if SRC + path in self.files:
                return path, is_package
        return None

    def source(self, path: str) -> bytes:
        """The source of the module at `path` under src/."""
        return self.files[SRC + path]

    def top_level_modules(self) -> set[str]:
        return {m.split("/")[0].removesuffix(".py") for m in self.manifest.modules}

    def check_requires(self) -> None:
        """Raise RomError naming the first required package this Python cannot import."""
        for package in self.manifest.requires:
            try:
                found = importlib.util.find_spec(package) is not None
            except (ImportError, ValueError):
                found = False
            if not found:
                raise RomError(
                    f"ROM {self.name!r} requires the Python package {package!r}, which is not "
                    f"installed here; install it (pip install {package}) and run it again"
                )


# -------------------------------------------------------------------------------------------
# Reading and validating an archive


def _read_archive(data: bytes) -> dict[str, bytes]:
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except Exception:  # zipfile raises many kinds (BadZipFile, NotImplementedError, ...)
        raise RomError(
            "not a ROM: the data is not a zip archive; build one with `ww build DIR -o FILE.rom`"
        ) from None
    with zf:
        infos = zf.infolist()
        if len(infos) > MAX_FILES:
            raise RomError(f"ROM has {len(infos)} files, over the limit of {MAX_FILES}")
        declared = 0
        seen: set[str] = set()
        for info in infos:
            _check_member(info)
            if info.filename in seen:
                raise RomError(f"ROM has two members named {info.filename!r}; rebuild it")
            seen.add(info.filename)
            declared += info.file_size
        if declared > MAX_TOTAL_BYTES:
            raise RomError(
                f"ROM unpacks to {declared} bytes, over the {MAX_TOTAL_BYTES} byte limit"
            )
        files: dict[str, bytes] = {}
        total = 0
        for info in infos:
            content = _read_member(zf, info, MAX_TOTAL_BYTES - total)
            total += len(content)
            files[info.filename] = content
        return files


def _check_member(info: zipfile.ZipInfo) -> None:
    name = info.filename
    _check_name(name)
    if not (name == MANIFEST or name.startswith(SRC) or name.startswith(DATA)):
        raise RomError(
            f"ROM member {name!r} is outside its layout ({MANIFEST}, {SRC}, {DATA}); rebuild it"
        )
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        raise RomError(f"ROM member {name!r} is a symbolic link, which ROMs may not contain")
    if stat.S_IFMT(mode) not in (0, stat.S_IFREG):
        raise RomError(f"ROM member {name!r} is not a regular file")
    if info.flag_bits & 0x1:
        raise RomError(f"ROM member {name!r} is encrypted, which ROMs may not be")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise RomError(
            f"ROM member {name!r} uses compression method {info.compress_type}; "
            "only stored and deflated members are allowed"
        )
    if info.file_size > MAX_FILE_BYTES:
        raise RomError(
            f"ROM member {name!r} unpacks to {info.file_size} bytes, over the "
            f"{MAX_FILE_BYTES} byte per-file limit"
        )


def _check_name(name: str) -> None:
    """Refuse names that could escape an extraction directory or that we never write."""
    if not name or len(name) > MAX_NAME_LENGTH:
        raise RomError(f"ROM member name {name[:40]!r}... is empty or too long")
    if name.startswith("/") or "\\" in name or ":" in name or "\x00" in name:
        raise RomError(
            f"ROM member name {name!r} is absolute or has a backslash, colon or NUL; "
            "ROMs hold relative paths only"
        )
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise RomError(
            f"ROM member name {name!r} has an empty, '.' or '..' segment (or is a directory); "
            "ROMs hold plain relative file paths only"
        )


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, budget: int) -> bytes:
    """Decompress one member, counting the bytes actually produced (headers can lie)."""
    limit = min(MAX_FILE_BYTES, budget)
    out = bytearray()
    try:
        with zf.open(info) as member:
            while chunk := member.read(_CHUNK):
                out += chunk
                if len(out) > limit:
                    raise RomError(
                        f"ROM member {info.filename!r} unpacks past the size limit "
                        f"({MAX_FILE_BYTES} per file, {MAX_TOTAL_BYTES} in all)"
                    )
    except RomError:
        raise
    except Exception:  # BadZipFile, zlib.error, EOFError, NotImplementedError, ...
        raise RomError(
            f"ROM member {info.filename!r} is corrupt (bad data or checksum); rebuild the ROM"
        ) from None
    if len(out) != info.file_size:
        raise RomError(f"ROM member {info.filename!r} does not match its declared size")
    return bytes(out)


def _check_contents(manifest: Manifest, files: Mapping[str, bytes]) -> None:
    modules = sorted(n[len(SRC) :] for n in files if n.startswith(SRC))
    data = sorted(n[len(DATA) :] for n in files if n.startswith(DATA))
    if sorted(manifest.modules) != modules:
        raise RomError(
            f"{MANIFEST} lists modules {sorted(manifest.modules)} but the archive holds "
            f"{modules}; rebuild the ROM"
        )
    if sorted(manifest.data) != data:
        raise RomError(
            f"{MANIFEST} lists data {sorted(manifest.data)} but the archive holds {data}; "
            "rebuild the ROM"
        )
    for path in modules:
        _check_module_path(path, MANIFEST)
    entry = manifest.entry_module.replace(".", "/")
    if entry + ".py" not in modules and entry + "/__init__.py" not in modules:
        raise RomError(
            f"entry {manifest.entry!r}: module {manifest.entry_module!r} is not in the ROM "
            f"(modules: {', '.join(modules) or 'none'}); fix entry in rom.toml"
        )


def _check_module_path(path: str, where: str) -> None:
    parts = path.removesuffix(".py").split("/")
    if not path.endswith(".py") or not all(re.fullmatch(_IDENT, p) for p in parts):
        raise RomError(
            f"{where}: module file {path!r} is not importable; module and package names must "
            "be Python identifiers ending in .py"
        )
    top = parts[0]
    if top == "__init__" or top in sys.stdlib_module_names or top == "ww":
        raise RomError(
            f"{where}: module {top!r} would shadow {'ww' if top == 'ww' else 'a standard module'}"
            "; rename it"
        )


# -------------------------------------------------------------------------------------------
# Manifest fields (shared by manifest.json and rom.toml)


def _name_field(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _ROM_NAME.fullmatch(value):
        raise RomError(
            f"{where}: 'name' must be a string of letters, digits, '.', '_' or '-' "
            f'(up to 64, e.g. name = "hello"), not {value!r}'
        )
    return value


def _version_field(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value or len(value) > 64 or not value.isprintable():
        raise RomError(f"{where}: 'version' must be a short string (e.g. version = \"0.1.0\")")
    return value


def _entry_field(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _ENTRY.fullmatch(value):
        raise RomError(
            f'{where}: \'entry\' must be "module:function" (e.g. entry = "hello:main"), '
            f"not {value!r}"
        )
    return value


def _requires_field(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(
        isinstance(v, str) and _DOTTED.fullmatch(v) for v in value
    ):
        raise RomError(
            f"{where}: 'requires' must be a list of importable package names "
            f'(e.g. requires = ["trio"]), not {value!r}'
        )
    return tuple(value)


def _permissions_field(value: Any, where: str) -> tuple[str, ...]:
    try:
        return check_permissions(value, where)
    except ValueError as exc:
        raise RomError(str(exc)) from None


def _str_list(value: Any, key: str, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RomError(f"{where}: {key!r} must be a list of strings; rebuild the ROM")
    return tuple(value)


# -------------------------------------------------------------------------------------------
# Building


def build_rom(src_dir: str | Path) -> bytes:
    """Build the ROM described by `src_dir/rom.toml`; returns the archive's bytes."""
    return _build(Path(src_dir), ())


def build_rom_file(src_dir: str | Path, out_path: str | Path) -> str:
    """Build a ROM and write it to `out_path` (atomically); returns its content id."""
    data = build_rom(src_dir)
    out = Path(out_path)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise RomError(f"cannot write {out}: {exc.strerror or exc}") from None
    return hashlib.sha256(data).hexdigest()


def _build(src: Path, building: tuple[Path, ...]) -> bytes:
    src = src.resolve()
    if src in building:
        chain = " -> ".join(str(p) for p in (*building, src))
        raise RomError(f"ROM embeds itself ({chain}); remove the cycle from [embed]")
    if len(building) >= MAX_EMBED_DEPTH:
        raise RomError(f"{src}: ROMs nest more than {MAX_EMBED_DEPTH} deep; flatten [embed]")
    toml_path = src / "rom.toml"
    try:
        source = tomllib.loads(toml_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RomError(f"{toml_path} not found; a ROM source directory needs a rom.toml") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RomError(f"cannot read {toml_path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise RomError(f"{toml_path} is not valid TOML: {exc}") from None
    where = str(toml_path)
    unknown = sorted(set(source) - _SOURCE_KEYS)
    if unknown:
        raise RomError(
            f"{where}: unknown key(s) {', '.join(unknown)}; "
            f"allowed: {', '.join(sorted(_SOURCE_KEYS))}"
        )
    for key in ("name", "version", "entry"):
        if key not in source:
            raise RomError(f"{where}: missing {key!r} (see docs/roms.md)")

    embed = source.get("embed", {})
    if not isinstance(embed, dict) or not all(isinstance(v, str) for v in embed.values()):
        raise RomError(
            f'{where}: [embed] must map data names to paths (e.g. "inner.rom" = "inner")'
        )
    data: dict[str, bytes] = {}
    embedded_dirs: set[Path] = set()
    for data_name, rel in sorted(embed.items()):
        try:
            _check_name(data_name)
        except RomError as exc:
            raise RomError(f"{where}: [embed] name {data_name!r} is not usable: {exc}") from None
        target = (src / rel).resolve()
        if target.is_dir():
            data[data_name] = _build(target, (*building, src))
            embedded_dirs.add(target)
        elif target.is_file():
            data[data_name] = target.read_bytes()
        else:
            raise RomError(f"{where}: [embed] {data_name!r} = {rel!r}: no such file or directory")

    modules = _collect_modules(src, embedded_dirs)
    manifest = Manifest(
        name=_name_field(source["name"], where),
        version=_version_field(source["version"], where),
        entry=_entry_field(source["entry"], where),
        requires=_requires_field(source.get("requires"), where),
        permissions=_permissions_field(source.get("permissions"), where),
        modules=tuple(sorted(modules)),
        data=tuple(sorted(data)),
    )
    members = {SRC + k: v for k, v in modules.items()}
    members.update({DATA + k: v for k, v in data.items()})
    archive = _write_archive(manifest, members)
    try:
        Rom.load(archive)
    except RomError as exc:
        raise RomError(f"{src}: {exc}") from None
    return archive


def _collect_modules(src: Path, skip: set[Path]) -> dict[str, bytes]:
    """Every .py file under `src`, except in hidden, cache, embedded, nested ROM or
    symlinked directories."""
    modules: dict[str, bytes] = {}

    def walk(directory: Path) -> None:
        for entry in sorted(directory.iterdir()):
            if entry.name.startswith(".") or entry.name == "__pycache__":
                continue
            if entry.is_dir():
                if entry.is_symlink() or entry.resolve() in skip or (entry / "rom.toml").exists():
                    continue  # symlinked directories are not followed (no loops, no escapes)
                walk(entry)
            elif entry.suffix == ".py" and entry.is_file():
                rel = entry.relative_to(src).as_posix()
                _check_module_path(rel, str(src))
                modules[rel] = entry.read_bytes()

    walk(src)
    return modules


def _write_archive(manifest: Manifest, members: Mapping[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, content in [(MANIFEST, manifest.to_json()), *sorted(members.items())]:
            info = zipfile.ZipInfo(name, date_time=_ZIP_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.create_system = 3
            info.external_attr = (stat.S_IFREG | 0o644) << 16
            zf.writestr(info, content, compresslevel=6)
    return buf.getvalue()
