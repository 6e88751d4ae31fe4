"""The kernel's side of a ROM's isolation.

`Sandbox.child_setup(...)` (in the host) returns the function that runs in the forked child,
before `exec` of the guest, and in this order:

1. a PID namespace for the child's children (when the host runs as root): the guest runs the
   ROM in it, under an init of its own, so when the ROM's process ends, or is killed, or its
   host dies, the kernel kills every process the ROM started, even one that called `setsid`;
2. resource limits (RLIMIT_AS, RLIMIT_CPU, RLIMIT_NPROC, RLIMIT_NOFILE, no core files) and a
   lower scheduling priority (nice 10), so the host keeps its share of the CPU;
3. when the host runs as root, a uid of its own (`UID_BASE + pid`, so RLIMIT_NPROC counts
   this ROM's processes only and the ROM can signal no other process by uid), its volume and
   temporary directory chowned to it, no supplementary groups, and no capability but, when
   the Python installation or the data directory is not searchable by other users,
   CAP_DAC_READ_SEARCH (ambient: Landlock, below, still decides what can be read);
4. `no_new_privs` and a parent-death signal (SIGKILL);
5. a seccomp filter (x86-64): no socket of a family other than IPv4/IPv6 (no new Unix,
   netlink or packet sockets), no IPv4/IPv6 socket at all without `net.connect`, no `listen`,
   and no ptrace, process_vm_*, namespaces, bpf, perf events, userfaultfd, keyrings or
   io_uring.

`Sandbox.landlock(...)` gives the Landlock rules, which the guest applies in the ROM's own
process before it loads any of the ROM's code (`apply_landlock`; the guest is the host's
code): files readable only under the Python installation, `sys.path`, `/usr/lib`, `/lib`,
`/usr/bin`, `/bin`, a few files of `/etc` (TLS roots, name resolution), `/dev/null`,
`/dev/urandom` and the process's own `/proc/self`; writable only in its volume (with the
`volume` permission) and its private temporary directory; no TCP bind; no TCP connect without
the `net.connect` permission; no signals to processes outside the sandbox and no abstract Unix
sockets outside it (Landlock ABI 6).

`landlock_abi()` says what the kernel offers (0: no Landlock).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import platform
import resource
import signal
import stat
import struct
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "UID_BASE",
    "Sandbox",
    "SandboxError",
    "apply_landlock",
    "landlock_abi",
    "read_paths",
]

UID_BASE = 1_600_000_000
"""A ROM run by a root host runs as uid UID_BASE + its pid (pids are below 2**22)."""

NICE = 10

# Landlock (include/uapi/linux/landlock.h)
_SYS_CREATE_RULESET, _SYS_ADD_RULE, _SYS_RESTRICT_SELF = 444, 445, 446
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH, _RULE_NET_PORT = 1, 2
_FS_EXECUTE = 1 << 0
_FS_WRITE_FILE = 1 << 1
_FS_READ_FILE = 1 << 2
_FS_READ_DIR = 1 << 3
_FS_TRUNCATE = 1 << 14
_FS_IOCTL_DEV = 1 << 15
_FS_FILE_ONLY = _FS_EXECUTE | _FS_WRITE_FILE | _FS_READ_FILE | _FS_TRUNCATE | _FS_IOCTL_DEV
_NET_BIND_TCP, _NET_CONNECT_TCP = 1 << 0, 1 << 1
_SCOPE_ABSTRACT_UNIX, _SCOPE_SIGNAL = 1 << 0, 1 << 1

READ = _FS_READ_FILE | _FS_READ_DIR | _FS_EXECUTE
DEVICE = _FS_READ_FILE | _FS_WRITE_FILE


def _fs_rights(abi: int) -> int:
    """Every filesystem right the kernel's Landlock ABI knows."""
    rights = (1 << 13) - 1  # EXECUTE .. MAKE_SYM (ABI 1)
    if abi >= 2:
        rights |= 1 << 13  # REFER
    if abi >= 3:
        rights |= _FS_TRUNCATE
    if abi >= 5:
        rights |= _FS_IOCTL_DEV
    return rights


