"""Drawing a Timeline (partitioner/runtime/timeline.py)."""
from __future__ import annotations

import numpy as np
import pytest
from matplotlib import colors
from matplotlib.image import imread
from rich.text import Text

from partitioner.runtime.schedules import make_schedule
from partitioner.runtime.simulator import StageCosts, simulate
from partitioner.runtime.timeline import _FIG_COLOUR, plot_timeline, render_text


def _timeline(name="1f1b", p=4, m=8, v=1, fwd=1e-3, bwd=2e-3):
    return simulate(make_schedule(name, p, m, v), StageCosts.uniform(p * v, fwd / v, bwd / v))


def test_text_has_one_row_per_rank_of_the_asked_width():
    tl = _timeline()
    lines = render_text(tl, width=80).splitlines()
    assert lines[0].startswith("1f1b: 4 ranks, 8 microbatches, step 33 ms, bubble 27.3%")
    rows = [line for line in lines if line.startswith("rank")]
    assert len(rows) == 4
    for r, row in enumerate(rows):
        body = row.split("|")[1]
        assert len(body) == 80
        assert f"peak {4 - r} in flight" in row
    # busy cells follow the timeline: rank 0 starts at once, the last rank waits and ends early
    assert rows[0].split("|")[1][0] == "0"
    assert rows[3].split("|")[1].startswith("   ") and rows[3].split("|")[1].endswith(" ")
    assert rows[0].split("|")[1][-1] == "="  # rank 0 finishes with a backward
    # every box wide enough shows its microbatch: gpipe's 8 forwards on rank 0
    gpipe = render_text(_timeline("gpipe"), width=100).splitlines()[1].split("|")[1]
    assert [c for c in gpipe if c.isdigit()] == list("01234567") * 2


def test_text_markup_gives_the_same_characters_in_colour():
    tl = _timeline("interleaved-1f1b", p=2, m=4, v=2)
    plain = render_text(tl, width=60)
    coloured = render_text(tl, width=60, markup=True)
    assert coloured != plain
    assert Text.from_markup(coloured).plain == plain
    assert "~" in plain and "#" in plain  # chunk 1's forward and backward styles


def test_text_of_zero_time_timeline_is_idle():
    tl = _timeline(fwd=0.0, bwd=0.0)
    rows = [line for line in render_text(tl, width=20).splitlines() if line.startswith("rank")]
    assert all(row.split("|")[1] == " " * 20 for row in rows)


@pytest.mark.parametrize("name,v", [("1f1b", 1), ("interleaved-1f1b", 2)])
def test_png_shows_forward_and_backward_colours(tmp_path, name, v):
    tl = _timeline(name, p=4, m=8, v=v)
    out = plot_timeline(tl, tmp_path / f"{name}.png", title="test")
    image = imread(out)[..., :3]
    assert image.shape[0] > 200 and image.shape[1] > 1000

    def pixels(hex_colour):
        rgb = np.array(colors.to_rgb(hex_colour))
        return int((np.abs(image - rgb).max(axis=-1) < 0.02).sum())

    for kind in ("F", "B"):
        for chunk in range(v):
            assert pixels(_FIG_COLOUR[kind][chunk]) > 500, (kind, chunk)
    assert pixels(_FIG_COLOUR["F"][2]) < 50  # no third chunk drawn
    # backward boxes take twice the time of forward ones
    assert pixels(_FIG_COLOUR["B"][0]) > 1.5 * pixels(_FIG_COLOUR["F"][0])
