"""`python -m ww.rom_pidns ARGS`: `python -m ww.rom.guest ARGS` that forks its two waiters first.

With `--pidns` a ROM runs two forks below the process the host started (see
`enter_pid_namespace`). The waiters left above it are copies of that process, so they are
forked here, before anything but the few stdlib modules they need is imported: each is then
about half the resident size of a copy made after `ww.rom` is imported. Then the guest runs.
This module lives outside the `ww.rom` package because importing that package is what it
avoids.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import sys
from collections.abc import Sequence

__all__ = ["enter_pid_namespace", "main"]

_VALUED = ("--fd", "--rom-fd", "--cid", "--volume", "--home", "--landlock")


def enter_pid_namespace(host_fd: int) -> None:
    """Run the ROM in the PID namespace the host made for this process's children (`--pidns`).

    A process that unshared its PID namespace cannot start threads (clone answers EINVAL), and
    trio needs them (name resolution, `to_thread`), so the ROM runs two forks down: this
    process forks the namespace's init, which forks the ROM's process and reaps whatever is
    orphaned in the namespace. When the ROM's process ends, the init hands its wait status up
    through a pipe and exits, and the kernel kills everything left in the namespace, so nothing
    the ROM started outlives it. This process then exits as the ROM did (killed by the same
    signal, or with the same code). Both waiters ignore the signals the host stops a process
    with: they reach the ROM through its process group, and a SIGKILL takes all three."""
    parent = os.pidfd_open(os.getpid())
    status_r, status_w = os.pipe()
    if os.fork():
        os.close(status_w)
        os.close(parent)
        os.close(host_fd)
        _ignore_stop_signals()
        status = _read_all(status_r)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(-1, 0)
        code = os.waitstatus_to_exitcode(int.from_bytes(status, "big")) if status else 1
        if code < 0:
            signal.signal(-code, signal.SIG_DFL)
            os.kill(os.getpid(), -code)
        os._exit(code)
    # The namespace's init: pid 1 there.
    os.close(status_r)
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    if select.select([parent], [], [], 0)[0]:  # the waiter ended before that was set
        os._exit(1)
    os.close(parent)
    rom = os.fork()
    if rom == 0:
        os.close(status_w)
        return
    try:
        os.close(host_fd)
        _ignore_stop_signals()
        while True:
            pid, wait_status = os.waitpid(-1, 0)
            if pid == rom:
                os.write(status_w, wait_status.to_bytes(4, "big"))
                break
    finally:
        os._exit(0)


def _ignore_stop_signals() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 64):
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks)


def _split_pidns(argv: Sequence[str]) -> tuple[int | None, list[str]]:
    """The host socket's FD when the options ask for `--pidns` (else None), and the arguments
    without `--pidns`. Only the options before the ROM (file or `--`) are looked at."""
    rest = list(argv)
    fd: int | None = None
    pidns = False
    i = 0
    while i < len(rest):
        if rest[i] == "--pidns":
            pidns = True
            del rest[i]
        elif rest[i] in _VALUED and i + 1 < len(rest):
            if rest[i] == "--fd" and rest[i + 1].isdigit():
                fd = int(rest[i + 1])
            i += 2
        else:
            break
    return (fd if pidns else None), (rest if pidns else list(argv))


def main() -> int:
    fd, argv = _split_pidns(sys.argv[1:])
    if fd is not None:
        enter_pid_namespace(fd)
    from ww.rom.guest import main as guest_main

    return guest_main(argv)


if __name__ == "__main__":
    sys.exit(main())