# prctl and capabilities
_PR_SET_PDEATHSIG = 1
_PR_SET_KEEPCAPS = 8
_PR_SET_SECCOMP = 22
_PR_CAPBSET_DROP = 24
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_RAISE, _PR_CAP_AMBIENT_CLEAR_ALL = 47, 2, 4
_CAP_DAC_READ_SEARCH = 2
_CAP_VERSION_3 = 0x20080522
_CLONE_NEWPID = 0x20000000

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.prctl.argtypes = [
    ctypes.c_int,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
]


class SandboxError(Exception):
    """ROMs cannot be sandboxed here as asked; the message is one line."""


def _check(result: int, what: str) -> int:
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")
    return result


def landlock_abi() -> int:
    """The Landlock ABI version of this kernel; 0 when it has no Landlock (or it is off)."""
    if sys.platform != "linux":
        return 0
    result = _libc.syscall(_SYS_CREATE_RULESET, None, ctypes.c_size_t(0), _CREATE_RULESET_VERSION)
    return max(int(result), 0)


# -------------------------------------------------------------------------------------------
# What a ROM may read


_ETC = (
    "/etc/ssl",
    "/etc/ca-certificates",
    "/usr/share/ca-certificates",
    "/etc/resolv.conf",
    "/etc/hosts",
    "/etc/nsswitch.conf",
    "/etc/gai.conf",
    "/etc/host.conf",
    "/etc/services",
    "/etc/protocols",
    "/etc/localtime",
    "/etc/ld.so.cache",
    "/usr/share/zoneinfo",
)
_SYSTEM = ("/usr/lib", "/usr/lib64", "/lib", "/lib64", "/usr/local/lib", "/usr/bin", "/bin")


def read_paths(python: str, pythonpath: Sequence[str]) -> list[Path]:
    """The paths a ROM may read (and execute): the Python installation it runs on, every
    entry of `sys.path` here (but the working directory, which the guest does not import
    from) and of `pythonpath`, the system libraries and binaries, and the files of /etc that
    TLS and name resolution need. Missing paths are left out."""
    cwd = os.getcwd()
    candidates = [
        sys.prefix,
        sys.base_prefix,
        sys.exec_prefix,
        sys.base_exec_prefix,
        os.path.dirname(os.path.realpath(python)),
        python,
        *(p for p in sys.path if p and os.path.realpath(p) != cwd),
        *pythonpath,
        *_SYSTEM,
        *_ETC,
    ]
    found: list[Path] = []
    for text in candidates:
        if not text:
            continue
        path = Path(os.path.realpath(text))
        if path.exists() and path not in found:
            found.append(path)
    return found


def _searchable_by_others(path: Path) -> bool:
    """Whether a user other than the owner (and not in its group) can reach and read `path`."""
    try:
        for parent in reversed(path.parents):
            if not os.stat(parent).st_mode & stat.S_IXOTH:
                return False
        mode = os.stat(path).st_mode
    except OSError:
        return False
    wanted = stat.S_IROTH | (stat.S_IXOTH if stat.S_ISDIR(mode) else 0)
    return mode & wanted == wanted


# -------------------------------------------------------------------------------------------
# Seccomp (x86-64)

_AUDIT_ARCH_X86_64 = 0xC000003E
_SECCOMP_MODE_FILTER = 2
_RET_ALLOW = 0x7FFF0000
_RET_ERRNO = 0x00050000
_BPF_LD_W_ABS, _BPF_JEQ_K, _BPF_JSET_K, _BPF_RET_K, _BPF_ALU_AND_K = 0x20, 0x15, 0x45, 0x06, 0x54
_SYS_SOCKET, _SYS_LISTEN, _SYS_CLONE, _SYS_CLONE3 = 41, 50, 56, 435
_DENIED_SYSCALLS = (
    101,  # ptrace
    310,  # process_vm_readv
    311,  # process_vm_writev
    272,  # unshare
    308,  # setns
    321,  # bpf
    298,  # perf_event_open
    323,  # userfaultfd
    248,  # add_key
    249,  # request_key
    250,  # keyctl
    425,  # io_uring_setup
    426,  # io_uring_enter
    427,  # io_uring_register
    303,  # name_to_handle_at
    304,  # open_by_handle_at
)
_CLONE_NAMESPACES = 0x7E020000  # CLONE_NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET


