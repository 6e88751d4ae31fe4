"""Errors the protocol core raises to its caller.

Every error is a `RaftError`. `RawNode.step` never raises for a message from the network: it
drops the message and counts the reason in `RawNode.stats`. The local calls (`propose`,
`propose_conf_change`, `transfer_leader`, ...) raise these errors so the caller can retry or
report.
"""

from __future__ import annotations


class RaftError(Exception):
    """Base of every error the core raises."""


class ConfigError(RaftError, ValueError):
    """The `Config` is invalid; the message says which field and why."""


class ProposalDroppedError(RaftError):
    """The proposal was not appended: no leader is known, a leadership transfer is under way,
    forwarding is disabled, or this node is no longer a member. Retry later."""


class UncommittedSizeLimitError(ProposalDroppedError):
    """The leader already holds as many uncommitted bytes as the configured limit allows."""


class ConfChangeError(RaftError):
    """A membership change cannot be proposed or applied to the current configuration."""


class StepLocalMessageError(RaftError):
    """A message type that only the node itself may generate arrived from the network."""


class StepPeerNotFoundError(RaftError):
    """A response arrived from a node that is not in the configuration."""


class InvalidMessageError(RaftError):
    """A well-typed message whose fields contradict each other or the local log."""
