"""The `ww` command, run as a user runs it (a child process), where no host is needed."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def ww(
    *args: str, cwd: Path | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "ww", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        input=stdin,
        env=env,
    )


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got:\n{text}"
    return lines[0]


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A loopback port that is bound but not listening: connecting to it is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def write_rom(src: Path, body: str, name: str = "probe") -> Path:
    src.mkdir(parents=True)
    (src / "rom.toml").write_text(
        f'name = "{name}"\nversion = "0.1.0"\nentry = "{name}:main"\nrequires = []\n'
    )
    (src / f"{name}.py").write_text(body)
    return src


def test_help_lists_every_command() -> None:
    result = ww("--help")
    assert result.returncode == 0
    for command in ("start", "keygen", "ls", "pub", "sub", "build", "run", "ps", "kill", "logs"):
        assert f"    {command} " in result.stdout


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["start", "--listen", "localhost"], "'localhost' is not HOST:PORT"),
        (["start", "--meta", "novalue"], "'novalue' is not KEY=VALUE"),
        (["ls", "--dial", "127.0.0.1:99999"], "is not HOST:PORT"),
        (["kill", "seven"], "invalid int value: 'seven'"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["keygen"], "the following arguments are required: -o/--output"),
        (["run"], "the following arguments are required: ROM ("),
        (["start", "--ttl", "0"], "'0' is not a positive number of seconds"),
    ],
)
def test_bad_arguments_are_one_line_with_exit_code_2(args: list[str], complaint: str) -> None:
    result = ww(*args)
    assert result.returncode == 2
    line = one_line(result.stderr)
    assert complaint in line
    assert "--help" in line


def test_no_host_answering_is_one_line_saying_how_to_start_one(silent_port: int) -> None:
    address = f"127.0.0.1:{silent_port}"
    for command, *rest in (
        ["ls"],
        ["pub", "test", "hi"],
        ["ps"],
        ["run", str(REPO / "roms/hello")],
    ):
        result = ww(command, "--dial", address, *rest)
        assert result.returncode == 1, result.stderr
        assert one_line(result.stderr) == (
            f"ww {command}: error: no ww host at {address}; "
            "start one with `ww start` or pass --dial HOST:PORT"
        )


def test_keygen_writes_a_key_and_refuses_to_overwrite_it(tmp_path: Path) -> None:
    key = tmp_path / "cluster.key"
    assert ww("keygen", "-o", str(key)).returncode == 0
    first = key.read_bytes()
    assert first
    assert key.stat().st_mode & 0o077 == 0

    refused = ww("keygen", "-o", str(key))
    assert refused.returncode == 1
    assert one_line(refused.stderr) == (
        f"ww keygen: error: {key} already exists; pass --force to overwrite it"
    )
    assert key.read_bytes() == first

    assert ww("keygen", "-o", str(key), "--force").returncode == 0
    assert key.read_bytes() != first


def test_build_writes_a_rom_that_loads(tmp_path: Path) -> None:
    from ww.rom import Rom

    out = tmp_path / "hello.rom"
    result = ww("build", str(REPO / "roms/hello"), "-o", str(out))
    assert result.returncode == 0, result.stderr
    rom = Rom.load(out.read_bytes())
    assert rom.manifest.name == "hello"
    assert Rom.load(rom.read("inner.rom")).manifest.name == "hello-inner"


@pytest.mark.parametrize(
    ("files", "complaint"),
    [
        (None, "is not a directory"),
        ({}, "rom.toml"),
        ({"rom.toml": 'name = "x"\nentry = "x:main"\n'}, "version"),
        ({"rom.toml": "name = [unclosed\n"}, "rom.toml"),
    ],
)
def test_build_errors_are_one_line(
    tmp_path: Path, files: dict[str, str] | None, complaint: str
) -> None:
    src = tmp_path / "src"
    if files is not None:
        src.mkdir()
        for name, text in files.items():
            (src / name).write_text(text)
    result = ww("build", str(src), "-o", str(tmp_path / "out.rom"))
    assert result.returncode == 1
    line = one_line(result.stderr)
    assert line.startswith("ww build: error: ")
    assert complaint in line
    assert not (tmp_path / "out.rom").exists()


def test_run_a_file_that_is_not_a_rom_is_one_line(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.rom"
    bogus.write_bytes(b"this is not a zip archive")
    result = ww("run", "--no-dial", str(bogus))
    assert result.returncode == 1
    assert one_line(result.stderr).startswith("ww run: error: ")

    missing = ww("run", "--no-dial", str(tmp_path / "missing.rom"))
    assert missing.returncode == 1
    assert "cannot read ROM" in one_line(missing.stderr)


def test_run_without_a_host_passes_none_and_the_arguments(tmp_path: Path) -> None:
    src = write_rom(
        tmp_path / "probe",
        "async def main(host, args):\n    print('host is', host, 'args', args)\n",
    )
    result = ww("run", "--no-dial", str(src), "one", "--two")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "host is None args ['one', '--two']"


def test_hello_without_a_host_says_it_needs_one(tmp_path: Path) -> None:
    result = ww("run", "--no-dial", str(REPO / "roms/hello"))
    assert result.returncode == 1
    assert "hello needs a host" in one_line(result.stderr)
