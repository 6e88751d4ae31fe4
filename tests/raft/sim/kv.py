"""The replicated key-value map the simulated clients use, and its command encoding.

Raft applies a proposal at least once: a forwarded proposal that the network duplicates is
appended twice, as in etcd. So, as any application of the library must, a command that must
take effect once carries a unique id, and the map answers a repeated id with the result it gave
the first time (the table of answers is part of the snapshot).

Every applied entry also extends a running digest of the applied sequence, so two replicas (or
a replica and a snapshot) can be compared by one value at any index.
"""

from __future__ import annotations

import hashlib
from typing import Any

import msgpack


def encode(kind: str, key: str, *args: Any, op_id: int | None = None) -> bytes:
    """A command; with an `op_id` it takes effect once however often it is applied."""
    return bytes(msgpack.packb([op_id, kind, key, *args], use_bin_type=True))


class KVStateMachine:
    def __init__(self) -> None:
        self.data: dict[str, Any] = {}
        self.answers: dict[int, Any] = {}
        self.digest = b""
        self.index = 0

    def apply(self, index: int, command: bytes) -> Any:
        self.digest = hashlib.blake2b(
            self.digest + index.to_bytes(8, "big") + command, digest_size=16
        ).digest()
        self.index = index
        op_id, kind, key, *args = msgpack.unpackb(command)
        if op_id is not None and op_id in self.answers:
            return self.answers[op_id]
        result = self._execute(kind, key, args)
        if op_id is not None:
            self.answers[op_id] = result
        return result

    def _execute(self, kind: str, key: str, args: list[Any]) -> Any:
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
        state = [self.data, self.answers, self.digest, self.index]
        return bytes(msgpack.packb(state, use_bin_type=True))

    def restore(self, data: bytes) -> None:
        state, answers, self.digest, self.index = msgpack.unpackb(data, strict_map_key=False)
        self.data = dict(state)
        self.answers = dict(answers)
