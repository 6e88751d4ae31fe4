"""ww: Wetware hosts that lend capabilities to programs shipped as ROMs."""

__version__ = "0.1.0"
