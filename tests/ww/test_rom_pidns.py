"""ww.rom_pidns: which arguments ask for a PID namespace (the forks themselves are exercised
by every sandboxed spawn in test_sandbox and test_executor)."""

from __future__ import annotations

from ww.rom_pidns import _split_pidns


def test_pidns_is_taken_out_and_the_host_fd_found() -> None:
    argv = ["--fd", "7", "--cid", "abc", "--pidns", "--rom-fd", "9", "--", "x"]
    assert _split_pidns(argv) == (7, ["--fd", "7", "--cid", "abc", "--rom-fd", "9", "--", "x"])


def test_without_pidns_the_arguments_are_left_alone() -> None:
    argv = ["--fd", "7", "--rom-fd", "9", "--", "--pidns"]
    assert _split_pidns(argv) == (None, argv)


def test_a_pidns_among_the_roms_own_arguments_is_the_roms() -> None:
    argv = ["--fd", "7", "rom.zip", "--pidns"]
    assert _split_pidns(argv) == (None, argv)
