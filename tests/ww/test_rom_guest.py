"""Running a ROM in this process (`run_local`), and the guest entry point's refusals."""

from __future__ import annotations

import os
import sys
import textwrap
import types
from pathlib import Path
from typing import Any

import pytest

from ww.rom import Rom, RomError, build_rom, guest
from ww.rom.guest import EXIT_CANNOT_START, rom_data, run_local


def make_rom(root: Path, files: dict[str, str], *, entry: str = "app:main", extra: str = "") -> Rom:
    src = root / "src"
    for rel, text in files.items():
        path = src / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    (src / "rom.toml").write_text(f'name = "app"\nversion = "1"\nentry = "{entry}"\n{extra}')
    return Rom.load(build_rom(src))


async def test_main_gets_the_host_and_args_and_its_result_is_the_exit_code(tmp_path: Path) -> None:
    rom = make_rom(
        tmp_path,
        {
            "app.py": """
            async def main(host, args):
                host.append(list(args))
                return 5
            """
        },
    )
    seen: list[Any] = []
    assert await run_local(rom, ["x", "y"], seen) == 5
    assert seen == [["x", "y"]]


async def test_packages_and_relative_imports_load_from_the_archive(tmp_path: Path) -> None:
    rom = make_rom(
        tmp_path,
        {
            "pkg/__init__.py": "from .inner import VALUE\n",
            "pkg/inner.py": "VALUE = 42\n",
            "app.py": """
            import pkg

            async def main(host, args):
                host.append(pkg.VALUE)
                host.append(pkg.__file__)
                host.append(pkg.__loader__.is_package("pkg"))
                host.append(pkg.__loader__.is_package("pkg.inner"))
            """,
        },
    )
    seen: list[Any] = []
    assert await run_local(rom, [], seen) == 0
    assert seen == [42, "app.rom/src/pkg/__init__.py", True, False]


async def test_rom_modules_do_not_leak_into_the_host(tmp_path: Path) -> None:
    host_module = types.ModuleType("helper")
    host_module.WHO = "host"  # type: ignore[attr-defined]
    sys.modules["helper"] = host_module
    meta_path = list(sys.meta_path)
    try:
        rom = make_rom(
            tmp_path,
            {
                "helper.py": "WHO = 'rom'\n",
                "app.py": """
                import helper

                async def main(host, args):
                    host.append(helper.WHO)
                """,
            },
        )
        seen: list[Any] = []
        assert await run_local(rom, [], seen) == 0
        assert seen == ["rom"]
        assert sys.modules["helper"] is host_module
        assert "app" not in sys.modules
        assert sys.meta_path == meta_path
    finally:
        del sys.modules["helper"]


async def test_rom_data_reads_the_running_roms_embedded_data(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "blob.bin").write_bytes(b"\x00\x01payload")
    rom = make_rom(
        tmp_path,
        {
            "app.py": """
            from ww.rom.guest import rom_data

            async def main(host, args):
                host.append(rom_data("blob"))
            """
        },
        extra='[embed]\n"blob" = "blob.bin"\n',
    )
    seen: list[Any] = []
    assert await run_local(rom, [], seen) == 0
    assert seen == [b"\x00\x01payload"]
    with pytest.raises(RomError, match="only inside a running ROM"):
        rom_data("blob")


async def test_a_raising_main_prints_its_traceback_and_returns_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rom = make_rom(
        tmp_path,
        {"app.py": "async def main(host, args):\n    raise KeyError('lost key')\n"},
    )
    assert await run_local(rom, [], None) == 1
    err = capsys.readouterr().err
    assert "KeyError: 'lost key'" in err
    assert "raise KeyError('lost key')" in err
    assert "app.rom/src/app.py" in err


async def test_sys_exit_codes_are_kept(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rom = make_rom(
        tmp_path / "a", {"app.py": "import sys\nasync def main(h, a):\n    sys.exit(4)\n"}
    )
    assert await run_local(rom, [], None) == 4
    rom = make_rom(
        tmp_path / "b", {"app.py": "import sys\nasync def main(h, a):\n    sys.exit('bye')\n"}
    )
    assert await run_local(rom, [], None) == 1
    assert "bye" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ("def main(host, args):\n    pass\n", "not an async function"),
        ("async def other(host, args):\n    pass\n", "not an async function"),
    ],
)
async def test_an_entry_that_is_not_an_async_function_is_refused(
    tmp_path: Path, body: str, words: str
) -> None:
    rom = make_rom(tmp_path, {"app.py": body})
    with pytest.raises(RomError, match=words):
        await run_local(rom, [], None)


async def test_missing_required_package_is_refused_before_running(tmp_path: Path) -> None:
    rom = make_rom(
        tmp_path,
        {"app.py": "raise SystemExit('must not run')\nasync def main(h, a):\n    pass\n"},
        extra='requires = ["no_such_pkg_ww"]\n',
    )
    with pytest.raises(RomError, match="'no_such_pkg_ww'"):
        await run_local(rom, [], None)


def test_guest_refuses_bad_invocations_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rom = make_rom(
        tmp_path,
        {"app.py": "async def main(h, a):\n    pass\n"},
        extra='requires = ["no_such_pkg_ww"]\n',
    )
    path = tmp_path / "app.rom"
    path.write_bytes(rom.data)
    (tmp_path / "junk.rom").write_bytes(b"junk")
    runnable = make_rom(tmp_path / "ok", {"app.py": "async def main(h, a):\n    pass\n"})
    (tmp_path / "ok.rom").write_bytes(runnable.data)
    closed = os.open(os.devnull, os.O_RDONLY)
    os.close(closed)  # a descriptor number that is not open
    cases = [
        ([], "usage"),
        (["--fd", "x", str(path)], "--fd"),
        (["--fd", "9", str(tmp_path / "missing.rom")], "cannot read ROM"),
        (["--fd", "9", str(tmp_path / "junk.rom")], "not a zip"),
        (["--fd", "9", "--cid", "0" * 64, str(path)], "cache is corrupt"),
        (["--fd", "9", str(path)], "no_such_pkg_ww"),
        (["--fd", str(closed), str(tmp_path / "ok.rom")], "not an open socket"),
    ]
    for argv, words in cases:
        assert guest.main(argv) == EXIT_CANNOT_START
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err, (argv, err)


async def test_a_module_with_a_coding_line_is_decoded_as_declared(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "latin.py").write_bytes(b"# -*- coding: latin-1 -*-\nWORD = 'caf\xe9'\n")
    rom = make_rom(
        tmp_path,
        {"app.py": "import latin\nasync def main(host, args):\n    host.append(latin.WORD)\n"},
    )
    seen: list[Any] = []
    assert await run_local(rom, [], seen) == 0
    assert seen == ["café"]
