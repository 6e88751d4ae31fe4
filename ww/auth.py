"""Transport security: cluster keys, host identities and mutual TLS.

A *cluster key* is an EC P-256 private key that acts as a certificate authority. Every process
that has it makes, at start, a short-lived certificate for its own key signed by the cluster
key; connections use TLS 1.3 with certificates required on both sides, so a peer without a
certificate from the cluster key is refused during the handshake, before any capability.

Without a key, connections are plain TCP and hosts refuse to listen beyond loopback
(`require_loopback`).

The server side confirms a completed handshake with one byte (``ACCEPTED``) before the RPC
starts, so a client learns at connect time that it was refused (TLS 1.3 lets the client finish
its handshake before the server has checked the client's certificate).
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import logging
import os
import ssl
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

log = logging.getLogger("ww.auth")

IDENTITY_FILE = "identity.pem"
HANDSHAKE_TIMEOUT = 10.0
ACCEPTED = b"\x01"
CERT_LIFETIME = datetime.timedelta(days=30)
CREDENTIALS_LIFETIME = datetime.timedelta(days=1)
CONTEXT_REFRESH = datetime.timedelta(days=1)
CLOCK_SKEW = datetime.timedelta(hours=1)


class AuthError(Exception):
    """A key cannot be used, or a peer failed authentication (one line)."""


# --- keys ------------------------------------------------------------------------------------


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_private(path: Path, data: bytes, *, exclusive: bool) -> None:
    """Write `data` to `path` readable by its owner only, fsynced."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
    fd = os.open(path, flags, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_key(path: Path, what: str) -> ec.EllipticCurvePrivateKey:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise AuthError(f"cannot read {what} {path}: {e.strerror or e}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise AuthError(
            f"{path} is not a {what} (expected an unencrypted PEM private key)"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise AuthError(f"{path} is not a {what} (expected an EC P-256 key)")
    return key


def _public_der(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def fingerprint(key: ec.EllipticCurvePrivateKey) -> str:
    """26 lowercase base32 characters of the sha256 of the public key (130 bits)."""
    digest = hashlib.sha256(_public_der(key)).digest()
    return base64.b32encode(digest).decode("ascii").lower()[:26]


@dataclass(frozen=True, slots=True)
class ClusterKey:
    """The cluster's certificate authority: its key and a CA certificate made from it."""

    key: ec.EllipticCurvePrivateKey = field(repr=False)
    path: Path | None = None

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.key)

    def ca_certificate(self) -> x509.Certificate:
        """The CA certificate. Every holder of the key builds the same name and key
        identifier, so certificates issued anywhere in the cluster verify everywhere."""
        name = x509.Name(
            [x509.NameAttribute(NameOID.COMMON_NAME, f"ww cluster {self.fingerprint}")]
        )
        public = self.key.public_key()
        return (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(public)
            .serial_number(1)
            .not_valid_before(datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC))
            .not_valid_after(datetime.datetime(2120, 1, 1, tzinfo=datetime.UTC))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(self.key, hashes.SHA256())
        )

    def issue(
        self,
        subject_key: ec.EllipticCurvePrivateKey,
        common_name: str,
        lifetime: datetime.timedelta = CERT_LIFETIME,
    ) -> x509.Certificate:
        """A certificate for `subject_key`, valid for `lifetime`, usable by clients and servers."""
        now = datetime.datetime.now(datetime.UTC)
        public = subject_key.public_key()
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(
                x509.Name(
                    [x509.NameAttribute(NameOID.COMMON_NAME, f"ww cluster {self.fingerprint}")]
                )
            )
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + lifetime)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )


def generate_cluster_key(path: str | os.PathLike[str]) -> ClusterKey:
    """Create a new cluster key file at `path` (PEM, mode 0600). Refuses to overwrite."""
    path = Path(path)
    key = _new_key()
    try:
        _write_private(path, _key_pem(key), exclusive=True)
    except FileExistsError:
        raise AuthError(f"{path} already exists; refusing to overwrite a key") from None
    except OSError as e:
        raise AuthError(f"cannot write cluster key {path}: {e.strerror or e}") from None
    return ClusterKey(key, path)


