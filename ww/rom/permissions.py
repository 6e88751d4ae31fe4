"""Permissions: what a ROM may touch besides the capabilities it is handed.

A ROM asks for them in its manifest (`permissions = ["net.connect", "volume"]` in rom.toml); a
host grants at most what its own `--allow` says; the kernel enforces what was granted
(ww.rom.sandbox). The vocabulary is small and fixed:

* ``net.connect`` -- open TCP connections to any address and port (and resolve names);
* ``volume`` -- read and write its durable volume, when spawned at an anchor with
  `volume=True` (without it such a spawn is refused).

Everything else is denied: no file outside the Python installation is readable, nothing
but the volume and a private temporary directory is writable, and no socket can be bound.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["NET_CONNECT", "PERMISSIONS", "VOLUME", "describe", "parse_allow", "refusal"]

NET_CONNECT = "net.connect"
VOLUME = "volume"

PERMISSIONS: dict[str, str] = {
    NET_CONNECT: "open TCP connections to any address",
    VOLUME: "read and write its durable volume",
}
"""Every permission there is, with what it allows."""


def check_permissions(value: object, where: str) -> tuple[str, ...]:
    """The permissions a manifest asks for, sorted; ValueError (one line) for a bad list."""
    if value is None:
        return ()
    known = ", ".join(PERMISSIONS)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(
            f"{where}: 'permissions' must be a list of strings from: {known} "
            f'(e.g. permissions = ["net.connect"]), not {value!r}'
        )
    for name in value:
        if name not in PERMISSIONS:
            raise ValueError(f"{where}: unknown permission {name!r}; the permissions are: {known}")
    if len(set(value)) != len(value):
        raise ValueError(f"{where}: 'permissions' names a permission twice: {value!r}")
    return tuple(sorted(value))


def parse_allow(text: str) -> frozenset[str]:
    """`--allow net.connect,volume` (or `none`) as a set; ValueError (one line) otherwise."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if names == ["none"]:
        return frozenset()
    unknown = [n for n in names if n not in PERMISSIONS]
    if unknown or not names:
        raise ValueError(
            f"{text!r} is not a list of permissions; pass a comma-separated list of "
            f"{', '.join(PERMISSIONS)}, or none"
        )
    return frozenset(names)


def describe(name: str, asked: Iterable[str]) -> str:
    """One line: what ROM `name` asks for."""
    asked = sorted(asked)
    if not asked:
        return f"ROM {name!r} asks for no permissions"
    return f"ROM {name!r} asks for permissions: {', '.join(asked)}"


def refusal(name: str, asked: Iterable[str], granted: Iterable[str]) -> str | None:
    """Why a host that grants `granted` refuses ROM `name` asking for `asked`; None if it may
    run."""
    granted = set(granted)
    for permission in sorted(asked):
        if permission not in granted:
            allowed = ",".join(sorted(granted)) or "none"
            return (
                f"ROM {name!r} asks for permission {permission!r}, which this host does not "
                f"grant (it allows: {allowed}); start the host with --allow including "
                f"{permission}"
            )
    return None
