"""The `ww` command: start a host, and talk to one (ls, pub, sub, run, ps, kill, logs).

Every command is a small async function that takes the parsed arguments. Expected failures
raise `CliError` (or a library error such as `RomError` or `RemoteError`); `main` turns each of
them into one line on stderr and an exit code, never a traceback (`-v` adds the traceback).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
import tempfile
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import ExitStack, asynccontextmanager
from pathlib import Path
from typing import Any, NoReturn

import trio

log = logging.getLogger("ww.cli")

DEFAULT_ADDRESS = ("127.0.0.1", 2020)
EXIT_ERROR = 1
EXIT_USAGE = 2


class CliError(Exception):
    """An expected failure: its message is one line saying what is wrong and what to do."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------------------------------------
# Argument types


def parse_address(text: str) -> tuple[str, int]:
    """`HOST:PORT` (or `[IPv6]:PORT`) as a (host, port) pair."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT, e.g. 127.0.0.1:2020")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def parse_meta(text: str) -> tuple[str, str]:
    """`KEY=VALUE` as a pair."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE, e.g. region=eu")
    return key, value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


SIZE = re.compile(r"([0-9]+)([KMG]?)(?:i?B)?", re.IGNORECASE)
SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_size(text: str) -> int:
    """A number of bytes, with an optional K, M or G suffix (KiB, MiB, GiB): 512K, 8M, 1G."""
    match = SIZE.fullmatch(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size in bytes, e.g. 512K, 8M or 1G")
    return int(match[1]) * SIZE_UNITS[match[2].lower()]


def non_negative_int(text: str) -> int:
    if not text.isdigit() or not text.isascii():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number, e.g. 100")
    return int(text)


def format_address(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# ---------------------------------------------------------------------------------------------
# Talking to a host


@asynccontextmanager
async def dial(args: argparse.Namespace) -> AsyncIterator[Any]:
    """Connect to the host named by --dial (and --key) and yield its Host capability."""
    from ww.auth import load_cluster_key, open_client_stream
    from ww.rpc import Connection, ConnectionLost

    address: tuple[str, int] = args.dial
    cluster_key = load_cluster_key(args.key) if args.key else None
    try:
        with trio.fail_after(args.timeout):
            stream = await open_client_stream(*address, cluster_key=cluster_key)
    except (OSError, trio.TooSlowError) as exc:
        log.debug("dial %s failed: %r", format_address(address), exc)
        raise CliError(
            f"no ww host at {format_address(address)}; "
            "start one with `ww start` or pass --dial HOST:PORT"
        ) from exc
    async with stream, Connection.open(stream) as conn:
        host = conn.bootstrap()
        try:
            await host.id()  # a host with a key closes a connection that did not use it
        except ConnectionLost as exc:
            hint = "is it still running?"
            if not args.key:
                hint = "if it was started with --key, pass the same --key FILE"
            raise CliError(
                f"the host at {format_address(address)} closed the connection; {hint}"
            ) from exc
        yield host


async def walk(host: Any, path: str) -> Any:
    root = await host.root()
    return root if path.strip("/") == "" else await root.walk(path)


# ---------------------------------------------------------------------------------------------
# Commands


async def cmd_start(args: argparse.Namespace) -> int:
    from ww.host import HostConfig, run_host

    with ExitStack() as cleanup:
        if args.data_dir:
            data_dir = Path(args.data_dir)
        elif args.listen[1] == 0:  # a throwaway host: a fresh identity, removed at exit
            data_dir = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="ww-host-")))
        else:
            data_dir = default_data_dir(args.listen)
        config = HostConfig(
            listen=args.listen,
            data_dir=data_dir,
            peers=list(args.peer),
            ns=args.ns,
            meta=dict(args.meta),
            cluster_key_path=Path(args.key) if args.key else None,
            heartbeat_interval=args.heartbeat,
            ttl=args.ttl,
            log_limit=args.log_limit,
            keep_logs=args.keep_logs,
            rom_cache_limit=args.rom_cache_limit,
        )
        log.debug("starting host with %s", config)
        await run_host(config)
    return 0


