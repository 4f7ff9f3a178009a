"""partitioner/modes.py: pm.train()/pm.eval() switch every stage; eval is deterministic with
dropout > 0 and equals the unsplit model in eval mode; both modes share the parameters."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import transformers
from torch._subclasses.fake_tensor import FakeTensor
from dist_utils import max_rel_err, reference, run_workers

from partitioner import zoo
from partitioner.api import compile_parallel
from partitioner.errors import RuntimeConfigError


def _dropout_gpt2(seed: int = 0) -> zoo.ZooModel:
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64, use_cache=False,
                                  resid_pdrop=0.2, embd_pdrop=0.2, attn_pdrop=0.2, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(cfg).train()
    gen = torch.Generator().manual_seed(seed)
    tokens, target = torch.randint(0, 100, (4, 8), generator=gen), torch.randint(0, 100, (4, 8), generator=gen)
    return zoo.ZooModel("gpt2-dropout", model, (tokens,), {}, target, zoo.lm_loss)


def _compile(zm, world: int):
    return compile_parallel(copy.deepcopy(zm.model), ["cpu"] * world, zm.example_args, zm.loss_fn,
                            microbatches=2, timeout_s=60)


def test_eval_is_deterministic_and_equals_the_model_in_eval_mode():
    zm = _dropout_gpt2()
    pm = _compile(zm, 2)
    assert pm.training
    # what recaptures the other mode keeps no weights alive: a copy of the model whose tensors are
    # FakeTensors (no storage) on the model's device, still tied
    assert all(isinstance(t, FakeTensor) and t.device.type == "cpu" for t in [*pm.model.parameters(),
                                                                             *pm.model.buffers()])
    assert pm.model.lm_head.weight is pm.model.transformer.wte.weight
    x, = zm.example_args
    with torch.no_grad():
        a, b = pm(x).logits, pm(x).logits
        assert not torch.equal(a, b)  # dropout on: compiled in training mode
        pm.eval()
        assert not pm.training
        y1, y2 = pm(x).logits, pm(x).logits
        want = copy.deepcopy(zm.model).eval()(x).logits
    assert torch.equal(y1, y2)
    assert max_rel_err(y1, want) < 1e-5
    # training in eval mode: loss and gradients of the model in eval mode
    ref_model = copy.deepcopy(zm.model).eval()
    ref_loss, ref_grads = reference(zoo.ZooModel("m", ref_model, zm.example_args, {}, zm.target, zm.loss_fn))
    loss = pm.train_step(x, target=zm.target)
    assert max_rel_err(loss, ref_loss) < 1e-5
    for name, p in pm.named_parameters():
        assert max_rel_err(p.grad, ref_grads[name]) < 1e-5, name
    # both modes read the same tensors: weights loaded in train mode show in eval mode
    other = _dropout_gpt2(seed=1).model
    pm.train().load_state_dict(other.state_dict())
    with torch.no_grad():
        assert max_rel_err(pm.eval()(x).logits, other.eval()(x).logits) < 1e-5
    assert pm.train() is pm and pm.training


def _worker(rank: int, world: int, _arg) -> dict:
    zm = _dropout_gpt2()
    pm = _compile(zm, world)
    x, = zm.example_args
    with torch.no_grad():
        pm.eval()
        y1, y2 = pm(x), pm(x)
        want = copy.deepcopy(zm.model).eval()(x).logits
    pm.train()
    loss = pm.train_step(x, target=zm.target)  # the training graph still runs after the switch
    out = {"loss": loss.item()}
    if y1 is not None:
        out.update(equal=torch.equal(y1.logits, y2.logits), err=max_rel_err(y1.logits, want))
    return out


def test_eval_over_two_gloo_ranks():
    results = run_workers(_worker, 2, None, timeout_s=120)
    last = results[1]
    assert last["equal"] and last["err"] < 1e-5, last
    assert results[0]["loss"] == results[1]["loss"]


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_eval_of_a_model_with_float_inputs_equals_the_model_in_eval_mode(name):
    """The other mode is captured from a copy with fake weights: float inputs (an MLP's features, the
    cnn's images) must meet them there."""
    zm = zoo.build(name, small=True, batch=4)
    pm = _compile(zm, 2)
    x, = zm.example_args
    with torch.no_grad():
        got = pm.eval()(x)
        want = copy.deepcopy(zm.model).eval()(x)
        assert max_rel_err(got, want) < 1e-5
        assert max_rel_err(pm.train()(x), copy.deepcopy(zm.model).train()(x)) < 1e-5


def _mse(out, target):
    return (out - target).pow(2).mean()


class DeviceBranch(torch.nn.Module):
    """Doubles each layer's output on the CPU (as code choosing a kernel or a dtype by device does)."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(16, 16) for _ in range(4))

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
            if x.device.type == "cpu":
                x = x * 2.0
        return x


def test_eval_takes_the_branches_the_model_takes_on_its_device():
    """The other mode is captured on FakeTensors on the weights' own device, as the first mode."""
    torch.manual_seed(0)
    model, x = DeviceBranch(), torch.randn(4, 16)
    pm = compile_parallel(copy.deepcopy(model), ["cpu"] * 2, (x,), _mse, microbatches=2)
    with torch.no_grad():
        assert max_rel_err(pm.eval()(x), model.eval()(x)) < 1e-5
        assert max_rel_err(pm.train()(x), model.train()(x)) < 1e-5


class GainFirstInEval(torch.nn.Module):
    """The output gain is computed before the layers in eval (where the first stage runs), after them
    in training (on the last stage)."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(16, 16) for _ in range(4))
        self.gain = torch.nn.Parameter(torch.linspace(-0.5, 0.5, 16))

    def forward(self, x):
        gain = None if self.training else self.gain.exp()
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x * (self.gain.exp() if gain is None else gain)


class RescalesInEval(torch.nn.Module):
    """As RWKV: the first eval call halves the last layer's weight in place (a Python flag keeps it to
    once) and doubles that layer's output instead; the first training call undoes it."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(16, 16, bias=False) for _ in range(4))
        self.rescaled = False

    def forward(self, x):
        if self.training == self.rescaled:
            with torch.no_grad():
                self.layers[-1].weight.mul_(2.0 if self.training else 0.5)
            self.rescaled = not self.training
        for i, layer in enumerate(self.layers):
            x = torch.tanh(layer(x) * (2.0 if self.rescaled and i == len(self.layers) - 1 else 1.0))
        return x


