"""Reach another host of the cluster over a connection of this process's own.

A ROM's Host capability reaches every host: ``/<peer id>/...`` in its anchor tree goes to that
peer. But each call then travels through the ROM's own host, which relays it over its link
and relays the answer back. A ROM that talks to one far host a lot (a Raft replica sending to
its peers, a benchmark) can dial it instead::

    async with dial(host, peer) as far:          # far: that host's Host capability
        root = await far.root()
        inbox = await (await root.walk(f"/{peer}/inbox")).load()

`host` only serves to find the peer's address in the cluster view and, when the cluster has a
key, to get credentials for the TLS handshake (`HostCapability.credentials`): a certificate
that lets this process dial hosts but never pass for one. Anchors stored through the dialed
connection go away when it closes, as for any connection.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from ww.auth import AuthError, credentials_context, open_client_stream
from ww.host.config import parse_address
from ww.rpc import CapabilityError, Connection, Ref

__all__ = ["dial"]


@asynccontextmanager
async def dial(host: Any, peer: str) -> AsyncIterator[Ref]:
    """The Host capability of cluster member `peer` over a direct connection, for the block.

    Raises CapabilityError when `peer` is not in the cluster view, OSError when none of its
    addresses answers, AuthError when the host there refuses us or is not `peer`.
    """
    members = await (await host.view()).hosts()
    addrs = next((m["addrs"] for m in members if m["peer"] == peer), None)
    if not addrs:
        raise CapabilityError(f"host {peer} is not in the cluster view")
    bundle = await host.credentials()
    context = None if bundle is None else credentials_context(bundle)
    stream = await _open_first(addrs, context)
    async with stream, Connection.open(stream, name=f"dial {peer}") as conn:
        far = conn.bootstrap()
        if (found := await far.id()) != peer:
            raise AuthError(f"{addrs[0]} is host {found}, not {peer}")
        yield far


async def _open_first(addrs: list[str], context: ssl.SSLContext | None) -> trio.abc.Stream:
    """A stream to the first of `addrs` that answers."""
    failure: Exception | None = None
    for addr in addrs:
        try:
            return await open_client_stream(*parse_address(addr), context=context)
        except (OSError, ValueError) as e:  # ValueError: not HOST:PORT
            failure = e
    raise OSError(f"no address of the host answers ({failure})")
