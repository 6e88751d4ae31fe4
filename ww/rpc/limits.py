"""Limits and defaults of a connection: credit windows, batching, buffering and timeouts."""

DEFAULT_WINDOW = 16
"""Stream items a producer may send ahead of its consumer."""

DEFAULT_SINK_WINDOW = 256
"""Items a sink's caller may push ahead of the sink method."""

MAX_SINK_WINDOW = 4096
"""The largest window a peer may open a sink with (the items it may make us hold)."""

BATCH_BYTES = 64 * 1024
"""Items of one stream or sink queued together go out as one frame up to this size."""

RECEIVE_SIZE = 64 * 1024
HIGH_WATER = 4 * 1024 * 1024
"""Queued outgoing bytes above which senders wait for the writer."""

MAX_IDLE_WORKERS = 128
"""Tasks kept waiting per connection to run the next incoming call."""

MAX_ANSWERS = 10_000
"""Incoming calls and streams that may run at once on one connection; more get an error."""

MAX_ERROR_MESSAGE = 4096
"""Longer error messages are cut to this many characters."""

RELEASE_TIMEOUT = 5.0
"""Seconds `_on_release` callbacks get when a connection closes."""
