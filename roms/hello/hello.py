"""Say hello on the topic "test", then have another host of the cluster say hello too.

`ww run hello.rom [PEER]` runs this ROM here with the Host capability of the dialed host. It
publishes "Hello, World", then spawns its inner ROM (carried inside this ROM as data) at the
anchor `/<peer id>/hello` of PEER, or of the first other host in the view, and waits for it.
"""

from __future__ import annotations

import sys
from typing import Any

from ww.rom.guest import rom_data

TOPIC = "test"


async def main(host: Any, args: list[str]) -> int:
    if host is None:
        print("hello needs a host: run it with `ww run` (without --no-dial)", file=sys.stderr)
        return 1
    pubsub = await host.pubsub()
    topic = await pubsub.join(TOPIC)
    await topic.publish(b"Hello, World")
    print(f"published 'Hello, World' to {TOPIC!r}")

    me = await host.id()
    view = await host.view()
    others = [entry["peer"] for entry in await view.hosts() if entry["peer"] != me]
    if args:
        peer = args[0].strip("/")
        if peer not in others:
            print(f"{peer} is not another host in the view; see `ww ls`", file=sys.stderr)
            return 1
    elif others:
        peer = others[0]
    else:
        print("no other host in the view, so the inner ROM stays home; join one with --peer")
        return 0

    root = await host.root()
    anchor = await root.walk(f"/{peer}/hello")
    process = await anchor.spawn(rom_data("inner.rom"), [TOPIC])
    code = await process.wait()
    print(f"inner ROM on /{peer}/hello exited with {code}")
    return int(code)
