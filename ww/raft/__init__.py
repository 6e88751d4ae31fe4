"""A Raft library in the style of etcd's raft: a protocol core without I/O.

`RawNode` is the entry point: feed it ticks, messages and proposals; take `Ready`s that say
what to persist, send and apply; call `advance`. `MemoryStorage` is an in-memory storage;
`ww.raft.types` holds the records (entries, messages, snapshots) and their msgpack encoding.
"""

from ww.raft.core import Config, StateType, Stats
from ww.raft.errors import (
    ConfChangeError,
    ConfigError,
    InvalidMessageError,
    ProposalDroppedError,
    RaftError,
    StepLocalMessageError,
    StepPeerNotFoundError,
    UncommittedSizeLimitError,
)
from ww.raft.memory import MemoryStorage
from ww.raft.rawnode import RawNode, ReadState, Ready, SoftState, Status
from ww.raft.read_only import ReadOnlyOption
from ww.raft.storage import (
    CompactedError,
    LogStorage,
    SnapshotOutOfDateError,
    Storage,
    StorageError,
    UnavailableError,
)
from ww.raft.tracker import Progress, ProgressState
from ww.raft.types import (
    NONE,
    ConfChange,
    ConfChangeSingle,
    ConfChangeType,
    ConfState,
    Entry,
    EntryType,
    HardState,
    Message,
    MessageDecodeError,
    MessageType,
    Snapshot,
    SnapshotMetadata,
)

__all__ = [
    "NONE",
    "CompactedError",
    "ConfChange",
    "ConfChangeError",
    "ConfChangeSingle",
    "ConfChangeType",
    "ConfState",
    "Config",
    "ConfigError",
    "Entry",
    "EntryType",
    "HardState",
    "InvalidMessageError",
    "LogStorage",
    "MemoryStorage",
    "Message",
    "MessageDecodeError",
    "MessageType",
    "Progress",
    "ProgressState",
    "ProposalDroppedError",
    "RaftError",
    "RawNode",
    "ReadOnlyOption",
    "ReadState",
    "Ready",
    "Snapshot",
    "SnapshotMetadata",
    "SnapshotOutOfDateError",
    "SoftState",
    "StateType",
    "Stats",
    "Status",
    "StepLocalMessageError",
    "StepPeerNotFoundError",
    "Storage",
    "StorageError",
    "UnavailableError",
    "UncommittedSizeLimitError",
]
