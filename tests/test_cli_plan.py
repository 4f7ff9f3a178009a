"""`partitioner plan` end to end on a tiny model, and its one-line errors (exit code 2)."""
from __future__ import annotations

import io
import re

import pytest
import torch
from rich.console import Console

import partitioner.plan_command
from partitioner.cli import main
from partitioner.errors import PartitionerError
from partitioner.plan import Plan
from partitioner.plan_command import plan_table, print_plan, summary_lines
from partitioner.units import human_bytes, parse_bytes

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


def raising_model(batch: int = 8):
    raise ValueError("no weights at /data/ckpt\n(a second line the CLI leaves out)")


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
    assert "device h100 with 80.00 GiB: the memory cap" in out  # the default device is named
    times = [line for line in out.splitlines() if " ms" in line and not set(line) & set("\u2502\u2503")
             and not line.startswith("host-bound")]
    assert len(times) == 1 and "objective" not in out and "OPTIMAL" not in out  # one step time, no solver jargon
    plan = Plan.from_json(path.read_text())
    assert plan.model == MODEL and plan.device == "h100" and plan.device_mem_bytes == 80 * 2**30 and plan.version
    assert plan.num_ranks == 2 and plan.microbatches == 4 and sorted(set(plan.block_stage)) == [0, 1]
    assert plan.replicated_params == ["emb.weight"]  # embedding on the first rank, head on the last


def test_auto_chunks_says_what_it_compared_and_plans_the_choice(capsys, tmp_path):
    path = tmp_path / "plan.json"
    code, out, err = run(capsys, MODEL, "--devices", "2", "--chunks", "auto", "--microbatches", "4", "--json",
                         str(path), "--time-limit", "3")
    assert code == 0, err
    line = next(line for line in out.splitlines() if line.startswith("chunks='auto': "))
    assert "1f1b" in line and "interleaved x2" in line and "interleaved x4" in line and "->" in line
    plan = Plan.from_json(path.read_text())
    assert plan.num_stages == 2 * plan.chunks and plan.schedule in line.split("->")[1]


def test_cuda_graph_plans_the_step_without_host_time(capsys):
    """--cuda-graph: a host-bound compiled step (small model, H100 costs) is planned at its device time."""
    steps = []
    for flags in ((), ("--cuda-graph",)):
        code, out, err = run(capsys, MODEL, "--devices", "2", "--microbatches", "4", "--compile", "--time-limit", "2",
                             *flags)
        assert code == 0, err
        value, unit = re.search(r"predicted step time ([\d.]+) (ms|us)", out).groups()
        steps.append(float(value) * (1e-3 if unit == "us" else 1.0))
        assert ("host-bound: a microbatch's kernels take" in out) == (not flags)  # the hint, until planned for graphs
        assert ("compile_parallel(compile={'mode': 'reduce-overhead'})" in out) == (not flags)
    assert steps[1] < steps[0]


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
    ([MODEL, "--devices", "2", "--memory", "24"], "'24' has no unit: write e.g. 24GiB"),
    ([MODEL, "--devices", "2", "--batch", "0"], "--batch is 0: give a positive batch size"),
    ([MODEL, "--devices", "2", "--batch", "-1"], "--batch is -1"),
    ([MODEL, "--devices", "2", "--seq", "-4"], "--seq is -4: give a positive sequence length"),
    (["gpt2", "--devices", "2", "--seq", "0"], "--seq is 0"),  # was silently the default 1024
    (["tests.test_cli_plan:raising_model", "--devices", "2"],
     "'tests.test_cli_plan:raising_model' raised ValueError: no weights at /data/ckpt"),
    ([MODEL, "--devices", "2", "--timeline", "t.txt"], "draws a .png, .pdf or .svg file (e.g. t.png)"),
    ([MODEL, "--devices", "2", "--device-type", "h900"], "unknown device type 'h900'"),
    ([MODEL, "--devices", "2", "--gap", "150"], "outside 0-100%"),
    ([MODEL, "--devices", "2", "--gap", "-1"], "outside 0-100%"),
    ([MODEL, "--devices", "2", "--chunks", "auto", "--schedule", "1f1b"], "chunks='auto' chooses the schedule"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, argv, match):
    code, out, err = run(capsys, *argv, "--time-limit", "5")
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and match in lines[0], err


@pytest.fixture
def no_solve(monkeypatch):
    """The checks must come before the model is loaded and planned."""
    def fail(*args, **kwargs):
        raise AssertionError("planned before the arguments were checked")
    monkeypatch.setattr(partitioner.plan_command, "plan_model", fail)