def load_cluster_key(path: str | os.PathLike[str]) -> ClusterKey:
    """Load a cluster key made by `generate_cluster_key`; AuthError (one line) if unusable."""
    path = Path(path)
    key = _read_key(path, "cluster key")
    try:
        mode = path.stat().st_mode
    except OSError:
        mode = 0
    if mode & 0o077:
        log.warning("cluster key %s is readable by others; chmod 600 it", path)
    return ClusterKey(key, path)


@dataclass(frozen=True, slots=True)
class Identity:
    """A host's own key; its peer id is derived from the public key."""

    key: ec.EllipticCurvePrivateKey = field(repr=False)
    peer_id: str

    @classmethod
    def generate(cls) -> Identity:
        """A fresh identity kept in memory only (clients that dial a host)."""
        key = _new_key()
        return cls(key, fingerprint(key))

    @classmethod
    def load_or_create(cls, data_dir: str | os.PathLike[str]) -> Identity:
        """The identity in `data_dir`, created (0600) on first use."""
        path = Path(data_dir) / IDENTITY_FILE
        if not path.exists():
            key = _new_key()
            try:
                Path(data_dir).mkdir(parents=True, exist_ok=True)
                _write_private(path, _key_pem(key), exclusive=True)
            except FileExistsError:
                pass  # another process made it first: use theirs
            except OSError as e:
                raise AuthError(f"cannot write identity {path}: {e.strerror or e}") from None
            else:
                return cls(key, fingerprint(key))
        key = _read_key(path, "host identity key")
        return cls(key, fingerprint(key))


def issue_credentials(cluster_key: ClusterKey) -> bytes:
    """Credentials for a process that has no cluster key to dial hosts itself (a ROM a host
    runs): a PEM bundle of a fresh key, a certificate for it from the cluster key valid for
    CREDENTIALS_LIFETIME, and the CA certificate. The certificate names no host (its common
    name is "guest <id>"), so hosts never take its holder for one of them."""
    key = _new_key()
    cert = cluster_key.issue(key, f"guest {fingerprint(key)}", CREDENTIALS_LIFETIME)
    pem = serialization.Encoding.PEM
    return _key_pem(key) + cert.public_bytes(pem) + cluster_key.ca_certificate().public_bytes(pem)


def credentials_context(bundle: bytes) -> ssl.SSLContext:
    """A TLS client context from an `issue_credentials` bundle; AuthError when it is not one."""
    ca_start = bundle.rfind(b"-----BEGIN CERTIFICATE")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        ctx.load_verify_locations(cadata=bundle[ca_start:].decode("ascii"))
        _load_chain(ctx, bundle[:ca_start])
    except (ValueError, ssl.SSLError) as e:
        raise AuthError(
            f"unusable credentials: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from None
    return ctx


def _load_chain(ctx: ssl.SSLContext, chain: bytes) -> None:
    """Load a key and its certificate from memory (the ssl module reads them only from files:
    a private temporary one, deleted at once)."""
    fd, name = tempfile.mkstemp(prefix="ww-cert-", suffix=".pem")
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, chain)
        os.close(fd)
        ctx.load_cert_chain(name)
    finally:
        os.unlink(name)


# --- TLS ---------------------------------------------------------------------------------------

_CONTEXTS: dict[tuple[str, str, bool], tuple[float, ssl.SSLContext]] = {}


def tls_context(cluster_key: ClusterKey, identity: Identity, *, server: bool) -> ssl.SSLContext:
    """A TLS 1.3 context that presents a certificate for `identity` issued by the cluster key
    and requires the peer to present one too.

    Cached per (key, identity, side); remade with a fresh certificate once a day, so a
    long-running host never presents an expired one.
    """
    cache_key = (cluster_key.fingerprint, identity.peer_id, server)
    cached = _CONTEXTS.get(cache_key)
    now = time.monotonic()
    if cached is not None and now - cached[0] < CONTEXT_REFRESH.total_seconds():
        return cached[1]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ca_pem = cluster_key.ca_certificate().public_bytes(serialization.Encoding.PEM)
    ctx.load_verify_locations(cadata=ca_pem.decode("ascii"))
    cert = cluster_key.issue(identity.key, identity.peer_id)
    _load_chain(ctx, _key_pem(identity.key) + cert.public_bytes(serialization.Encoding.PEM))
    _CONTEXTS[cache_key] = (now, ctx)
    return ctx


