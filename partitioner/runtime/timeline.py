"""Draw a simulated Timeline: a terminal chart and a Gantt figure (PNG/SVG/PDF).

Both show one row per rank, rank 0 on top, time to the right, as in the
pipeline papers (GPipe, Megatron-LM): forwards and backwards in distinct
styles, each chunk (virtual stage of a rank) in its own shade, the
microbatch number inside each box where it fits.
"""
from __future__ import annotations

from pathlib import Path

from partitioner.runtime.schedules import Action, Schedule
from partitioner.runtime.simulator import Timeline

# Terminal: fill characters per chunk (virtual stage of a rank) and rich colours.
_TEXT_FILL = {"F": "-~:+", "B": "=#%@"}
_TEXT_COLOUR = {"F": ("blue", "cyan", "bright_blue", "bright_cyan"),
                "B": ("dark_orange", "red", "yellow", "magenta")}
# Figure: forward in blues, backward in oranges, one shade per chunk.
_FIG_COLOUR = {"F": ("#3b6fb6", "#7fa7dc", "#1d3f73", "#b4cdee"),
               "B": ("#e07b39", "#f3ae7c", "#a14a14", "#f8d2b4")}


def _style(table: dict[str, tuple[str, ...] | str], kind: str, chunk: int) -> str:
    options = table[kind]
    return options[chunk % len(options)]


def _summary(tl: Timeline) -> str:
    s = tl.schedule
    chunks = f", {s.chunks} chunks/rank" if s.chunks > 1 else ""
    return (f"{s.name}: {s.num_ranks} ranks{chunks}, {s.microbatches} microbatches, "
            f"step {tl.step_time_s * 1e3:.3g} ms, bubble {tl.bubble:.1%}")


def render_text(timeline: Timeline, width: int = 100, markup: bool = False) -> str:
    """Per-rank rows of `width` cells; with markup=True, rich colour tags per chunk.

    A forward box is a run of "-" (chunk 0; "~", ":", "+" for later chunks),
    a backward one of "=" ("#", "%", "@"); the box starts with its microbatch
    number when it is wide enough; blank cells are idle time.
    """
    tl, s = timeline, timeline.schedule
    width = max(width, 1)
    scale = width / tl.step_time_s if tl.step_time_s > 0 else 0.0
    lines = [_summary(tl)]
    for r, row in enumerate(s.actions):
        chars = [" "] * width
        owner: list[Action | None] = [None] * width
        prev_end = 0  # boxes never overwrite the one before, rounding aside
        for a in row:
            if tl.end_s[a] == tl.start_s[a] or prev_end >= width:
                continue  # zero-length actions take no room
            c0 = max(int(round(tl.start_s[a] * scale)), prev_end)
            c1 = prev_end = min(max(int(round(tl.end_s[a] * scale)), c0 + 1), width)
            fill = _style(_TEXT_FILL, a.kind, s.local_chunk(a.stage))
            label = str(a.microbatch)
            cells = [fill] * (c1 - c0)
            if len(label) < len(cells):
                cells[: len(label)] = label
            chars[c0:c1] = cells
            owner[c0:c1] = [a] * (c1 - c0)
        body = "".join(chars) if not markup else _colour_runs(chars, owner, s)
        lines.append(f"rank {r:<2}|{body}|  peak {tl.peak_inflight[r]} in flight")
    legend = [f"F chunk {c}: {_TEXT_FILL['F'][c % 4]}  B chunk {c}: {_TEXT_FILL['B'][c % 4]}"
              for c in range(s.chunks)]
    lines.append("   ".join(legend) + "   digits: microbatch   blank: idle")
    return "\n".join(lines)


def _colour_runs(chars: list[str], owner: list[Action | None], s: Schedule) -> str:
    out, i = [], 0
    while i < len(chars):
        j = i
        while j < len(chars) and owner[j] == owner[i]:
            j += 1
        text = "".join(chars[i:j])
        a = owner[i]
        if a is None:
            out.append(text)
        else:
            colour = _style(_TEXT_COLOUR, a.kind, s.local_chunk(a.stage))
            out.append(f"[{colour}]{text}[/]")
        i = j
    return "".join(out)


def plot_timeline(timeline: Timeline, path: str | Path, title: str | None = None) -> Path:
    """Save a Gantt chart of the timeline (format from the suffix: .png, .svg, .pdf)."""
    import matplotlib  # lazy: slow to import, and only plots need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    tl, s = timeline, timeline.schedule
    fig, ax = plt.subplots(figsize=(12, 0.55 * s.num_ranks + 1.6))
    ms = 1e3
    step_ms = max(tl.step_time_s * ms, 1e-9)
    ax.set_xlim(0, step_ms)
    ax.set_ylim(s.num_ranks - 0.5, -0.5)  # rank 0 on top
    fig.tight_layout()
    px_per_ms = ax.get_window_extent().width / step_ms
    fontsize = 7 if s.microbatches >= 10 else 8
    used: set[tuple[str, int]] = set()
    for r, row in enumerate(s.actions):
        for a in row:
            start, dur = tl.start_s[a] * ms, (tl.end_s[a] - tl.start_s[a]) * ms
            if dur <= 0:
                continue
            chunk = s.local_chunk(a.stage)
            used.add((a.kind, chunk))
            ax.broken_barh([(start, dur)], (r - 0.4, 0.8),
                           facecolors=_style(_FIG_COLOUR, a.kind, chunk),
                           edgecolors="white", linewidth=0.6)
            label = str(a.microbatch)
            if dur * px_per_ms >= 0.75 * fontsize * len(label) + 3:
                ax.text(start + dur / 2, r, label, ha="center", va="center", fontsize=fontsize,
                        color="white" if chunk % 2 == 0 else "black")
    ax.set_yticks(range(s.num_ranks), [f"rank {r}" for r in range(s.num_ranks)])
    ax.set_xlabel("time (ms)")
    ax.set_title(title or _summary(tl), fontsize=10)
    ax.grid(axis="x", linestyle=":", linewidth=0.5, alpha=0.6)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    names = {"F": "forward", "B": "backward"}
    handles = [Patch(facecolor=_style(_FIG_COLOUR, kind, c),
                     label=names[kind] + (f" (chunk {c})" if s.chunks > 1 else ""))
               for kind in ("F", "B") for c in range(s.chunks) if (kind, c) in used]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.22 - 0.03 * (4 - min(s.num_ranks, 4))),
              ncol=min(len(handles), 6), frameon=False, fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)
    return path
