"""Volumes: durable directories that belong to anchor paths of this host.

The volume of `/<peer id>/raft/v1` is `DATA_DIR/volumes/raft+v1`: the path below the host's
own, its names joined with `+`. Anchor names never hold a `+` (ww.host.paths), so every path
maps to its own directory, volumes never nest, and a name cannot escape the volumes directory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ww.host.paths import Parts, format_path, parse_path

NAME_MAX = 255
SEPARATOR = "+"


class VolumeError(ValueError):
    """A volume cannot be made or removed; the message is one line."""


@dataclass(frozen=True, slots=True)
class Volume:
    local: Parts  # the anchor path below the host's own, e.g. ("raft", "v1")
    path: Path


class Volumes:
    """The volumes directory of one host."""

    def __init__(self, root: Path, peer_id: str) -> None:
        self.root = root
        self.peer_id = peer_id

    def anchor_of(self, local: Parts) -> str:
        return format_path((self.peer_id, *local))

    def get(self, local: Parts) -> Volume:
        """The volume of the anchor path `local` (below the host's own); not created."""
        if not local:
            raise VolumeError(f"{self.anchor_of(local)} has no volume; spawn below it")
        name = SEPARATOR.join(local)
        if len(name.encode()) > NAME_MAX:
            raise VolumeError(
                f"anchor path {self.anchor_of(local)} is too long for a volume;"
                f" at most {NAME_MAX} characters below the host's own path"
            )
        return Volume(local, self.root / name)

    def create(self, local: Parts) -> Volume:
        volume = self.get(local)
        volume.path.mkdir(parents=True, exist_ok=True)
        return volume

    def parse(self, anchor: object) -> Parts:
        """The local parts of an absolute anchor path on this host, e.g. `/<peer>/raft/v1`."""
        parts = parse_path(anchor)  # AnchorPathError is a ValueError with one line
        if not isinstance(anchor, str) or not anchor.startswith("/"):
            raise VolumeError(f"{anchor!r} is not an absolute anchor path, /<peer id>/NAME/...")
        if not parts or parts[0] != self.peer_id:
            raise VolumeError(f"{anchor} is not on this host; its paths start /{self.peer_id}/")
        return parts[1:]

    def list(self) -> list[tuple[Volume, int]]:
        """Every volume with its size in bytes (files under it, symlinks not followed)."""
        found = []
        if not self.root.is_dir():
            return []
        for entry in sorted(self.root.iterdir()):
            if not entry.is_dir() or entry.is_symlink():
                continue
            local = tuple(entry.name.split(SEPARATOR))
            try:
                parse_path("/" + "/".join(local))
            except ValueError:
                continue  # not a volume's name
            found.append((Volume(local, entry), _size(entry)))
        return found

    def remove(self, local: Parts) -> None:
        volume = self.get(local)
        if not volume.path.is_dir():
            raise VolumeError(f"there is no volume for {self.anchor_of(local)}; `ww volumes`")
        shutil.rmtree(volume.path)


def _size(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total
