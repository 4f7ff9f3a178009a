"""Sizes, bandwidths, times and FLOPs as people write them: parsed from the command line and the
API (`memory="24GiB"`), and printed in plans and profiles."""
from __future__ import annotations

import re

from partitioner.errors import PlanError

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'24GiB', '80 GB', '1.5e10B' -> bytes. The unit is required: a bare '24' is more likely
    meant as GiB than as 24 bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", text, re.IGNORECASE)
    if match and not match.group(2):
        raise PlanError(f"memory size {text!r} has no unit: write e.g. {match.group(1)}GiB, {match.group(1)}GB "
                        f"or {match.group(1)}MiB ({match.group(1)}B for bytes)")
    if not match or match.group(2).lower() not in _UNITS:
        raise PlanError(f"cannot read memory size {text!r}: write e.g. 24GiB, 80GB or 1.5e10B")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def parse_bandwidth(text: str) -> float:
    """'50GB/s', '25 GiB/s', '4e10B/s' -> bytes per second (the '/s' may be left out)."""
    body = re.sub(r"\s*/\s*s\s*$", "", text, flags=re.IGNORECASE)
    try:
        return float(parse_bytes(body))
    except PlanError:
        raise PlanError(f"cannot read bandwidth {text!r}: write e.g. 50GB/s, 25GiB/s or 4e10B/s") from None


def dtype_name(dtype) -> str:
    """A torch dtype as the costs and plans name it ("float32", "bfloat16"); a name stays as it is."""
    return dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")


def human_time(s: float) -> str:
    return f"{s * 1e6:.1f} us" if s < 1e-3 else f"{s * 1e3:.2f} ms" if s < 10 else f"{s:.2f} s"


def human_bytes(n: float) -> str:
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def human_flops(n: float) -> str:
    for unit, size in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} FLOP"


def first_few(names: list[str], shown: int = 3) -> str:
    """The first `shown` names joined, and how many more: "'a', 'b', 'c' and 2 more"."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