def default_data_dir(listen: tuple[str, int]) -> Path:
    """One directory, and so one identity, per listening address, under the user data dir."""
    import platformdirs

    host, port = listen
    return Path(platformdirs.user_data_dir("ww")) / "hosts" / f"{host}_{port}"


async def cmd_keygen(args: argparse.Namespace) -> int:
    from ww.auth import generate_cluster_key

    out = Path(args.output)
    if out.exists() and not args.force:
        raise CliError(f"{out} already exists; pass --force to overwrite it")
    if not out.parent.is_dir():
        raise CliError(f"cannot write {out}: there is no directory {out.parent}")
    # Write beside it, then rename: an old key is replaced whole or not at all.
    fresh = out.with_name(f".{out.name}.new")
    fresh.unlink(missing_ok=True)
    generate_cluster_key(fresh)
    os.replace(fresh, out)
    log.info("wrote cluster key %s; keep it secret, give it to every host with --key", out)
    return 0


async def cmd_ls(args: argparse.Namespace) -> int:
    async with dial(args) as host:
        path = "/" + args.path.strip("/")
        if path == "/":
            view = await host.view()
            for entry in sorted(await view.hosts(), key=lambda h: h["peer"]):
                print(f"/{entry['peer']}")
            return 0
        anchor = await walk(host, path)
        for name in sorted(await anchor.ls()):
            print(f"{path.rstrip('/')}/{name.strip('/')}")
    return 0


async def cmd_pub(args: argparse.Namespace) -> int:
    async with dial(args) as host:
        pubsub = await host.pubsub()
        topic = await pubsub.join(args.topic)
        if args.message is not None:
            await topic.publish(args.message.encode())
            return 0
        stdin = trio.wrap_file(sys.stdin.buffer)
        async for line in stdin:
            await topic.publish(line.rstrip(b"\r\n"))
    return 0


async def cmd_sub(args: argparse.Namespace) -> int:
    async with dial(args) as host:
        pubsub = await host.pubsub()
        topic = await pubsub.join(args.topic)
        async with topic.stream("subscribe") as messages:
            # The host starts the subscription before it answers a later call on this
            # connection, so after this round trip no message published from now on is missed.
            await topic.name()
            log.info("subscribed to %s", args.topic)
            async for message in messages:
                data = message if isinstance(message, bytes) else str(message).encode()
                sys.stdout.buffer.write(data + b"\n")
                sys.stdout.buffer.flush()
    return 0


async def cmd_build(args: argparse.Namespace) -> int:
    from ww.rom import build_rom_file

    src = Path(args.dir)
    if not src.is_dir():
        raise CliError(f"{src} is not a directory; pass a ROM source directory with rom.toml")
    out = Path(args.output) if args.output else Path(f"{src.resolve().name}.rom")
    build_rom_file(src, out)
    log.info("built %s", out)
    return 0


def load_rom(path: Path) -> Any:
    """A `.rom` file, or a ROM source directory built in memory."""
    from ww.rom import Rom, build_rom

    if path.is_dir():
        return Rom.load(build_rom(path))
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CliError(
            f"cannot read ROM {path}: {exc.strerror or exc}; pass a .rom file or a ROM directory"
        ) from exc
    return Rom.load(data)


async def cmd_run(args: argparse.Namespace) -> int:
    from ww.rom.guest import run_local

    rom = load_rom(Path(args.rom))
    if args.no_dial:
        return await run_local(rom, list(args.args), None)
    async with dial(args) as host:
        return await run_local(rom, list(args.args), host)


async def cmd_ps(args: argparse.Namespace) -> int:
    async with dial(args) as host:
        rows = await host.ps()
    print_table(("pid", "name", "state", "exit_code", "restart", "restarts"), rows)
    return 0