def _seccomp_program(net: bool) -> bytes:
    """A classic BPF program for the rules in the module docstring."""
    code: list[tuple[int, int, int, int]] = []
    errno_eperm = _RET_ERRNO | errno.EPERM
    errno_eacces = _RET_ERRNO | errno.EACCES

    def op(code_: int, k: int, jt: int = 0, jf: int = 0) -> None:
        code.append((code_, jt, jf, k))

    op(_BPF_LD_W_ABS, 4)  # arch
    op(_BPF_JEQ_K, _AUDIT_ARCH_X86_64, 1, 0)
    op(_BPF_RET_K, errno_eperm)
    op(_BPF_LD_W_ABS, 0)  # syscall number
    op(0x35, 0x40000000, 0, 1)  # jge: x32 syscalls
    op(_BPF_RET_K, errno_eperm)
    for nr in _DENIED_SYSCALLS:
        op(_BPF_JEQ_K, nr, 0, 1)
        op(_BPF_RET_K, errno_eperm)
    op(_BPF_JEQ_K, _SYS_LISTEN, 0, 1)
    op(_BPF_RET_K, errno_eacces)
    op(_BPF_JEQ_K, _SYS_CLONE3, 0, 1)  # its flags are in memory: callers fall back to clone
    op(_BPF_RET_K, _RET_ERRNO | errno.ENOSYS)
    if net:  # a socket: IPv4 and IPv6 only
        op(_BPF_JEQ_K, _SYS_SOCKET, 0, 5)
        op(_BPF_LD_W_ABS, 16)  # its family
        op(_BPF_JEQ_K, 2, 2, 0)  # AF_INET
        op(_BPF_JEQ_K, 10, 1, 0)  # AF_INET6
        op(_BPF_RET_K, errno_eacces)
        op(_BPF_RET_K, _RET_ALLOW)
    else:  # no socket at all (socketpair, a separate call, stays)
        op(_BPF_JEQ_K, _SYS_SOCKET, 0, 1)
        op(_BPF_RET_K, errno_eacces)
    op(_BPF_JEQ_K, _SYS_CLONE, 0, 3)
    op(_BPF_LD_W_ABS, 16)  # clone flags (low half)
    op(_BPF_JSET_K, _CLONE_NAMESPACES, 0, 1)
    op(_BPF_RET_K, errno_eperm)
    op(_BPF_RET_K, _RET_ALLOW)
    return b"".join(struct.pack("HBBI", *instruction) for instruction in code)


def _install_seccomp(program: bytes) -> None:
    count = len(program) // 8
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = struct.pack("HxxxxxxP", count, ctypes.addressof(buffer))
    prog = ctypes.create_string_buffer(fprog, len(fprog))
    _check(
        _libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.addressof(prog), 0, 0),
        "seccomp",
    )


# -------------------------------------------------------------------------------------------
# The sandbox


@dataclass(frozen=True, slots=True)
class ChildLimits:
    """Resource limits of one child; None: not limited."""

    memory: int | None = None  # bytes of address space (RLIMIT_AS)
    cpu_seconds: float | None = None  # RLIMIT_CPU: SIGXCPU, SIGKILL a second later
    procs: int | None = None  # processes and threads of its uid (RLIMIT_NPROC)
    files: int | None = None  # open file descriptors (RLIMIT_NOFILE)


