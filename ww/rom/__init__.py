"""ROMs: the archive format (`archive`), the host's ROM cache (`cache`), the executor that runs
each spawned ROM in a child process (`executor`, `process_log`), what a ROM may touch besides
its capabilities (`permissions`) and how the kernel holds it to that (`sandbox`), and the guest
side that runs a ROM's `main` in that child (`guest`)."""

from ww.rom.archive import (
    MAX_FILE_BYTES,
    MAX_FILES,
    MAX_ROM_BYTES,
    MAX_TOTAL_BYTES,
    Manifest,
    Rom,
    RomError,
    build_rom,
    build_rom_file,
)

__all__ = [
    "MAX_FILES",
    "MAX_FILE_BYTES",
    "MAX_ROM_BYTES",
    "MAX_TOTAL_BYTES",
    "Manifest",
    "Rom",
    "RomError",
    "build_rom",
    "build_rom_file",
]