def print_table(columns: Sequence[str], rows: list[dict[str, Any]]) -> None:
    table = [[c.upper() for c in columns]]
    table += [["-" if row.get(c) is None else str(row[c]) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    for line in table:
        print("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip())


async def cmd_volumes(args: argparse.Namespace) -> int:
    async with dial(args) as host:
        if args.action == "rm":
            await host.remove_volume(args.anchor)
            return 0
        rows = await host.volumes()
    print_table(("anchor", "size", "pid", "path"), rows)
    return 0


async def cmd_kill(args: argparse.Namespace) -> int:
    async with dial(args) as host:
        await host.kill(args.pid)
    return 0


async def cmd_logs(args: argparse.Namespace) -> int:
    async with dial(args) as host:
        if not args.follow:
            data = await host.logs(args.pid)
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()
            return 0
        async with host.stream("follow_logs", args.pid) as pieces:
            async for data in pieces:
                sys.stdout.buffer.write(data)
                sys.stdout.buffer.flush()
    return 0


# ---------------------------------------------------------------------------------------------
# The parser


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line that points at --help."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def client_options(defaults: bool = True) -> Parser:
    """--dial, --key, --timeout; without `defaults`, an option not given leaves the value the
    enclosing command's parser set (for `ww volumes rm`, which takes them on either side)."""

    def default(value: Any) -> Any:
        return value if defaults else argparse.SUPPRESS

    client = Parser(add_help=False)
    client.add_argument(
        "--dial",
        type=parse_address,
        default=default(DEFAULT_ADDRESS),
        metavar="HOST:PORT",
        help="the host to talk to (default: 127.0.0.1:2020)",
    )
    client.add_argument(
        "--key",
        default=default(None),
        metavar="FILE",
        help="cluster key file, when the host was started with --key",
    )
    client.add_argument(
        "--timeout",
        type=positive_float,
        default=default(5.0),
        metavar="SECONDS",
        help="give up connecting after this long (default: 5.0)",
    )
    return client


def build_parser() -> Parser:
    common = Parser(add_help=False)
    common.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=argparse.SUPPRESS,
        help="log more (debug); errors then include their traceback",
    )
    client = client_options()
    parser = Parser(
        prog="ww",
        description=(
            "Wetware hosts lend capabilities (a cluster view, pubsub, an anchor tree, channels, "
            "an executor) to programs shipped to them as ROMs."
        ),
        epilog="Run `ww COMMAND --help` for the options of one command.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(
        name: str,
        handler: Callable[..., Awaitable[int]],
        text: str,
        *parents: Parser,
        example: str | None = None,
    ) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(
            name,
            help=text,
            description=textwrap.fill(text, 80, break_on_hyphens=False),
            epilog=f"example:\n  {example}" if example else None,
            parents=[common, *parents],
            formatter_class=Help,
        )
        p.set_defaults(handler=handler)
        return p

    p = command(
        "start",
        cmd_start,
        "Start a host and serve until Ctrl-C or SIGTERM.",
        example="ww start --listen 127.0.0.1:2021 --peer 127.0.0.1:2020 --meta role=worker",
    )
    p.add_argument(
        "--listen",
        type=parse_address,
        default=DEFAULT_ADDRESS,
        metavar="HOST:PORT",
        help="address to listen on; port 0 picks a free port (default: 127.0.0.1:2020)",
    )
    p.add_argument(
        "--data-dir",
        metavar="DIR",
        help="where the host keeps its identity key and ROM cache (default: one directory per "
        "listen address under the user data dir; for port 0, a temporary one removed at exit)",
    )
    p.add_argument(
        "--peer",
        type=parse_address,
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="a host of the cluster to join (repeatable)",
    )
    p.add_argument("--ns", default="ww", metavar="NAME", help="cluster namespace (default: ww)")
    p.add_argument(
        "--meta",
        type=parse_meta,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="metadata announced to the cluster (repeatable)",
    )
    p.add_argument(
        "--key",
        metavar="FILE",
        help="cluster key (from `ww keygen`): mutual TLS between hosts and clients; required "
        "to listen on anything but loopback",
    )

    p.add_argument(
        "--heartbeat",
        type=positive_float,
        default=1.0,
        metavar="SECONDS",
        help="how often to announce this host to its peers (default: 1.0)",
    )
    p.add_argument(
        "--ttl",
        type=positive_float,
        default=5.0,
        metavar="SECONDS",
        help="a host not heard from for this long leaves the view (default: 5.0)",
    )
    p.add_argument(
        "--log-limit",
        type=parse_size,
        default="8M",
        metavar="SIZE",
        help="output kept per process, the newest; `ww logs` shows it (default: 8M)",
    )
    p.add_argument(
        "--keep-logs",
        type=non_negative_int,
        default=100,
        metavar="N",
        help="how many exited processes keep their logs; older logs are deleted (default: 100)",
    )
    p.add_argument(
        "--rom-cache-limit",
        type=parse_size,
        default="1G",
        metavar="SIZE",
        help="ROMs cached by content id, least recently used evicted first; the ROMs of "
        "running processes always stay (default: 1G)",
    )

    p = command("keygen", cmd_keygen, "Make a cluster key (give it to every host with --key).")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="where to write the key")
    p.add_argument("--force", action="store_true", help="overwrite FILE if it exists")

    p = command(
        "ls",
        cmd_ls,
        "List live hosts (at /) or the anchors under PATH, e.g. /<peer id>/hello.",
        client,
    )
    p.add_argument("path", nargs="?", default="/", metavar="PATH", help="anchor path (default: /)")

    p = command(
        "pub",
        cmd_pub,
        "Publish MESSAGE to TOPIC; without MESSAGE, publish each line of stdin.",
        client,
    )
    p.add_argument("topic", metavar="TOPIC", help="topic name, e.g. test")
    p.add_argument(
        "message", nargs="?", metavar="MESSAGE", help="the message; omit it to read stdin"
    )

    p = command(
        "sub", cmd_sub, "Print each message published to TOPIC, one per line, until Ctrl-C.", client
    )
    p.add_argument("topic", metavar="TOPIC", help="topic name, e.g. test")

    p = command(
        "build",
        cmd_build,
        "Build a ROM file from a ROM source directory (rom.toml).",
        example="ww build roms/hello -o hello.rom",
    )
    p.add_argument("dir", metavar="DIR", help="ROM source directory, e.g. roms/hello")
    p.add_argument(
        "-o", "--output", metavar="FILE", help="the .rom file to write (default: ./<DIR name>.rom)"
    )

    p = command(
        "run",
        cmd_run,
        "Run a ROM here, with the Host capability of the dialed host (or none with --no-dial). "
        "Options go before ROM; everything after ROM is passed to the ROM.",
        client,
        example="ww run --dial 127.0.0.1:2021 hello.rom PEER_ID",
    )
    p.add_argument("--no-dial", action="store_true", help="run without a host (host is None)")
    p.add_argument("rom", metavar="ROM", help="a .rom file, or a ROM source directory to build")
    rom_args = p.add_argument(
        "args", nargs=argparse.REMAINDER, metavar="ARGS", help="arguments passed to the ROM"
    )
    rom_args.required = False  # may be empty; argparse would name it in "required" errors

    command(
        "ps",
        cmd_ps,
        "List the processes on the host, one row each; a restarted process shows the pid of "
        "its current run, its restart policy and how often it was restarted.",
        client,
    )

    p = command(
        "kill", cmd_kill, "Stop a process on the host; it is not restarted, ever again.", client
    )
    p.add_argument("pid", type=int, metavar="PID", help="process id, as `ww ps` lists it")

    p = command(
        "logs",
        cmd_logs,
        "Print the captured stdout and stderr of a process (its last 1 MiB).",
        client,
        example="ww logs -f --dial 127.0.0.1:2021 4242",
    )
    p.add_argument("pid", type=int, metavar="PID", help="process id, as `ww ps` lists it")
    p.add_argument(
        "-f",
        "--follow",
        action="store_true",
        help="then keep printing its output as it is written, until the process exits",
    )

    p = command(
        "volumes",
        cmd_volumes,
        "List the volumes on the host (anchor, size in bytes, the pid using it, directory); "
        "`ww volumes rm ANCHOR_PATH` deletes one that no process uses.",
        client,
        example="ww volumes rm --dial 127.0.0.1:2021 /<peer id>/raft/v1",
    )
    p.set_defaults(action="ls")
    actions = p.add_subparsers(dest="action", metavar="rm", required=False)
    rm = actions.add_parser(
        "rm",
        help="delete the volume of ANCHOR_PATH (refused while a process uses it)",
        parents=[common, client_options(defaults=False)],
    )
    rm.add_argument("anchor", metavar="ANCHOR_PATH", help="e.g. /<peer id>/raft/v1")
    return parser


class Help(argparse.RawDescriptionHelpFormatter):
    pass


# ---------------------------------------------------------------------------------------------
# Entry point


def setup_logging(verbosity: int) -> None:
    """Logs go to stderr: through rich on a terminal, as plain lines to a file or a pipe."""
    handler: logging.Handler
    if sys.stderr.isatty():
        from rich.console import Console
        from rich.logging import RichHandler

        handler = RichHandler(console=Console(stderr=True), show_path=verbosity > 0)
        handler.setFormatter(logging.Formatter("%(message)s", datefmt="[%X]"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbosity > 0 else logging.INFO)


def describe(exc: BaseException) -> str:
    """One line for an expected error (a host's CapabilityError is a message for users)."""
    text = str(exc)
    if getattr(exc, "type", None) == "CapabilityError" and isinstance(
        getattr(exc, "message", None), str
    ):
        text = exc.message  # type: ignore[attr-defined]
    return " ".join(text.split()) or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `ww` command; returns the exit code."""
    args = build_parser().parse_args(argv)
    verbosity: int = args.verbose
    setup_logging(verbosity)
    try:
        return trio.run(until_signal, args)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as group:  # turned into one line; -v shows where it came from
        exc = unwrap(group)
        if isinstance(exc, BrokenPipeError):  # e.g. `ww sub t | head -1`: the reader is done
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        if verbosity:
            log.error("%s failed", args.command, exc_info=exc)
        message = describe_error(exc)
        if type(exc).__name__ == "ConnectionLost" and hasattr(args, "dial"):
            message = f"lost the connection to the host at {format_address(args.dial)}"
        print(f"ww {args.command}: error: {message}", file=sys.stderr)
        return exc.code if isinstance(exc, CliError) else EXIT_ERROR


EXIT_INTERRUPTED = 130
ENDED_BY_SIGNAL = {"start", "sub"}  # commands whose normal end is Ctrl-C or SIGTERM


async def until_signal(args: argparse.Namespace) -> int:
    """Run the command; Ctrl-C or SIGTERM cancels it cleanly."""
    code = EXIT_INTERRUPTED
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def command() -> None:
                nonlocal code
                code = await args.handler(args)
                nursery.cancel_scope.cancel()

            nursery.start_soon(command)
            async for signum in signals:
                log.info("%s; stopping", signal.Signals(signum).name)
                if args.command in ENDED_BY_SIGNAL:
                    code = 0
                nursery.cancel_scope.cancel()
                break
    return code


def unwrap(exc: BaseException) -> BaseException:
    """The one error inside (nested) single-member exception groups."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def describe_error(exc: BaseException) -> str:
    if isinstance(exc, _known_errors()):
        return describe(exc)
    return f"{type(exc).__name__}: {describe(exc)} (run with -v for the traceback)"


def _known_errors() -> tuple[type[BaseException], ...]:
    """Error types whose message is already one line for users (from modules in use)."""
    known: list[type[BaseException]] = [CliError]
    for module, names in (
        ("ww.rom", ("RomError",)),
        ("ww.rpc", ("RemoteError", "ConnectionLost", "CapabilityError")),
        ("ww.auth", ("AuthError",)),
        ("ww.host.config", ("HostError",)),
    ):
        mod = sys.modules.get(module)
        for name in names:
            error = getattr(mod, name, None)
            if isinstance(error, type) and issubclass(error, BaseException):
                known.append(error)
    return tuple(known)


if __name__ == "__main__":
    sys.exit(main())
