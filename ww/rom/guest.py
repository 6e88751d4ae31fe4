"""The guest side: run a ROM's `async def main(host, args)`.

A host spawns each ROM as `python -m ww.rom.guest --fd FD [--cid CID] [--volume DIR]
[--home PATH] [--landlock RULES] (--rom-fd FD | ROM_FILE) [-- ARGS...]` (or, when it made a
PID namespace for the child's children, as `python -m ww.rom_pidns --pidns ...`, which runs the
guest two forks down, in that namespace). With `--landlock` it confines that process by the
host's Landlock rules before anything else. The guest validates the ROM, checks its
`requires`, makes its modules importable from the validated archive (in memory, nothing is
extracted), opens a capability connection over the inherited socket FD and calls `main` with
the host's bootstrap capability (a `Ref`).

Exit codes: 0 when main returns None, the value when it returns an int, the code of
`sys.exit(n)`, 1 (traceback on stderr) when it raises or when the host hangs up before main
returns (main is cancelled), 2 (one line on stderr) when the ROM cannot be started at all
(unreadable, invalid, a required package missing).

`run_local(rom, args, host)` runs a ROM in the current process instead (`ww run`).
Inside a running ROM, `rom_data(name)` returns data embedded in it, e.g. an inner ROM;
`volume()` its durable directory and `home()` the anchor path it was spawned at (None when
not given: `--volume DIR`, `--home PATH`).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import inspect
import logging
import socket
import sys
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from ww.rom.archive import Rom, RomError

__all__ = ["EXIT_CANNOT_START", "current_rom", "home", "main", "rom_data", "run_local", "volume"]

EXIT_CANNOT_START = 2

_current: ContextVar[Rom | None] = ContextVar("ww_current_rom", default=None)
_volume: Path | None = None
_home: str | None = None


def current_rom() -> Rom | None:
    """The ROM running in this context, if any."""
    return _current.get()


def rom_data(name: str) -> bytes:
    """Data embedded in the running ROM under `name` (its `[embed]` table)."""
    rom = _current.get()
    if rom is None:
        raise RomError("rom_data() works only inside a running ROM (ww run, or spawned on a host)")
    return rom.read(name)


def volume() -> Path | None:
    """The process's durable directory (spawned with volume=True), or None without one.

    It belongs to the anchor path the process was spawned at, survives process and host
    restarts, and is held by one live process at a time."""
    return _volume


def home() -> str | None:
    """The anchor path this process was spawned at (`/<peer id>/raft/v1`), or None when it was
    spawned with Host.spawn or runs under `ww run`."""
    return _home


# -------------------------------------------------------------------------------------------
# Importing a ROM's modules from the validated archive


@dataclass(frozen=True, slots=True, eq=False)
class _RomFinder(importlib.abc.MetaPathFinder, importlib.abc.InspectLoader):
    """Finds and loads the modules of one ROM from its in-memory archive."""

    rom: Rom

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        found = self.rom.find_module(fullname)
        if found is None:
            return None
        relpath, is_package = found
        spec = importlib.util.spec_from_loader(
            fullname, self, origin=f"{self.rom.name}.rom/src/{relpath}", is_package=is_package
        )
        if spec is not None:
            spec.has_location = True  # sets __file__, which tracebacks show
        return spec

    def get_source(self, fullname: str) -> str:
        found = self.rom.find_module(fullname)
        if found is None:
            raise ImportError(f"{fullname} is not a module of ROM {self.rom.name!r}")
        return importlib.util.decode_source(self.rom.source(found[0]))

    def is_package(self, fullname: str) -> bool:
        found = self.rom.find_module(fullname)
        if found is None:
            raise ImportError(f"{fullname} is not a module of ROM {self.rom.name!r}")
        return found[1]

    def exec_module(self, module: ModuleType) -> None:
        spec = module.__spec__
        found = self.rom.find_module(module.__name__)
        if spec is None or spec.origin is None or found is None:
            raise ImportError(f"{module.__name__} is not a module of ROM {self.rom.name!r}")
        # Compiled from bytes, so a PEP 263 coding line is honoured as for any module.
        exec(compile(self.rom.source(found[0]), spec.origin, "exec"), module.__dict__)


@contextmanager
def _modules_of(rom: Rom) -> Iterator[None]:
    """Make the ROM's modules importable; afterwards, forget them and restore what they hid."""
    tops = rom.top_level_modules()

    def ours(name: str) -> bool:
        return name.partition(".")[0] in tops

    hidden = {name: mod for name, mod in sys.modules.items() if ours(name)}
    for name in hidden:
        del sys.modules[name]
    finder = _RomFinder(rom)
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)
        for name in [n for n in sys.modules if ours(n)]:
            del sys.modules[name]
        sys.modules.update(hidden)


def _entry(rom: Rom) -> Any:
    """Import the entry module and return the entry function (user code runs here)."""
    module = importlib.import_module(rom.manifest.entry_module)
    function = getattr(module, rom.manifest.entry_function, None)
    if not inspect.iscoroutinefunction(function):
        raise RomError(
            f"ROM {rom.name!r}: entry {rom.manifest.entry!r} is not an async function; "
            "define `async def main(host, args)`"
        )
    return function


