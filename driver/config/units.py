"""Memory sizes as people write them (80GiB, 80GB, 81920MiB) and as shardlm prints them (GiB).

GiB, MiB, ... are powers of 1024; GB, MB, ... powers of 1000; a bare K, M, G or T (`80G`, as
Slurm and Docker write it) is a power of 1024. Letters may be in either case. A number without
a unit is refused where the unit cannot be guessed safely (`--gpu-memory 80` is not 80 bytes).
"""

from __future__ import annotations

import re

from parallel.errors import ConfigError

GIB = 2**30
SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)(?:e(\d+))?\s*([a-z]*)\s*$", re.IGNORECASE)
UNITS = {
    "b": 1,
    **{f"{p}b": 1000**i for i, p in enumerate("kmgt", 1)},
    **{f"{p}ib": 1024**i for i, p in enumerate("kmgt", 1)},
    **{p: 1024**i for i, p in enumerate("kmgt", 1)},
}
EXAMPLES = "e.g. 80GiB (80 x 2**30 bytes), 80GB (80 x 10**9) or 81920MiB"


def parse_size(text: str, bare: str = "refuse", what: str = "a memory size") -> int:
    """Bytes from '80GiB', '80 GB', '81920MiB', '1.5TiB' or '85899345920B'.

    A bare number is refused with a guess at what was meant (`bare="refuse"`), or read as bytes
    (`bare="bytes"`, for flags whose name says bytes)."""
    match = SIZE.match(text)
    if match is None or match.group(3).lower() not in UNITS | {"": 1}:
        raise ConfigError(f"cannot read {text!r} as {what}: write {EXAMPLES}")
    number = float(match.group(1)) * 10 ** int(match.group(2) or 0)
    unit = match.group(3).lower()
    if unit == "" and bare != "bytes":
        raise ConfigError(f"{text!r} has no unit: did you mean {_guess(text.strip(), number)}? ({EXAMPLES})")
    return int(number * UNITS.get(unit, 1))


def _guess(text: str, number: float) -> str:
    """What a bare number most likely meant: GiB when small, MiB when in the thousands, else bytes."""
    if number < 2**14:
        return f"{text}GiB"
    if number < 2**24:
        return f"{text}MiB"
    return f"{text}B ({format_gib(int(number))})"


def format_gib(nbytes: int | float, digits: int = 2) -> str:
    """'32.86 GiB'; under a tenth of a GiB in MiB ('16.0 MiB'), so that small sizes show."""
    if abs(nbytes) < GIB / 10:
        return f"{nbytes / 2**20:.1f} MiB"
    return f"{nbytes / GIB:.{digits}f} GiB"