@dataclass(frozen=True, slots=True)
class Sandbox:
    """How this host confines its ROMs. `enabled` False runs them unconfined (but still with
    their limits, a session of their own and a parent-death signal)."""

    enabled: bool = True
    abi: int = 0
    as_root: bool = False
    read_search: bool = False  # give CAP_DAC_READ_SEARCH to a ROM with a uid of its own
    seccomp: bool = False
    read: tuple[Path, ...] = ()

    @classmethod
    def for_host(
        cls, enabled: bool, python: str, pythonpath: Sequence[str], data_dir: Path
    ) -> Sandbox:
        """The sandbox of a host: raises SandboxError (one line) when it cannot confine ROMs
        (no Landlock) or when its data dir would be readable by them."""
        as_root = os.geteuid() == 0
        read = tuple(read_paths(python, pythonpath))
        data = data_dir.resolve()
        read_search = as_root and not all(_searchable_by_others(p) for p in (*read, data))
        if not enabled:
            return cls(enabled=False, as_root=as_root, read_search=read_search)
        abi = landlock_abi()
        if abi < 1:
            raise SandboxError(
                "this kernel has no Landlock (Linux 5.13 or later, enabled in the lsm= boot "
                "option), so ROMs cannot be confined; the host refuses to spawn them unless "
                "started with --unsafe-no-sandbox"
            )
        for path in read:
            if path.is_dir() and data.is_relative_to(path):
                raise SandboxError(
                    f"the data directory {data} is inside {path}, which ROMs may read; "
                    "choose a --data-dir outside the Python installation and sys.path"
                )
        seccomp = platform.machine() == "x86_64"
        return cls(True, abi, as_root, read_search, seccomp, read)

    def describe(self) -> str:
        """One line for the host's log: how ROMs are confined here."""
        if not self.enabled:
            text = "ROMs run without Landlock and seccomp (--unsafe-no-sandbox): they read "
            if self.as_root:
                text += "and write what a uid of their own may"
                text += (
                    " and, with CAP_DAC_READ_SEARCH, read every file" if self.read_search else ""
                )
                return text
            return text + "and write all this host's user can"
        missing = []
        if self.abi < 4:
            missing.append("TCP rules (Landlock ABI 4)")
        if self.abi < 6:
            missing.append("signal and abstract socket scoping (Landlock ABI 6)")
        if not self.seccomp:
            missing.append("seccomp (x86-64 only)")
        if not self.as_root:
            missing.append("a uid of their own and a PID namespace (the host is not root)")
        text = f"ROMs are confined with Landlock ABI {self.abi}"
        if self.as_root:
            text += ", a uid of their own each and a PID namespace"
            if self.read_search:
                text += " (with CAP_DAC_READ_SEARCH: Python or the data dir is not world-readable)"
        return text + (f"; missing: {', '.join(missing)}" if missing else "")

    def child_setup(
        self,
        limits: ChildLimits,
        *,
        net: bool,
        chown: Iterable[Path] = (),
    ) -> Callable[[], None]:
        """The function to run in the child between fork and exec (see the module docstring):
        everything but Landlock, which the guest applies (`landlock`, `apply_landlock`).

        `net`: whether it may open IPv4/IPv6 sockets (seccomp); `chown`: the directories to
        give to its uid first (with everything in them)."""
        parent = os.getpid()
        program = _seccomp_program(net) if self.enabled and self.seccomp else b""
        chowned = [str(p) for p in chown]
        bounding = _cap_last() if self.as_root else 0

        def apply() -> None:  # in the child, between fork and exec: no locks, no threads
            if self.as_root:
                _check(_libc.unshare(_CLONE_NEWPID), "unshare(CLONE_NEWPID)")
            _set_limits(limits)
            os.nice(NICE)
            if self.as_root:
                uid = UID_BASE + os.getpid()
                for path in chowned:
                    _chown_tree(path, uid)
                _become(uid, self.read_search, bounding)
            _check(_libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
            _check(_libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "pdeathsig")
            if os.getppid() != parent:  # the host died before the signal was set
                os._exit(1)
            if program:
                _install_seccomp(program)

        return apply

    def landlock(self, *, net: bool, writable: Iterable[Path]) -> str | None:
        """The Landlock rules of one child, as the guest's `--landlock` argument (None when
        the sandbox is off). The guest applies them in the ROM's own process before it loads
        the ROM (`apply_landlock`): only there does `/proc/self` name that process."""
        if not self.enabled:
            return None
        rules: list[tuple[str, int]] = [(str(p), READ) for p in self.read]
        rules += [(p, DEVICE) for p in ("/dev/null", "/dev/zero", "/dev/urandom", "/dev/random")]
        rules += [(str(p), _fs_rights(self.abi)) for p in writable]
        spec = {
            "fs": _fs_rights(self.abi),
            "net": (_NET_BIND_TCP | (0 if net else _NET_CONNECT_TCP)) if self.abi >= 4 else 0,
            "scoped": (_SCOPE_ABSTRACT_UNIX | _SCOPE_SIGNAL) if self.abi >= 6 else 0,
            "rules": rules,
        }
        return json.dumps(spec, separators=(",", ":"))


def apply_landlock(spec: str) -> None:
    """Confine this process (and all it starts) by the rules of `Sandbox.landlock`, plus read
    access to its own `/proc/self`. Raises SandboxError (one line) when that fails."""
    try:
        fields = json.loads(spec)
        rules = [(str(path), int(access)) for path, access in fields["rules"]]
        fs, net, scoped = int(fields["fs"]), int(fields["net"]), int(fields["scoped"])
    except (ValueError, KeyError, TypeError) as exc:
        raise SandboxError(f"bad --landlock rules ({exc})") from None
    # Opened here, /proc/self is this process's directory (by its pid in the host's namespace).
    rules.append(("/proc/self", _FS_READ_FILE | _FS_READ_DIR))
    try:
        _restrict(fs, net, scoped, rules)
    except OSError as exc:
        raise SandboxError(f"cannot confine the ROM with Landlock: {exc}") from None


def _set_limits(limits: ChildLimits) -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    for kind, value in (
        (resource.RLIMIT_AS, limits.memory),
        (resource.RLIMIT_NPROC, limits.procs),
        (resource.RLIMIT_NOFILE, limits.files),
    ):
        if value is not None:
            resource.setrlimit(kind, (value, value))
    if limits.cpu_seconds is not None:
        cpu = max(1, int(-(-limits.cpu_seconds // 1)))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))


def _chown_tree(top: str, uid: int) -> None:
    os.chown(top, uid, uid, follow_symlinks=False)
    for dirpath, dirs, files in os.walk(top):
        for name in dirs + files:
            with contextlib.suppress(OSError):
                os.chown(os.path.join(dirpath, name), uid, uid, follow_symlinks=False)


def _cap_last() -> int:
    try:
        return int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    except (OSError, ValueError):
        return 63


def _become(uid: int, read_search: bool, cap_last: int) -> None:
    """Drop root: every capability out of the bounding set (but CAP_DAC_READ_SEARCH when
    `read_search`), no groups, uid and gid `uid`, and that one capability as ambient."""
    for cap in range(cap_last + 1):
        if not (read_search and cap == _CAP_DAC_READ_SEARCH):
            with contextlib.suppress(OSError):
                _check(_libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0), "capbset")
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    if read_search:
        _check(_libc.prctl(_PR_SET_KEEPCAPS, 1, 0, 0, 0), "keepcaps")
    os.setresuid(uid, uid, uid)
    caps = (1 << _CAP_DAC_READ_SEARCH) if read_search else 0
    header = struct.pack("Ii", _CAP_VERSION_3, 0)
    data = struct.pack("IIIIII", caps, caps, caps, 0, 0, 0)  # effective, permitted, inheritable
    _check(_libc.capset(header, data), "capset")
    if read_search:
        _check(
            _libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_RAISE, _CAP_DAC_READ_SEARCH, 0, 0),
            "ambient",
        )
    else:
        _libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)


def _restrict(fs: int, net: int, scoped: int, rules: list[tuple[str, int]]) -> None:
    attr = struct.pack("QQQ", fs, net, scoped)
    size = len(attr) if scoped else 16 if net else 8
    ruleset = _check(
        _libc.syscall(_SYS_CREATE_RULESET, attr, ctypes.c_size_t(size), 0), "landlock ruleset"
    )
    try:
        for path, access in rules:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                if not stat.S_ISDIR(os.fstat(fd).st_mode):
                    access &= _FS_FILE_ONLY
                rule = struct.pack("=Qi", access & fs, fd)
                _check(
                    _libc.syscall(_SYS_ADD_RULE, ruleset, _RULE_PATH_BENEATH, rule, 0),
                    f"landlock rule for {path}",
                )
            finally:
                os.close(fd)
        _check(_libc.syscall(_SYS_RESTRICT_SELF, ruleset, 0), "landlock restrict_self")
    finally:
        os.close(ruleset)
