"""Helpers shared by the benchmark scripts: a rich table on stdout and a JSON record on disk.

Every result file says where and how it was produced (machine, torch version,
command), so numbers from different machines are never mixed up.
"""
from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

# PARTITIONER_RESULTS_DIR redirects every benchmark's output (the quick suite writes to
# benchmarks/results/quick, so it never overwrites the full runs the README quotes)
RESULTS_DIR = Path(os.environ.get("PARTITIONER_RESULTS_DIR") or Path(__file__).resolve().parent / "results")


def machine_info() -> dict[str, Any]:
    """Platform, CPU count, torch version and accelerators of this machine."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "cuda_devices": [],
    }
    if torch.cuda.is_available():
        info["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def command_line() -> str:
    """How this script was started, without this machine's paths: "python -m benchmarks.capture --x 1"."""
    script = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    root = Path(__file__).resolve().parent.parent
    if script is not None and script.suffix == ".py" and script.resolve().is_relative_to(root):
        head = ["python", "-m", ".".join(script.resolve().relative_to(root).with_suffix("").parts)]
    else:
        head = ["python", script.name if script else "-c"]
    return " ".join(shlex.quote(a) for a in head + _without_output_paths(sys.argv[1:]))


def _without_output_paths(args: list[str]) -> list[str]:
    """Drop where the results were written (--results-dir/--out DIR): a path of that machine,
    not part of what reproduces the numbers."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a in ("--results-dir", "--out"):
            skip = True
        elif not a.startswith(("--results-dir=", "--out=")):
            out.append(a)
    return out


def add_training_run_arguments(parser, default_name: str, time_limit_s: float = 10.0) -> None:
    """The options every training benchmark takes: warm-up, solver time, device, tiny models, output."""
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation, allocation)")
    parser.add_argument("--time-limit", type=float, default=time_limit_s, help="solver time per plan (s)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="the zoo's tiny configs (smoke test)")
    parser.add_argument("--name", default=None, help=f"result name (default {default_name})")
    parser.add_argument("--results-dir", default=None, help="write the JSON and figures here instead of "
                        "benchmarks/results")


def write_result(name: str, rows: list[dict], extra: dict | None = None) -> Path:
    """Write benchmarks/results/<name>.json with the rows, the machine and the command; return its path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    record = {
        "benchmark": name,
        "command": command_line(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(),
        "torch_version": torch.__version__,
        "rows": rows,
        **(extra or {}),
    }
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return path


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e4 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def print_table(title: str, rows: list[dict]) -> None:
    """Print rows (dicts with the same keys) as a rich table; numbers right-aligned."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    for col in columns:
        numeric = all(isinstance(r.get(col), (int, float)) for r in rows if col in r)
        table.add_column(col, justify="right" if numeric else "left")
    for row in rows:
        table.add_row(*(_fmt(row.get(col, "")) for col in columns))
    console = Console()
    if not console.is_terminal:  # piped output: do not squeeze columns to 80 characters
        console = Console(width=200)
    console.print(table)


def timed(fn: Callable[[], Any], sync: Callable[[], Any]) -> float:
    """Seconds of fn(), with sync() before and after (device work and peers included)."""
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def quantile(values: list[float], q: float) -> float:
    """The q-quantile of values (nearest rank)."""
    v = sorted(values)
    return v[min(len(v) - 1, round(q * (len(v) - 1)))]


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (benchmarks write PNGs, never open windows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path, title: str | None = None, **title_kwargs) -> None:
    """Lay out `fig`, write it to `path` (120 dpi) and close it; `title` goes over all its panels."""
    if title:
        fig.suptitle(title, **title_kwargs)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
