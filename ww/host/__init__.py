"""The ww host: membership, pubsub, anchors, channels and ROM processes, served over ww.rpc.

Start one with `run_host(HostConfig(...))` (or `ww start`). The sans-I/O cores live in their
own modules: `paths` and `anchors` (the tree), `view` (membership), `pubsub` (routing),
`channel`, `restarts` (policies, backoff, the records in the data dir); `volumes` maps anchor
paths to durable directories, `supervisor` runs a process across its restarts; `caps` are the
capabilities lent to clients and processes, `node` the host's state, `links` the host↔host
connections and `server` the listening shell.
"""

from ww.host.config import HostConfig, HostError, HostInfo
from ww.host.server import run_host

__all__ = ["HostConfig", "HostError", "HostInfo", "run_host"]
