"""The Lua scripts in `lua/`, read once at import.

Each script names its KEYS and ARGV in its comments; the comments are dropped here, since a
creation sends its scripts whole (EVAL) and Redis hashes them each time. `fair.lua`, `slots.lua`
and `task.lua` are libraries: prepend them to the scripts that use them.
"""

from __future__ import annotations

from importlib import resources


def script(name: str) -> str:
    """`lua/<name>.lua` without its comment lines."""
    text = resources.files(__package__).joinpath("lua", f"{name}.lua").read_text()
    return "".join(line for line in text.splitlines(True) if not line.lstrip().startswith("--"))
