"""Unusual but legitimate ways to write a model's forward and to pass a model, on compile_parallel in one process.

Train as the model: forward(x, *args, **kwargs) called with extras and without; default arguments left out or
given by position or keyword; an Optional input passed as None; str / int / bool flags (mode="train") by keyword
or position; a list, tuple or dict of tensors as one input; a tuple output holding None, an int and a str beside
a tensor (pm(...) returns them as the model does); a custom autograd.Function reading ctx.needs_input_grad and
ctx.save_for_backward; a torch.compile'd submodule (without torch's warning on capture's global hooks); an
overridden __call__; float64 and float16 models (CPU), and a model built under torch.set_default_dtype(float64).
Said: Python attributes the forward changes (a call counter: it runs once, at capture). Refused by name: a
TorchScript submodule, a model or submodule wrapped in DataParallel or DistributedDataParallel (the fix: .module);
an Optional input captured as None and then given a tensor (named, with the fix).

Loss and gradients equal the unpartitioned model's run with gradient accumulation over the same microbatches
(test_hf_architectures.py's check: rel err < 1e-5).
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from test_architectures_more import BATCH, DIM, MICROBATCHES
from test_architectures_more import MLP as Body  # four tanh layers and a head
from test_hf_architectures import accumulated, assert_equals_the_model

from partitioner.api import compile_parallel
from partitioner.errors import CaptureError, RuntimeConfigError


class VarArgs(Body):
    def forward(self, x, *args, **kwargs):
        h = self.body(x)
        for a in args:
            h = h + a
        return self.head(h * kwargs["scale"] if "scale" in kwargs else h)


class Defaults(Body):
    def forward(self, x, scale=2.0, shift=None):
        h = self.body(x) * scale
        return self.head(h if shift is None else h + shift)


class Flags(Body):
    def forward(self, x, mode="train", k: int = 1, flip: bool = False):
        h = self.body(x) * (k if mode == "train" else 1)
        return self.head(-h if flip else h)


class ListInput(Body):
    def forward(self, xs):
        return self.head(self.body(xs[0] + xs[1]))


class DictInput(Body):
    def forward(self, d):
        return self.head(self.body(d["a"] * d["b"]))


class MixedOutput(Body):
    def forward(self, x):
        return self.head(self.body(x)), None, 3, "tag"


class MatMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, w):
        ctx.save_for_backward(a, w)
        return a @ w

    @staticmethod
    def backward(ctx, grad):
        a, w = ctx.saved_tensors
        return (grad @ w.t() if ctx.needs_input_grad[0] else None,
                a.t() @ grad if ctx.needs_input_grad[1] else None)


class FunctionModel(Body):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(DIM, DIM) / 3)

    def forward(self, x):
        return self.head(self.body(MatMul.apply(x, self.w)))


class Sub(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(DIM, DIM)

    def forward(self, x):
        return torch.relu(self.lin(x))


class WithSub(Body):
    def __init__(self, sub: nn.Module):
        super().__init__()
        self.sub = sub

    def forward(self, x):
        return self.head(self.sub(self.body(x)))


class CallOverridden(Body):
    def __call__(self, x, *args, **kwargs):
        return super().__call__(x * 2, *args, **kwargs)


class Counts(Body):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return super().forward(x)


def ce(out, target):
    return F.cross_entropy(out[0] if isinstance(out, tuple) else out, target)


def x(dtype=torch.float32) -> torch.Tensor:
    return torch.randn(BATCH, DIM, dtype=dtype)


def build(name: str) -> tuple[nn.Module, tuple, dict]:
    torch.manual_seed(0)
    cases = {
        "varargs-extras": lambda: (VarArgs(), (x(), x()), {"scale": x()}),
        "varargs-none": lambda: (VarArgs(), (x(),), {}),
        "defaults-left-out": lambda: (Defaults(), (x(),), {}),
        "defaults-by-position": lambda: (Defaults(), (x(), 3.0, x()), {}),
        "optional-none-by-keyword": lambda: (Defaults(), (x(),), {"shift": None, "scale": 0.5}),
        "flags-by-keyword": lambda: (Flags(), (x(),), {"mode": "train", "k": 3, "flip": True}),
        "flags-by-position": lambda: (Flags(), (x(), "eval", 2, True), {}),
        "list-input": lambda: (ListInput(), ([x(), x()],), {}),
        "tuple-input": lambda: (ListInput(), ((x(), x()),), {}),
        "dict-input": lambda: (DictInput(), ({"a": x(), "b": x()},), {}),
        "output-with-none-int-str": lambda: (MixedOutput(), (x(),), {}),
        "autograd-function-needs-input-grad": lambda: (FunctionModel(), (x(),), {}),
        "compiled-submodule": lambda: (WithSub(torch.compile(Sub())), (x(),), {}),
        "call-overridden": lambda: (CallOverridden(), (x(),), {}),
        "double": lambda: (Body().double(), (x(torch.float64),), {}),
        "half": lambda: (Body().half(), (x(torch.float16),), {}),
    }
    return cases[name]()


def compiled(model: nn.Module, args: tuple, kwargs: dict | None = None, target=None):
    return compile_parallel(copy.deepcopy(model), ["cpu"] * 2, args, ce, example_kwargs=kwargs, example_target=target,
                            microbatches=MICROBATCHES, time_limit_s=1)


def assert_trains_as_the_model(model: nn.Module, args: tuple, kwargs: dict):
    target = torch.randint(0, 3, (BATCH,))
    reference = copy.deepcopy(model)
    want_loss = accumulated(reference, args, kwargs, target, ce, MICROBATCHES)
    want = {n: p.grad for n, p in reference.named_parameters()}
    pm = compiled(model, args, kwargs, target)
    assert_equals_the_model(pm, pm.train_step(*args, target=target, **kwargs), want_loss, want)
    return pm


@pytest.mark.parametrize("name", ["varargs-extras", "varargs-none", "defaults-left-out", "defaults-by-position",
                                  "optional-none-by-keyword", "flags-by-keyword", "flags-by-position", "list-input",
                                  "tuple-input", "dict-input", "output-with-none-int-str",
                                  "autograd-function-needs-input-grad", "compiled-submodule", "call-overridden",
                                  "double", "half"])
def test_forward_patterns_train_as_the_model(name):
    model, args, kwargs = build(name)
    with warnings.catch_warnings():  # capture's global hooks (naming modules) are not the user's to hear of
        warnings.filterwarnings("error", r"Using `torch.compile\(module\)` when there are global hooks")
        pm = assert_trains_as_the_model(model, args, kwargs)
    if name == "output-with-none-int-str":
        with torch.no_grad():
            logits, none, three, tag = pm.eval()(*args)
            torch.testing.assert_close(logits, model.eval()(*args)[0])
        assert (none, three, tag) == (None, 3, "tag")


def test_a_model_built_under_a_float64_default_dtype_trains_as_the_model():
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        model, args = Body(), (torch.randn(BATCH, DIM),)
    finally:
        torch.set_default_dtype(before)
    assert next(model.parameters()).dtype == torch.float64
    assert_trains_as_the_model(model, args, {})


def test_python_attributes_the_forward_changes_are_said_to_change_once():
    """A call counter in forward runs once, at capture (torch.export restores it): said, naming it."""
    with pytest.warns(RuntimeWarning, match=r"Counts's forward changes Python attributes 'calls' \(0 -> 1\).*"
                                            r"register_buffer"):
        assert_trains_as_the_model(Counts(), (x(),), {})


def test_a_torchscript_submodule_is_refused_naming_it_and_the_fix():
    with pytest.raises(CaptureError, match=r"module 'sub' \(RecursiveScriptModule\) is a TorchScript module.*"
                                           r"Use the Python module it was made from"):
        compiled(WithSub(torch.jit.script(Sub())), (x(),))


def test_data_parallel_wrappers_are_refused_naming_model_module(tmp_path):
    with pytest.raises(CaptureError, match=r"module '<root>' \(DataParallel\) wraps .* pass model.module"):
        compiled(nn.DataParallel(Body()), (x(),))
    with pytest.raises(CaptureError, match=r"module 'sub' \(DataParallel\) .* use 'sub.module' in its place"):
        compiled(WithSub(nn.DataParallel(Sub())), (x(),))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        with pytest.raises(CaptureError, match=r"'<root>' \(DistributedDataParallel\) wraps .* pass model.module"):
            compiled(nn.parallel.DistributedDataParallel(Body()), (x(),))
    finally:
        dist.destroy_process_group()


def test_an_optional_input_captured_as_none_then_given_a_tensor_is_named():
    target = torch.randint(0, 3, (BATCH,))
    pm = compiled(Defaults(), (x(),), {"shift": None}, target)
    with pytest.raises(RuntimeConfigError, match=r"input 1 \('shift'\) is \(4, 16\) torch.float32 .* captured with "
                                                 r"None, a constant of the graph, there.*example inputs with a tensor"):
        pm.train_step(x(), shift=x(), target=target)
