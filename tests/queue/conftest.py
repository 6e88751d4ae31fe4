"""Fixtures of the queue tests: real ww hosts (tests/ww/conftest.py) and replica groups."""

from __future__ import annotations

from tests.ww.conftest import HostFactory, HostProcess, host_factory, wait_for

__all__ = ["HostFactory", "HostProcess", "host_factory", "wait_for"]
