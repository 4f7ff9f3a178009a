"""`partitioner plan` end to end on a tiny model, and its one-line errors (exit code 2)."""
from __future__ import annotations

import pytest
import torch

from partitioner.cli import main
from partitioner.plan import Plan

MODEL = "tests.test_cli_plan:tiny_model"


class Tiny(torch.nn.Module):
    def __init__(self, layers: int = 6, width: int = 32):
        super().__init__()
        self.emb = torch.nn.Embedding(64, width)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(layers))
        self.head = torch.nn.Linear(width, 64, bias=False)
        self.head.weight = self.emb.weight  # tied

    def forward(self, idx):
        h = self.emb(idx)
        for layer in self.layers:
            h = h + torch.relu(layer(h))
        return self.head(h)


def tiny_model(batch: int = 8, seq: int = 16):
    return Tiny(), (torch.randint(0, 64, (batch, seq)),)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["plan", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_plan_prints_table_compare_and_writes_json(capsys, tmp_path):
    path = tmp_path / "plan.json"
    code, out, err = run(capsys, MODEL, "--devices", "2", "--microbatches", "4", "--compare", "--json", str(path),
                         "--time-limit", "5")
    assert code == 0, err
    assert "ILP vs baselines" in out and "predicted step time" in out and "torchtitan" in out
    plan = Plan.from_json(path.read_text())
    assert plan.num_ranks == 2 and plan.microbatches == 4 and sorted(set(plan.block_stage)) == [0, 1]
    assert plan.replicated_params == ["emb.weight"]  # embedding on the first rank, head on the last


def test_plan_draws_timeline(capsys, tmp_path):
    png = tmp_path / "t.png"
    code, out, err = run(capsys, MODEL, "--devices", "2", "--chunks", "2", "--microbatches", "4",
                         "--timeline", str(png), "--time-limit", "5")
    assert code == 0, err
    assert png.stat().st_size > 1000


@pytest.mark.parametrize("argv,match", [
    (["no-such-model", "--devices", "2"], "unknown zoo model"),
    ([MODEL, "--devices", "0"], "at least 1 device"),
    ([MODEL, "--devices", "64", "--microbatches", "8"], "only"),
    ([MODEL, "--devices", "2", "--memory", "1KiB"], "smallest per-device memory that fits"),
    ([MODEL, "--devices", "4", "--chunks", "2", "--microbatches", "6"], "multiple of the 4 devices"),
    ([MODEL, "--devices", "2", "--batch", "8", "--microbatches", "3"], "not divisible into 3 microbatches"),
    ([MODEL, "--devices", "2", "--memory", "lots"], "cannot read memory size"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, argv, match):
    code, out, err = run(capsys, *argv, "--time-limit", "5")
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and match in lines[0], err


def test_default_batch_is_rounded_up_to_the_microbatches(capsys):
    code, out, err = run(capsys, MODEL, "--devices", "2", "--microbatches", "3", "--time-limit", "5")
    assert code == 0 and "using --batch 9" in err