def peer_id_of(stream: trio.abc.Stream) -> str | None:
    """The peer id in the verified certificate of a TLS stream (None for plain TCP)."""
    if not isinstance(stream, trio.SSLStream):
        return None
    cert = stream.getpeercert()
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


def _ssl_reason(exc: BaseException) -> str:
    cause = exc.__cause__ or exc.__context__ or exc
    text = getattr(cause, "reason", None) or str(cause) or type(cause).__name__
    return str(text).splitlines()[0] if str(text) else type(cause).__name__


async def open_client_stream(
    host: str,
    port: int,
    *,
    cluster_key: ClusterKey | None = None,
    identity: Identity | None = None,
    context: ssl.SSLContext | None = None,
) -> trio.abc.Stream:
    """Connect to a host: plain TCP without a key; mutual TLS with one (or with `context`,
    a client context from `credentials_context`).

    Raises OSError when nothing listens, AuthError when the host refuses us or cannot
    prove it holds the cluster key.
    """
    tcp = await trio.open_tcp_stream(host, port)
    if context is not None:
        ctx = context
    elif cluster_key is not None:
        ctx = tls_context(cluster_key, identity or _client_identity(), server=False)
    else:
        return tcp
    stream = trio.SSLStream(tcp, ctx)
    try:
        with trio.fail_after(HANDSHAKE_TIMEOUT):
            await stream.do_handshake()
            reply = await stream.receive_some(1)
    except trio.TooSlowError:
        await trio.aclose_forcefully(stream)
        raise AuthError(f"TLS handshake with {host}:{port} timed out") from None
    except trio.BrokenResourceError as e:
        await trio.aclose_forcefully(stream)
        reason = _ssl_reason(e)
        if "EOF" in reason.upper():  # it hung up without a word of TLS
            raise AuthError(
                f"host {host}:{port} closed the connection without answering TLS; if it runs "
                "without a cluster key, drop --key"
            ) from None
        raise AuthError(
            f"host {host}:{port} refused the connection during TLS ({reason}); "
            "is it using the same cluster key?"
        ) from None
    if reply != ACCEPTED:
        await trio.aclose_forcefully(stream)
        raise AuthError(f"host {host}:{port} refused the connection (wrong cluster key?)")
    return stream


_CLIENT_IDENTITY: list[Identity] = []


def _client_identity() -> Identity:
    if not _CLIENT_IDENTITY:
        _CLIENT_IDENTITY.append(Identity.generate())
    return _CLIENT_IDENTITY[0]


def server_stream_wrapper(
    cluster_key: ClusterKey | None, identity: Identity
) -> Callable[[trio.abc.Stream], Awaitable[trio.abc.Stream]]:
    """A function that authenticates one accepted stream and returns what to serve RPC on.

    Without a key it returns the stream as is. With a key it completes a TLS handshake that
    requires a certificate issued by the cluster key, confirms it to the client, and returns
    the TLS stream; a peer without such a certificate gets AuthError (after at most
    HANDSHAKE_TIMEOUT seconds), before any capability is offered.
    """
    if cluster_key is not None:
        tls_context(cluster_key, identity, server=True)  # fail now, not at the first peer

    async def wrap(stream: trio.abc.Stream) -> trio.abc.Stream:
        if cluster_key is None:
            return stream
        ctx = tls_context(cluster_key, identity, server=True)
        tls = trio.SSLStream(stream, ctx, server_side=True)
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                await tls.do_handshake()
                await tls.send_all(ACCEPTED)
        except trio.TooSlowError:
            await trio.aclose_forcefully(tls)
            raise AuthError("TLS handshake timed out") from None
        except trio.BrokenResourceError as e:
            await trio.aclose_forcefully(tls)
            raise AuthError(f"TLS handshake failed: {_ssl_reason(e)}") from None
        return tls

    return wrap


_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


def is_loopback(host: str) -> bool:
    """Whether `host` names only the loopback interface."""
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def require_loopback(host: str) -> None:
    """Refuse (AuthError) to listen beyond loopback without a cluster key."""
    if not is_loopback(host):
        raise AuthError(
            f"refusing to listen on {host or '*'} without a cluster key; pass --key FILE "
            "(make one with `ww keygen -o FILE`)"
        )
