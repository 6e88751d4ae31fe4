"""The replicated key-value map the simulated clients use, and its command encoding.

Every applied command also extends a running digest of the applied sequence, so two replicas
(or a replica and a snapshot) can be compared by one value at any index.
"""

from __future__ import annotations

import hashlib
from typing import Any

import msgpack


def encode(kind: str, key: str, *args: Any) -> bytes:
    return bytes(msgpack.packb([kind, key, *args], use_bin_type=True))


class KVStateMachine:
    def __init__(self) -> None:
        self.data: dict[str, Any] = {}
        self.digest = b""
        self.index = 0

    def apply(self, index: int, command: bytes) -> Any:
        self.digest = hashlib.blake2b(
            self.digest + index.to_bytes(8, "big") + command, digest_size=16
        ).digest()
        self.index = index
        kind, key, *args = msgpack.unpackb(command)
        if kind == "put":
            self.data[key] = args[0]
            return None
        if kind == "get":
            return self.data.get(key)
        if kind == "cas":
            expected, new = args
            if self.data.get(key) == expected:
                self.data[key] = new
                return True
            return False
        raise ValueError(f"unknown command {kind!r}")

    def snapshot(self) -> bytes:
        return bytes(msgpack.packb([self.data, self.digest, self.index], use_bin_type=True))

    def restore(self, data: bytes) -> None:
        state, self.digest, self.index = msgpack.unpackb(data)
        self.data = dict(state)