@pytest.mark.parametrize("flag,path,match", [
    ("--json", "{tmp}", "is a directory: give a file name, e.g. {tmp}/plan.json"),
    ("--json", "{tmp}/no/such/plan.json", "the folder {tmp}/no/such does not exist"),
    ("--timeline", "{tmp}", "is a directory: give a file name, e.g. {tmp}/timeline.png"),
    ("--timeline", "{tmp}/no/t.png", "the folder {tmp}/no does not exist"),
])
def test_unwritable_outputs_fail_before_the_solve(capsys, tmp_path, no_solve, flag, path, match):
    code, out, err = run(capsys, MODEL, "--devices", "2", flag, path.format(tmp=tmp_path))
    assert code == 2 and err.count("\n") == 1 and match.format(tmp=tmp_path) in err, err


def test_read_only_folder_fails_before_the_solve(capsys, tmp_path, no_solve, monkeypatch):
    monkeypatch.setattr("os.access", lambda path, mode: False)  # as if read-only (root may write anywhere)
    code, out, err = run(capsys, MODEL, "--devices", "2", "--json", str(tmp_path / "plan.json"))
    assert code == 2 and f"--json {tmp_path / 'plan.json'} is not writable" in err


def test_seq_beyond_the_context_prints_a_note(capsys, monkeypatch):
    def stop(*args, **kwargs):
        raise PartitionerError("stopped before loading")
    monkeypatch.setattr("partitioner.plan_command.load_model_spec", stop)
    code, out, err = run(capsys, "gpt2", "--devices", "2", "--seq", "4096")
    assert code == 2 and "gpt2 has a context of 1024 positions; --seq 4096 enlarges its position table" in \
        " ".join(err.split())
    code, out, err = run(capsys, "gpt2", "--devices", "2", "--seq", "1024")
    assert "note:" not in err


def test_memory_sizes_need_a_unit():
    assert parse_bytes("24GiB") == 24 * 2**30 and parse_bytes("1.5e10B") == 15 * 10**9 and parse_bytes("80 gb") == 80e9
    with pytest.raises(PartitionerError, match="no unit"):
        parse_bytes("1.5e10")


def _plan(ranks: int = 2, chunks: int = 1) -> Plan:
    K, per = ranks * chunks, 7
    return Plan.of(num_ranks=ranks, chunks=chunks, schedule="1f1b" if chunks == 1 else "interleaved-1f1b",
                microbatches=2 * ranks, block_stage=[k for k in range(K) for _ in range(per)],
                stage_rank=[k % ranks for k in range(K)], node_stage={}, stage_fwd_time_s=[0.01234] * K,
                stage_bwd_time_s=[0.02468] * K, stage_comm_time_s=[1.4e-4] * K, stage_param_bytes=[123 * 2**20] * K,
                stage_saved_bytes=[987 * 2**20] * K, rank_mem_bytes=[int(9.87 * 2**30)] * ranks, step_time_s=0.39,
                bubble=0.17, solver_status="OPTIMAL", solve_time_s=1.0, memory_cap_bytes=80 * 2**30,
                model="gpt2", device="h100", device_mem_bytes=80 * 2**30, version="0.1.0")


@pytest.mark.parametrize("chunks", [1, 2])
def test_plan_table_fits_80_columns(chunks):
    plan = _plan(4, chunks)
    names = [f"transformer.h.{b // 2}.{'attn' if b % 2 else 'mlp'}.c_proj" for b in range(len(plan.block_stage))]
    console = Console(file=io.StringIO(), width=80)
    print_plan(plan, block_names=names, console=console)
    text = console.file.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "\u2026" not in text  # no number cut short
    for cell in ("123 MiB", "987 MiB", "37.02 ms", "9.87 GiB", "transformer.h.3"):
        assert cell in text
    wide = Console(file=io.StringIO(), width=160)
    wide.print(plan_table(plan, width=160, block_names=names))
    assert "140.0 us" in wide.file.getvalue() and "12.34 ms" in wide.file.getvalue()