class ScalesInputByLastLayerInEval(torch.nn.Module):
    """In eval the input is scaled by the mean of the last layer's weight before the first layer: a
    read of a last-stage weight whose result the first stage needs."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(16, 16) for _ in range(4))

    def forward(self, x):
        if not self.training:
            x = x * self.layers[-1].weight.mean()
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def _train_eval_train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn=_mse,
                      value=lambda out: out, tol: float = 1e-5):
    """Train a step, eval three times, train again: pm as the model (over 2 microbatches) each time.
    Returns the parameters eval mode reads on a rank not holding them in training, with the stage."""
    pm = compile_parallel(copy.deepcopy(model), ["cpu"] * 2, (x,), loss_fn, example_target=y, microbatches=2)
    held = {(fqn, st.rank) for st in pm.stages for fqn in st.params}
    pm_opt, opt = torch.optim.SGD(pm.parameters(), lr=0.1), torch.optim.SGD(model.parameters(), lr=0.1)

    def step() -> None:
        loss = pm.train_step(x, target=y)
        want = sum(loss_fn(model(a), b) for a, b in zip(x.chunk(2), y.chunk(2))) / 2
        want.backward()
        assert max_rel_err(loss, want.detach()) < tol
        grads = dict(model.named_parameters())
        for name, p in pm.named_parameters():
            assert max_rel_err(p.grad, grads[name].grad) < tol, name
        pm_opt.step(), opt.step()
        pm.zero_grad(), opt.zero_grad()

    step()
    with torch.no_grad():
        pm.eval(), model.eval()
        for _ in range(3):  # a write the model makes once is not made again
            assert max_rel_err(value(pm(x)), value(model(x))) < tol
    elsewhere = sorted({(fqn, st.stage) for st in pm.stages for fqn in st.params if (fqn, st.rank) not in held})
    pm.train(), model.train()
    step()
    return elsewhere


@pytest.mark.parametrize("make", [GainFirstInEval, RescalesInEval])
def test_a_parameter_read_at_another_depth_in_eval_is_read_on_its_rank(make):
    torch.manual_seed(0)
    model, x, y = make(), torch.randn(4, 16), torch.randn(4, 16)
    assert _train_eval_train(model, x, y) == []  # each rank reads the tensors it holds in training


def test_a_read_that_cannot_move_reads_the_holders_tensor_in_one_process():
    torch.manual_seed(0)
    elsewhere = _train_eval_train(ScalesInputByLastLayerInEval(), torch.randn(4, 16), torch.randn(4, 16))
    assert elsewhere == [("layers.3.weight", 0)]


def _cannot_move_worker(rank: int, world: int, _arg) -> str | None:
    torch.manual_seed(0)
    model, x = ScalesInputByLastLayerInEval(), torch.randn(4, 16)
    pm = compile_parallel(model, ["cpu"] * world, (x,), _mse, microbatches=2, timeout_s=60)
    try:
        pm.eval()
    except RuntimeConfigError as err:
        return str(err)
    return None


def test_a_read_that_cannot_move_says_so_under_torchrun():
    results = run_workers(_cannot_move_worker, 2, None, timeout_s=120)
    assert results[0] is not None and results[0] == results[1], results  # every rank refuses alike
    for part in ("'layers.3.weight'", "stage 0 (rank 0)", "stage 1 on rank 1", "model.eval() before compile_parallel"):
        assert part in results[0], results[0]


@pytest.mark.parametrize("name", ["mamba", "rwkv"])
def test_hf_models_whose_eval_reads_weights_elsewhere(name):
    """Mamba's eval graph matches its training plan so that a weight read lands on another rank; RWKV
    rescales its blocks' output weights in place at the start of its first eval call (rescale_every=2:
    by 1, 1, 2, 2), and back at the start of the first training call."""
    torch.manual_seed(0)
    if name == "mamba":
        model = transformers.MambaForCausalLM(transformers.MambaConfig(
            hidden_size=32, num_hidden_layers=4, vocab_size=64, state_size=4, expand=2, conv_kernel=2,
            use_mambapy=False, use_cache=False))
    else:
        model = transformers.RwkvForCausalLM(transformers.RwkvConfig(
            hidden_size=32, num_hidden_layers=4, vocab_size=64, attention_hidden_size=32, intermediate_size=64,
            context_length=64, use_cache=False, rescale_every=2))
    x = torch.randint(0, 64, (4, 8))
    assert _train_eval_train(model, x, x, zoo.lm_loss, value=lambda out: out.logits) == []


class PaddedEncoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        layer = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, 4, enable_nested_tensor=True)
        self.head = torch.nn.Linear(32, 3)

    def forward(self, x, padding):
        return self.head(self.encoder(x, src_key_padding_mask=padding))


def test_transformer_encoder_with_padding_in_eval():
    """pm runs the path the model takes with grad on. Under no_grad the model takes nn.TransformerEncoder's
    inference fast path (nested tensors), which export cannot trace (in either mode) and which returns
    other values at padded positions only."""
    torch.manual_seed(0)
    model, x = PaddedEncoder(), torch.randn(4, 8, 32)
    padding = torch.zeros(4, 8, dtype=torch.bool)
    padding[1, 5:] = padding[3, 6:] = True
    pm = compile_parallel(copy.deepcopy(model), ["cpu"] * 2, (x, padding), _mse, microbatches=2)
    with torch.no_grad():
        pm.eval()
    model.eval()
    assert max_rel_err(pm(x, padding), model(x, padding)) < 1e-5
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nested tensors are a prototype
        got, want = pm(x, padding), model(x, padding)
    assert max_rel_err(got[~padding], want[~padding]) < 1e-5
