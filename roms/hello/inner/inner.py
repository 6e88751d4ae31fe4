"""Publish "Hello from <peer id>" to the topic given as the first argument (default "test")."""

from __future__ import annotations

from typing import Any


async def main(host: Any, args: list[str]) -> None:
    topic_name = args[0] if args else "test"
    peer = await host.id()
    pubsub = await host.pubsub()
    topic = await pubsub.join(topic_name)
    await topic.publish(f"Hello from {peer}".encode())
    print(f"published 'Hello from {peer}' to {topic_name!r}")
