"""Cluster keys, identities and mutual TLS, with real sockets on loopback."""

from __future__ import annotations

import functools
import logging
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from ww.auth import (
    AuthError,
    ClusterKey,
    Identity,
    generate_cluster_key,
    load_cluster_key,
    open_client_stream,
    peer_id_of,
    require_loopback,
    server_stream_wrapper,
)
from ww.rpc import Capability, Connection, ConnectionLost, serve_connection


class Refusals:
    """Reasons the host refused connections, and an event set at the first one."""

    def __init__(self) -> None:
        self.reasons: list[str] = []
        self.first = trio.Event()

    def add(self, reason: str) -> None:
        self.reasons.append(reason)
        self.first.set()

    async def wait(self) -> str:
        with trio.fail_after(5):
            await self.first.wait()
        return self.reasons[0]


class Greeter(Capability):
    def __init__(self) -> None:
        self.served = 0

    async def greet(self, name: str) -> str:
        self.served += 1
        return f"hello {name}"


def test_generate_and_load_cluster_key(tmp_path: Path) -> None:
    path = tmp_path / "cluster.key"
    made = generate_cluster_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = load_cluster_key(path)
    assert loaded.fingerprint == made.fingerprint
    with pytest.raises(AuthError, match="already exists"):
        generate_cluster_key(path)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (None, "cannot read cluster key"),
        (b"not a key\n", "is not a cluster key"),
        (b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "is not a cluster key"),
    ],
)
def test_bad_cluster_key_is_one_line_error(
    tmp_path: Path, content: bytes | None, match: str
) -> None:
    path = tmp_path / "bad.key"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(AuthError, match=match) as info:
        load_cluster_key(path)
    assert "\n" not in str(info.value)


def test_identity_is_created_once_and_reloaded(tmp_path: Path) -> None:
    first = Identity.load_or_create(tmp_path / "data")
    again = Identity.load_or_create(tmp_path / "data")
    assert first.peer_id == again.peer_id
    assert len(first.peer_id) == 26 and first.peer_id.isalnum()
    assert stat.S_IMODE((tmp_path / "data" / "identity.pem").stat().st_mode) == 0o600
    assert Identity.load_or_create(tmp_path / "other").peer_id != first.peer_id


def test_require_loopback() -> None:
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        require_loopback(host)
    with pytest.raises(AuthError) as info:
        require_loopback("0.0.0.0")
    assert str(info.value) == (
        "refusing to listen on 0.0.0.0 without a cluster key; pass --key FILE "
        "(make one with `ww keygen -o FILE`)"
    )
    with pytest.raises(AuthError):
        require_loopback("192.168.1.10")


@asynccontextmanager
async def tls_host(
    key: ClusterKey | None, identity: Identity, greeter: Greeter
) -> AsyncIterator[tuple[int, Refusals]]:
    """A host on 127.0.0.1 that authenticates with `key`; yields (port, refusal reasons)."""
    wrap = server_stream_wrapper(key, identity)
    refused = Refusals()

    async def handler(tcp: trio.SocketStream) -> None:
        try:
            stream = await wrap(tcp)
        except AuthError as e:
            refused.add(str(e))
            return
        await serve_connection(stream, greeter)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1")
        )
        yield listeners[0].socket.getsockname()[1], refused
        nursery.cancel_scope.cancel()


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[ClusterKey, ClusterKey]:
    base = tmp_path_factory.mktemp("keys")
    return generate_cluster_key(base / "a.key"), generate_cluster_key(base / "b.key")


async def test_rpc_works_through_mutual_tls(
    keys: tuple[ClusterKey, ClusterKey], tmp_path: Path
) -> None:
    key, _ = keys
    host_identity = Identity.load_or_create(tmp_path / "host")
    client_identity = Identity.load_or_create(tmp_path / "client")
    # The client loads the key from its file, as another process would.
    client_key = load_cluster_key(key.path)  # type: ignore[arg-type]
    greeter = Greeter()
    async with tls_host(key, host_identity, greeter) as (port, refused):
        stream = await open_client_stream(
            "127.0.0.1", port, cluster_key=client_key, identity=client_identity
        )
        assert isinstance(stream, trio.SSLStream)
        assert peer_id_of(stream) == host_identity.peer_id
        async with Connection.open(stream) as conn:
            assert await conn.bootstrap().greet("tls") == "hello tls"
        assert refused.reasons == []


async def test_client_with_another_key_is_refused(
    keys: tuple[ClusterKey, ClusterKey], tmp_path: Path
) -> None:
    key, other = keys
    greeter = Greeter()
    async with tls_host(key, Identity.load_or_create(tmp_path), greeter) as (port, refused):
        with pytest.raises(AuthError, match="refused") as info:
            await open_client_stream("127.0.0.1", port, cluster_key=other)
        assert "\n" not in str(info.value)
        assert "TLS handshake failed" in await refused.wait()
        assert greeter.served == 0


async def test_client_without_tls_is_refused_before_any_capability(
    keys: tuple[ClusterKey, ClusterKey], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key, _ = keys
    caplog.set_level(logging.DEBUG, logger="ww.rpc")
    greeter = Greeter()
    async with tls_host(key, Identity.load_or_create(tmp_path), greeter) as (port, refused):
        stream = await open_client_stream("127.0.0.1", port)  # plain TCP
        async with Connection.open(stream) as conn:
            with pytest.raises(ConnectionLost):
                await conn.bootstrap().greet("plain")
        assert "TLS handshake failed" in await refused.wait()
        assert greeter.served == 0


async def test_tls_client_against_plain_host_fails_clearly(
    tmp_path: Path, keys: tuple[ClusterKey, ClusterKey]
) -> None:
    key, _ = keys
    async with tls_host(None, Identity.load_or_create(tmp_path), Greeter()) as (port, _):
        with pytest.raises(AuthError, match=r"without answering TLS.*drop --key"):
            await open_client_stream("127.0.0.1", port, cluster_key=key)


async def test_plain_tcp_without_key(tmp_path: Path) -> None:
    greeter = Greeter()
    async with tls_host(None, Identity.load_or_create(tmp_path), greeter) as (port, _):
        stream = await open_client_stream("127.0.0.1", port)
        assert peer_id_of(stream) is None
        async with Connection.open(stream) as conn:
            assert await conn.bootstrap().greet("tcp") == "hello tcp"


def test_issued_certificate_names_the_peer_and_is_short_lived(
    keys: tuple[ClusterKey, ClusterKey],
) -> None:
    import datetime

    from cryptography.x509.oid import NameOID

    key, other = keys
    identity = Identity.generate()
    cert = key.issue(identity.key, identity.peer_id)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == identity.peer_id
    assert cert.issuer == key.ca_certificate().subject
    lifetime = cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
    assert datetime.timedelta(days=29) < lifetime <= datetime.timedelta(days=30)
    cert.verify_directly_issued_by(key.ca_certificate())
    with pytest.raises(ValueError):
        cert.verify_directly_issued_by(other.ca_certificate())