def _exit_code(code: object) -> int:
    """What Python's own sys.exit does with `code`."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


async def run_local(rom: Rom, args: Sequence[str], host: Any) -> int:
    """Run `rom` in this process with `host` (a Ref, or None); returns its exit code.

    Raises RomError when the ROM cannot start (a required package missing, no such entry).
    When main raises, its traceback goes to stderr and the result is 1.
    """
    rom.check_requires()
    token = _current.set(rom)
    try:
        with _modules_of(rom):
            try:
                function = _entry(rom)
                result = await function(host, list(args))
            except RomError:
                raise
            except SystemExit as exc:
                return _exit_code(exc.code)
            except Exception:
                traceback.print_exc()
                return 1
            return result if isinstance(result, int) and not isinstance(result, bool) else 0
    finally:
        _current.reset(token)


# -------------------------------------------------------------------------------------------
# The child process


@dataclass(frozen=True, slots=True)
class _Invocation:
    fd: int
    cid: str | None
    path: Path | None  # the ROM file, or None when it comes as an open file (rom_fd)
    args: list[str]
    volume: Path | None = None
    home: str | None = None
    rom_fd: int | None = None
    landlock: str | None = None


_USAGE = (
    "usage: python -m ww.rom.guest --fd FD [--cid CID] [--volume DIR] [--home PATH]"
    " [--landlock RULES] (--rom-fd FD | ROM_FILE) [-- ARGS...]"
)
_OPTIONS = ("--fd", "--rom-fd", "--cid", "--volume", "--home", "--landlock")


def _parse(argv: Sequence[str]) -> _Invocation:
    fd: int | None = None
    rom_fd: int | None = None
    cid: str | None = None
    volume: Path | None = None
    home: str | None = None
    landlock: str | None = None
    rest = list(argv)
    while rest and rest[0] in _OPTIONS:
        if len(rest) < 2:
            raise RomError(_USAGE)
        flag, value, rest = rest[0], rest[1], rest[2:]
        if flag in ("--fd", "--rom-fd"):
            if not value.isdigit():
                raise RomError(f"{flag} wants a file descriptor number, not {value!r}")
            if flag == "--fd":
                fd = int(value)
            else:
                rom_fd = int(value)
        elif flag == "--cid":
            cid = value
        elif flag == "--volume":
            volume = Path(value)
        elif flag == "--landlock":
            landlock = value
        else:
            home = value
    path: Path | None = None
    if rom_fd is None and rest and rest[0] != "--":
        path, rest = Path(rest[0]), rest[1:]
    if fd is None or (path is None and rom_fd is None):
        raise RomError(_USAGE)
    if rest and rest[0] == "--":
        rest = rest[1:]
    return _Invocation(fd, cid, path, rest, volume, home, rom_fd, landlock)


def _load(invocation: _Invocation) -> Rom:
    where = f"--rom-fd {invocation.rom_fd}" if invocation.path is None else invocation.path
    try:
        if invocation.path is not None:
            data = invocation.path.read_bytes()
        else:
            assert invocation.rom_fd is not None
            with open(invocation.rom_fd, "rb") as f:
                data = f.read()
    except OSError as exc:
        raise RomError(f"cannot read ROM {where}: {exc.strerror or exc}") from None
    rom = Rom.load(data)
    if invocation.cid is not None and rom.cid != invocation.cid:
        raise RomError(f"ROM {where} is not {invocation.cid} (the cache is corrupt)")
    rom.check_requires()
    return rom


def _confine(rules: str) -> None:
    """Apply the host's Landlock rules to this process, the ROM's, before any of its code."""
    from ww.rom.sandbox import SandboxError, apply_landlock

    try:
        apply_landlock(rules)
    except SandboxError as exc:
        raise RomError(str(exc)) from None


def _host_socket(fd: int) -> socket.socket:
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise RomError(f"--fd {fd} is not an open socket ({exc.strerror or exc})") from None
    if sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise RomError(f"--fd {fd} is not a stream socket")
    return sock


async def _serve(rom: Rom, args: list[str], sock: socket.socket) -> int:
    import trio

    from ww.rpc import Connection

    stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
    code: int | None = None
    async with Connection.open(stream) as conn, trio.open_nursery() as nursery:

        async def stop_when_the_host_hangs_up() -> None:
            await conn.closed.wait()
            nursery.cancel_scope.cancel()

        nursery.start_soon(stop_when_the_host_hangs_up)
        try:
            code = await run_local(rom, args, conn.bootstrap())
        except RomError as exc:
            print(f"ww.rom.guest: {exc}", file=sys.stderr)
            code = EXIT_CANNOT_START
        nursery.cancel_scope.cancel()
    if code is None:
        reason = conn.close_reason or "closed"
        print(
            f"ww.rom.guest: the connection to the host ended ({reason}); stopping", file=sys.stderr
        )
        return 1
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m ww.rom.guest`; returns the exit code."""
    try:
        invocation = _parse(sys.argv[1:] if argv is None else argv)
        if invocation.landlock is not None:
            _confine(invocation.landlock)
        rom = _load(invocation)
        sock = _host_socket(invocation.fd)
    except RomError as exc:
        print(f"ww.rom.guest: {exc}", file=sys.stderr)
        return EXIT_CANNOT_START
    global _volume, _home
    _volume, _home = invocation.volume, invocation.home
    sys.argv = [f"{rom.name}.rom", *invocation.args]
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    import trio

    try:
        return trio.run(_serve, rom, invocation.args, sock)
    finally:
        sys.stdout.flush()


if __name__ == "__main__":
    # Run the imported module, not this __main__ copy, so that ROM code importing
    # ww.rom.guest (rom_data) shares its state.
    from ww.rom.guest import main as _main

    sys.exit(_main())
