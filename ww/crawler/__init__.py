"""The distributed web crawler: pure parts (URLs, scope, robots, links), the worker, the
export and the `ww-crawl` command."""