def test_columns_80_is_honoured_in_a_pipe_and_loses_no_column(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    code, out, err = run(capsys, MODEL, "--devices", "2", "--microbatches", "4", "--time-limit", "5")
    assert code == 0, err
    assert max(len(line) for line in out.splitlines()) <= 80 and "\u2026" not in out
    for col in ("rank", "blocks", "params", "saved/mb", "fwd+bwd", "memory"):
        assert col in out


@pytest.mark.parametrize("changes,line", [
    ({}, "device h100 with 80.00 GiB: the memory cap"),
    ({"memory_cap_bytes": 24 * 2**30}, "device h100 with 80.00 GiB; memory cap 24.00 GiB per rank"),
    ({"step_lower_bound_s": 0.39}, "proven best, no valid plan is predicted faster"),
    ({"step_lower_bound_s": 0.35}, "the best valid plan is at most 10.3% faster"),
    ({}, "how close to the best plan is not known"),
    ({"solver_status": "DP_FALLBACK"}, "no ILP plan in time: chain DP split (raise"),
    ({"solver_status": "DP_FALLBACK+refined"}, "chain DP split, polished (raise"),
    ({"solver_status": "DP_FALLBACK+refined", "step_lower_bound_s": 0.35}, "at most 10.3% faster"),
])
def test_summary_says_device_cap_and_search_quality_in_words(changes, line):
    plan = _plan().replace(**changes)
    lines = summary_lines(plan)
    assert any(line in x for x in lines), lines
    assert sum(" ms" in x for x in lines) == 1 and all(len(x) <= 80 for x in lines)


def test_str_of_a_plan_is_a_short_summary():
    text = str(_plan(16, 2))
    assert len(text) < 1000 and text.count("\n") < 14, text
    assert text.startswith("Plan of gpt2: 16 ranks x 2 stages each") and "rank 7: stages 7, 23" in text
    assert "8 more ranks" in text and "print_plan" in text and repr(_plan()) == str(_plan())


def test_default_batch_is_rounded_up_to_the_microbatches(capsys):
    code, out, err = run(capsys, MODEL, "--devices", "2", "--microbatches", "3", "--time-limit", "5")
    assert code == 0 and "using --batch 9" in err


def test_summary_says_proven_within_the_gap_or_stopped_at_the_time_limit():
    plan = _plan()
    plan = plan.replace(step_lower_bound_s=plan.step_time_s * 0.992, gap_limit=0.01, solve_time_s=1.2)
    assert "proven within 0.8% of the best possible in 1.2 s" in summary_lines(plan)
    plan = plan.replace(step_lower_bound_s=plan.step_time_s * 0.97, time_limit_s=10.0, solve_time_s=10.1)
    assert "stopped at the time limit (10 s) with a gap of 3.0%" in summary_lines(plan)


def test_parameters_over_the_cap_are_refused_before_profiling(capsys, monkeypatch, tmp_path):
    """The parameters' training state alone over the cap: refused after capture, nothing profiled or solved;
    the bound is the one the solver checks (the profile's param_state_bytes)."""
    import partitioner.cost_models.profile as profile_module
    from partitioner.cost_models.profile import parameter_state_bytes, profile
    from partitioner.passes.capture import capture

    model, (tokens,) = tiny_model()
    captured = capture(model, (tokens[:2],))
    states = parameter_state_bytes(captured, optimizer="adamw")
    assert states == profile(captured, optimizer="adamw", progress=False).param_state_bytes
    share = sum(states.values()) / 2

    def fail(*args, **kwargs):
        raise AssertionError("profiled a model whose parameters cannot fit")

    monkeypatch.setattr(profile_module, "profile", fail)
    monkeypatch.setenv("PARTITIONER_CACHE", str(tmp_path))  # not profiled by an earlier test
    code, out, err = run(capsys, MODEL, "--devices", "2", "--memory", f"{int(share) - 1}B")
    assert code == 2 and "parameters, gradients and adamw states alone, over 2 devices" in err, err
    assert f"at least {human_bytes(share)}" in err


def test_console_script_flushes_and_keeps_the_exit_code(tmp_path):
    """`python -m partitioner.cli` exits through os._exit (no interpreter teardown): everything printed
    reaches a pipe, written files are whole, and the exit code is main()'s."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, PARTITIONER_CACHE=str(tmp_path))
    path = tmp_path / "plan.json"
    ok = subprocess.run([sys.executable, "-m", "partitioner.cli", "plan", MODEL, "--devices", "2", "--json", str(path),
                         "--time-limit", "5"], capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr
    assert "predicted step time" in ok.stdout and ok.stdout.rstrip().endswith(f"plan written to {path}")
    assert Plan.from_json(path.read_text()).num_ranks == 2
    bad = subprocess.run([sys.executable, "-m", "partitioner.cli", "plan", MODEL, "--devices", "2", "--gap", "150"],
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "outside 0-100%" in bad.stderr
