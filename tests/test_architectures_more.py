"""compile_parallel on more plain-torch patterns: inputs, targets and outputs given as dataclasses
(registered as pytree nodes, so their tensors are cut into microbatches and passed between stages; in
one process and over two gloo ranks), gradient hooks on the model's parameters (carried to the stages'
copies), an RNN's initial state (batch on dim 1), LSTM stages under torch.compile, and a model of bare
ops with no submodule to cut at (blocks of single ops). What a graph cannot keep is refused by name:
module backward hooks, Tensor.register_hook in forward, PackedSequence, an object holding tensors as an
input, a hook on a tied weight split across ranks; a per-sample Python list is said to go whole to every
microbatch. Loss and gradients equal the unpartitioned model's run with gradient accumulation over the
same microbatches (fp32, rel err < 1e-5; compiled < 1e-4).
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from dist_utils import run_workers

from partitioner.api import compile_parallel
from partitioner.dataclass_trees import register_dataclasses
from partitioner.errors import CaptureError, RuntimeConfigError
from partitioner.microbatch import batch_size, split_batch

BATCH, MICROBATCHES, DIM = 4, 2, 16


class MLP(nn.Module):
    """Four tanh layers and a head: enough blocks for 2 ranks x 2 chunks."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(DIM, DIM) for _ in range(4))
        self.head = nn.Linear(DIM, 3)

    def body(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x

    def forward(self, x):
        return self.head(self.body(x))


@dataclass
class Batch:
    x: torch.Tensor
    scale: torch.Tensor
    mask: torch.Tensor | None = None


@dataclass
class Output:
    logits: torch.Tensor
    hidden: torch.Tensor


@dataclass
class Target:
    labels: torch.Tensor


class DataclassModel(MLP):
    """Reads a Batch, returns an Output."""

    def forward(self, batch: Batch) -> Output:
        h = self.body(batch.x * batch.scale)
        return Output(self.head(h), h)


def output_loss(out: Output, target: Target) -> torch.Tensor:
    return F.cross_entropy(out.logits, target.labels) + out.hidden.pow(2).mean()


def loss_fn(out, target):
    return F.cross_entropy(out, target)


def reference(model: nn.Module, args: tuple, target, loss, dims: int = 0) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and gradients of `model` under gradient accumulation over the pipeline's microbatches (the
    inputs and the target cut along `dims`)."""
    total = 0.0
    inputs = split_batch(args, MICROBATCHES, "input", batch_size(args, dims), dims)
    for mb_args, mb_target in zip(inputs, split_batch(target, MICROBATCHES, "target", None, dims)):
        mb_loss = loss(model(*mb_args), mb_target) / MICROBATCHES
        mb_loss.backward()
        total += mb_loss.item()
    return total, {n: p.grad for n, p in model.named_parameters()}


def assert_trains_as(pm, model: nn.Module, args: tuple, target, loss, tol: float = 1e-5) -> None:
    want_loss, want_grads = reference(model, args, target, loss)
    assert pm.train_step(*args, target=target).item() == pytest.approx(want_loss, rel=tol)
    got = dict(pm.named_parameters())
    assert set(got) == set(want_grads)
    for name, p in got.items():
        want = want_grads[name]
        assert (p.grad - want).abs().max() <= tol * want.abs().max().clamp_min(1e-6), name


@pytest.mark.parametrize("chunks", [1, 2])
def test_dataclass_input_output_and_target_train_and_infer_as_the_model(chunks):
    torch.manual_seed(0)
    model = DataclassModel()
    args = (Batch(torch.randn(BATCH, DIM), torch.rand(BATCH, 1)),)
    target = Target(torch.randint(0, 3, (BATCH,)))
    pm = compile_parallel(copy.deepcopy(model), ["cpu"] * 2, args, output_loss, example_target=target,
                          microbatches=MICROBATCHES, chunks=chunks)
    assert_trains_as(pm, model, args, target, output_loss)
    with torch.no_grad():
        out, want = pm.eval()(*args), model.eval()(*args)
    assert isinstance(out, Output)
    torch.testing.assert_close(out.logits, want.logits, rtol=1e-5, atol=1e-6)


def test_an_object_holding_tensors_is_refused_naming_the_input_and_the_fix():
    class Plain:
        def __init__(self, x):
            self.x = x

    class Reads(MLP):
        def forward(self, batch):
            return super().forward(batch.x)

    args, target = (Plain(torch.randn(BATCH, DIM)),), torch.randint(0, 3, (BATCH,))
    with pytest.raises(RuntimeConfigError, match=r"input 'batch' is a .*Plain, an object holding tensors.*"
                                                 r"Make it a dataclass.*register_pytree_node"):
        compile_parallel(Reads(), ["cpu"] * 2, args, loss_fn, example_target=target, microbatches=MICROBATCHES)


def triple_grad(p: torch.Tensor) -> None:
    p.grad.mul_(3)


def hooked_mlp() -> MLP:
    """An MLP whose parameters carry a gradient hook and a post-accumulate-grad hook (which sees the
    gradient accumulated so far: per microbatch, as under gradient accumulation)."""
    torch.manual_seed(0)
    model = MLP()
    model.layers[0].weight.register_hook(lambda g: g.clamp(-0.01, 0.01))
    model.layers[2].bias.register_post_accumulate_grad_hook(triple_grad)
    return model


@pytest.mark.parametrize("chunks,compile", [(1, False), (2, False), (1, True)])
def test_hooks_on_the_models_parameters_run_on_the_stages_copies(chunks, compile):
    args, target = (torch.randn(BATCH, DIM),), torch.randint(0, 3, (BATCH,))
    pm = compile_parallel(hooked_mlp(), ["cpu"] * 2, args, loss_fn, example_target=target,
                          microbatches=MICROBATCHES, chunks=chunks, compile=compile)
    assert_trains_as(pm, hooked_mlp(), args, target, loss_fn, tol=1e-4 if compile else 1e-5)


class Tied(nn.Module):
    """An embedding tied to the output layer: with 2 stages its copies sit on both ranks."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(8, DIM)
        self.layers = nn.ModuleList(nn.Linear(DIM, DIM) for _ in range(4))
        self.out = nn.Linear(DIM, 8, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, ids):
        h = self.embed(ids)
        for layer in self.layers:
            h = torch.tanh(layer(h))
        return self.out(h)


def test_a_hook_on_a_tied_weight_split_across_ranks_is_refused_by_name():
    torch.manual_seed(0)
    model = Tied()
    model.embed.weight.register_hook(lambda g: g.clamp(-1, 1))
    ids = torch.randint(0, 8, (BATCH,))
    with pytest.raises(RuntimeConfigError, match=r"parameter 'embed.weight' has a gradient hook and is read on "
                                                 r"ranks \[0, 1\]"):
        compile_parallel(model, ["cpu"] * 2, (ids,), loss_fn, example_target=ids, microbatches=MICROBATCHES)


class ActivationHook(MLP):
    def forward(self, x):
        h = self.body(x)
        h.register_hook(lambda g: g * 2)
        return self.head(h)


def test_hooks_a_graph_cannot_keep_are_refused_naming_the_module_and_the_fix():
    args, target = (torch.randn(BATCH, DIM),), torch.randint(0, 3, (BATCH,))
    model = MLP()
    model.layers[1].register_full_backward_hook(lambda module, grad_in, grad_out: (grad_in[0] * 3,))
    with pytest.raises(CaptureError, match=r"module 'layers.1' \(Linear\) has a backward hook.*"
                                           r"torch.autograd.Function"):
        compile_parallel(model, ["cpu"] * 2, args, loss_fn, example_target=target, microbatches=MICROBATCHES)
    with pytest.raises(CaptureError, match=r"registers a gradient hook on a tensor in forward \(Tensor.register_hook\)"
                                           r".*torch.autograd.Function"):
        compile_parallel(ActivationHook(), ["cpu"] * 2, args, loss_fn, example_target=target,
                         microbatches=MICROBATCHES)


class ScaleGrad(torch.autograd.Function):
    """What the refused hooks do, the way the errors suggest: identity forward, doubled gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * 2


class FunctionHook(MLP):
    def forward(self, x):
        return self.head(ScaleGrad.apply(self.body(x)))


def test_the_suggested_autograd_function_trains_as_the_model():
    torch.manual_seed(0)
    model, args, target = FunctionHook(), (torch.randn(BATCH, DIM),), torch.randint(0, 3, (BATCH,))
    pm = compile_parallel(copy.deepcopy(model), ["cpu"] * 2, args, loss_fn, example_target=target,
                          microbatches=MICROBATCHES)
    assert_trains_as(pm, model, args, target, loss_fn)


class InitialState(nn.Module):
    """A batch-first LSTM started from given states h0, c0: (num_layers, batch, hidden) whatever
    batch_first says, so their batch lies on dim 1."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(DIM, DIM)
        self.lstm = nn.LSTM(DIM, DIM, num_layers=2, batch_first=True)
        self.out = nn.Linear(DIM, 3)

    def forward(self, x, h0, c0):
        return self.out(self.lstm(torch.tanh(self.inp(x)), (h0, c0))[0][:, -1])


def test_an_rnn_state_left_whole_is_refused_naming_its_inputs_and_trains_with_their_batch_dims():
    torch.manual_seed(0)
    model = InitialState()
    x, h0, c0 = torch.randn(BATCH, 6, DIM), torch.randn(2, BATCH, DIM), torch.randn(2, BATCH, DIM)
    target = torch.randint(0, 3, (BATCH,))
    with pytest.raises(RuntimeConfigError, match=r"'lstm' \(LSTM\) gets an initial state hx of \(2, 4, 16\) per "
                                                 r"microbatch of 2 samples.*batch_dims: \{'h0': 1, 'c0': 1\}"):
        compile_parallel(copy.deepcopy(model), ["cpu"] * 2, (x, h0, c0), loss_fn, example_target=target,
                         microbatches=MICROBATCHES)
    pm = compile_parallel(copy.deepcopy(model), ["cpu"] * 2, (x, h0, c0), loss_fn, example_target=target,
                          microbatches=MICROBATCHES, batch_dims={"h0": 1, "c0": 1})
    want_loss, want_grads = 0.0, None
    for xs, hs, cs, ts in zip(x.chunk(2), h0.chunk(2, 1), c0.chunk(2, 1), target.chunk(2)):
        mb_loss = loss_fn(model(xs, hs, cs), ts) / MICROBATCHES
        mb_loss.backward()
        want_loss += mb_loss.item()
    assert pm.train_step(x, h0, c0, target=target).item() == pytest.approx(want_loss, rel=1e-5)
    for name, p in pm.named_parameters():
        want = dict(model.named_parameters())[name].grad
        assert (p.grad - want).abs().max() <= 1e-5 * want.abs().max(), name


class Packed(nn.Module):
    """An LSTM over padded sequences; `packed`: through pack_padded_sequence, else on the padded batch
    reading each sequence's output at its last valid step (what the refusal suggests)."""

    def __init__(self, packed: bool):
        super().__init__()
        self.packed = packed
        self.inp = nn.Linear(DIM, DIM)
        self.lstm = nn.LSTM(DIM, DIM, batch_first=True)
        self.out = nn.Linear(DIM, 3)

    def forward(self, x, lengths):
        h = torch.tanh(self.inp(x))
        if self.packed:
            packed = nn.utils.rnn.pack_padded_sequence(h, lengths, batch_first=True, enforce_sorted=False)
            return self.out(self.lstm(packed)[1][0][-1])
        out = self.lstm(h)[0]
        return self.out(out.gather(1, (lengths - 1).view(-1, 1, 1).expand(-1, 1, out.shape[-1])).squeeze(1))


def test_a_packed_sequence_is_refused_naming_the_rnn_and_the_padded_form_trains_as_the_packed_model():
    torch.manual_seed(0)
    x, lengths, target = torch.randn(BATCH, 6, DIM), torch.tensor([6, 3, 5, 2]), torch.randint(0, 3, (BATCH,))
    with pytest.raises(CaptureError, match=r"module 'lstm' \(LSTM\) reads a PackedSequence.*on the padded batch"):
        compile_parallel(Packed(packed=True), ["cpu"] * 2, (x, lengths), loss_fn, example_target=target,
                         microbatches=MICROBATCHES)
    model = Packed(packed=True)
    padded = Packed(packed=False)
    padded.load_state_dict(model.state_dict())
    pm = compile_parallel(padded, ["cpu"] * 2, (x, lengths), loss_fn, example_target=target,
                          microbatches=MICROBATCHES)
    assert_trains_as(pm, model, (x, lengths), target, loss_fn)


class PerSampleList(MLP):
    """Reads sample i's first lengths[i] positions, from a Python list."""

    def forward(self, x, lengths: list[int]):
        return super().forward(torch.stack([x[i, :lengths[i]].mean(0) for i in range(x.shape[0])]))


def test_a_per_sample_python_list_is_said_to_go_whole_to_every_microbatch():
    x, target = torch.randn(BATCH, 6, DIM), torch.randint(0, 3, (BATCH,))
    with pytest.warns(RuntimeWarning, match=r"input 'lengths' \(4 values\) is a list of Python values.*go whole to "
                                            r"every microbatch.*pass a tensor"):
        compile_parallel(PerSampleList(), ["cpu"] * 2, (x, [6, 3, 5, 2]), loss_fn, example_target=target,
                         microbatches=MICROBATCHES)


class Recurrent(nn.Module):
    """LSTMs reading the model's input directly (no gradient flows into it), residual, then a head."""

    def __init__(self):
        super().__init__()
        self.rnns = nn.ModuleList(nn.LSTM(DIM, DIM, batch_first=True) for _ in range(2))
        self.head = nn.Linear(DIM, 3)

    def forward(self, x):
        for rnn in self.rnns:
            x = x + rnn(x)[0]
        return self.head(x[:, -1])


def test_compiled_lstm_stages_train_as_the_model():
    """Inductor lowers a CPU LSTM whose input needs no gradient to mkldnn_rnn_layer(train=False), whose
    generated code fails on its first call (torch 2.13): that stage runs eagerly, the step is the model's."""
    torch.manual_seed(0)
    model, args, target = Recurrent(), (torch.randn(BATCH, 6, DIM),), torch.randint(0, 3, (BATCH,))
    pm = compile_parallel(copy.deepcopy(model), ["cpu"] * 2, args, loss_fn, example_target=target,
                          microbatches=MICROBATCHES, compile=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.compile failed on stage", RuntimeWarning)
        assert_trains_as(pm, model, args, target, loss_fn, tol=1e-4)


class BareOps(nn.Module):
    """Every op in the root module's forward, the weights in a ParameterList and a ParameterDict: no
    module boundary to cut at, so the blocks are single ops."""

    def __init__(self):
        super().__init__()
        self.weights = nn.ParameterList(nn.Parameter(torch.randn(DIM, DIM) * 0.3) for _ in range(4))
        self.biases = nn.ParameterDict({f"b{i}": nn.Parameter(torch.zeros(DIM)) for i in range(4)})
        self.out = nn.Parameter(torch.randn(DIM, 3) * 0.3)

    def forward(self, x):
        for i, w in enumerate(self.weights):
            x = torch.tanh(x @ w + self.biases[f"b{i}"])
        return x @ self.out


@pytest.mark.parametrize("chunks", [1, 2])
def test_a_model_without_submodules_is_cut_between_ops(chunks):
    torch.manual_seed(0)
    model, args, target = BareOps(), (torch.randn(BATCH, DIM),), torch.randint(0, 3, (BATCH,))
    pm = compile_parallel(copy.deepcopy(model), ["cpu"] * 2, args, loss_fn, example_target=target,
                          microbatches=MICROBATCHES, chunks=chunks)
    assert pm.plan.num_stages == 2 * chunks
    assert_trains_as(pm, model, args, target, loss_fn)


def _gloo_worker(rank: int, world_size: int, arg) -> dict:
    """One rank of 2: a dataclass batch through a model whose parameter carries a hook."""
    torch.manual_seed(0)
    model = DataclassModel()
    model.layers[0].weight.register_hook(lambda g: g.clamp(-0.01, 0.01))
    args = (Batch(torch.randn(BATCH, DIM), torch.rand(BATCH, 1)),)
    target = Target(torch.randint(0, 3, (BATCH,)))
    pm = compile_parallel(model, ["cpu"] * world_size, args, output_loss, example_target=target,
                          microbatches=MICROBATCHES)
    loss = pm.train_step(*args, target=target).item()
    return {"loss": loss, "grads": {n: p.grad.clone() for n, p in pm.named_parameters()}}


def test_a_dataclass_batch_and_a_hooked_parameter_over_two_gloo_ranks():
    results = run_workers(_gloo_worker, 2, None, timeout_s=120)
    torch.manual_seed(0)
    model = DataclassModel()
    model.layers[0].weight.register_hook(lambda g: g.clamp(-0.01, 0.01))
    args = (Batch(torch.randn(BATCH, DIM), torch.rand(BATCH, 1)),)
    target = Target(torch.randint(0, 3, (BATCH,)))
    register_dataclasses((args, target))  # as compile_parallel does on the ranks: the reference cuts them alike
    want_loss, want_grads = reference(model, args, target, output_loss)
    got = {**results[0]["grads"], **results[1]["grads"]}
    assert set(got) == set(want_grads)
    for r in results:
        assert r["loss"] == pytest.approx(want_loss, rel=1e-5)
    for name, g in got.items():
        assert (g - want_grads[name]).abs().max() <= 1e-5 * want_grads[name].abs().max(), name


def forward_hooked() -> MLP:
    """Forward hooks and a pre-hook that change what modules return and read."""
    torch.manual_seed(0)
    model = MLP()
    model.layers[1].register_forward_hook(lambda module, args, out: out * 2)
    model.layers[2].register_forward_pre_hook(lambda module, args: (args[0] + 1,))
    model.layers[3].register_forward_hook(lambda module, args, kwargs, out: out - 0.5, with_kwargs=True)
    return model


@pytest.mark.parametrize("chunks", [1, 2])
def test_forward_hooks_train_as_the_model_and_their_side_effects_are_said_to_run_once(chunks):
    """After the same model without hooks: the profile cache tells the two graphs apart."""
    args, target = (torch.randn(BATCH, DIM),), torch.randint(0, 3, (BATCH,))
    compile_parallel(MLP(), ["cpu"] * 2, args, loss_fn, example_target=target, microbatches=MICROBATCHES, chunks=chunks)
    with pytest.warns(RuntimeWarning, match=r"forward hooks or pre-hooks on module 'layers.1' \(Linear\), 'layers.2' "
                                            r"\(Linear\), 'layers.3' \(Linear\) ran once.*side effects"):
        pm = compile_parallel(forward_hooked(), ["cpu"] * 2, args, loss_fn, example_target=target,
                              microbatches=MICROBATCHES, chunks=chunks)
    assert_trains_as(pm, forward_hooked(), args, target, loss_fn)


def test_pruning_hooks_are_not_said():
    torch.manual_seed(0)
    model = MLP()
    nn.utils.prune.l1_unstructured(model.layers[1], "weight", amount=0.5)
    args, target = (torch.randn(BATCH, DIM),), torch.randint(0, 3, (BATCH,))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "forward hooks", RuntimeWarning)
        compile_parallel(model, ["cpu"] * 2, args, loss_fn, example_target=target, microbatches=MICROBATCHES)


class VAE(nn.Module):
    """A variational autoencoder: torch.distributions' Normal validates its scale (a branch on tensor values)
    unless told not to, and rsample draws noise, the model's one random op."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(DIM, 32), nn.ReLU(), nn.Linear(32, 16))
        self.dec = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, DIM))

    def forward(self, x):
        mu, logvar = self.enc(x).chunk(2, -1)
        z = torch.distributions.Normal(mu, (0.5 * logvar).exp()).rsample() if self.training else mu
        return self.dec(z), mu, logvar


def vae_loss(out, target):
    recon, mu, logvar = out
    return F.mse_loss(recon, target) - 0.5 * (1 + logvar - mu ** 2 - logvar.exp()).sum(-1).mean()


def test_a_vae_with_torch_distributions_trains_as_the_model():
    """Its noise is drawn by one stage, microbatch after microbatch: from the same seed, the same draws."""
    torch.manual_seed(0)
    model, x = VAE(), torch.randn(BATCH, DIM)
    pm = compile_parallel(copy.deepcopy(model), ["cpu"] * 2, (x,), vae_loss, example_target=x,
                          microbatches=MICROBATCHES)
    torch.manual_seed(1)
    want_loss, want_grads = reference(model, (x,), x, vae_loss)
    torch.manual_seed(1)
    assert pm.train_step(x, target=x).item() == pytest.approx(want_loss, rel=1e-5)
    for name, p in pm.named_parameters():
        assert (p.grad - want_grads[name]).abs().max() <= 1e-5 * want_grads[name].abs().max(), name


class FixedBatch(MLP):
    """Adds a state made with the batch size written into the model: it cannot run on a microbatch."""

    def forward(self, x):
        return super().forward(x + torch.zeros(BATCH, DIM))


def test_a_size_fixed_to_the_batch_is_named_as_the_microbatch_capture_fails():
    args, target = (torch.randn(BATCH, DIM),), torch.randint(0, 3, (BATCH,))
    with pytest.raises(CaptureError, match=r"captures the model on ONE microbatch, 2 of the 4 samples.*runs on the "
                                           r"whole batch but not on it.*x.shape\[0\]"):
        compile_parallel(FixedBatch(), ["cpu"] * 2, args, loss_fn, example_target=target, microbatches=MICROBATCHES)


# ---------------------------------------------------------------------------------------- plain-torch zoo
# Architectures that train as the model without anything of their own: kept so that they stay so.

SEQ = 6


class RNNStack(nn.Module):
    """Residual recurrent layers (nn.LSTM / nn.GRU), batch-first or sequence-first."""

    def __init__(self, cell: type, batch_first: bool):
        super().__init__()
        self.batch_first = batch_first
        self.inp = nn.Linear(DIM, DIM)
        self.rnns = nn.ModuleList(cell(DIM, DIM, batch_first=batch_first, bidirectional=True) for _ in range(2))
        self.proj = nn.ModuleList(nn.Linear(2 * DIM, DIM) for _ in range(2))
        self.head = nn.Linear(DIM, 3)

    def forward(self, x):
        x = torch.tanh(self.inp(x))
        for rnn, proj in zip(self.rnns, self.proj):
            x = x + proj(rnn(x)[0])
        return self.head(x[:, -1] if self.batch_first else x[-1])


class EncoderDecoder(nn.Module):
    """nn.TransformerEncoder / Decoder layers with a padding mask and a causal target mask."""

    def __init__(self, norm_first: bool):
        super().__init__()
        self.embed = nn.Embedding(32, DIM)
        layer = dict(d_model=DIM, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True, norm_first=norm_first)
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(**layer), 2, enable_nested_tensor=False)
        self.dec = nn.TransformerDecoder(nn.TransformerDecoderLayer(**layer), 2)
        self.head = nn.Linear(DIM, 32)

    def forward(self, src, tgt, pad):
        memory = self.enc(self.embed(src), src_key_padding_mask=pad)
        causal = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1])
        return self.head(self.dec(self.embed(tgt), memory, tgt_mask=causal, tgt_is_causal=True,
                                  memory_key_padding_mask=pad))


class ViT(nn.Module):
    """Patches by a strided Conv2d, a class token and learned positions as parameters, pre-norm layers."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, DIM, 4, 4)
        self.cls = nn.Parameter(torch.randn(1, 1, DIM))
        self.pos = nn.Parameter(torch.randn(1, 5, DIM) * 0.02)
        self.blocks = nn.ModuleList(nn.TransformerEncoderLayer(DIM, 2, 32, 0.0, batch_first=True, norm_first=True)
                                    for _ in range(3))
        self.norm, self.head = nn.LayerNorm(DIM), nn.Linear(DIM, 3)

    def forward(self, image):
        x = self.patch(image).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, 0]))


class UNet(nn.Module):
    """Two levels down, ConvTranspose2d up, long skip connections; GroupNorm, InstanceNorm with running
    statistics, or LayerNorm over whole feature maps."""

    def __init__(self, norm: str):
        super().__init__()
        size = {8: 8, 16: 4}

        def block(cin, cout, side):
            n = {"group": nn.GroupNorm(2, cout), "instance": nn.InstanceNorm2d(cout, affine=True,
                                                                                track_running_stats=True),
                 "layer": nn.LayerNorm([cout, side, side])}[norm]
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), n, nn.ReLU())

        self.down1, self.down2, self.mid = block(3, 8, 8), block(8, 16, 4), block(16, 16, 2)
        self.up2, self.dec2 = nn.ConvTranspose2d(16, 16, 2, 2), block(32, 8, size[16])
        self.up1, self.dec1 = nn.ConvTranspose2d(8, 8, 2, 2), block(16, 8, size[8])
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        a = self.down1(x)
        b = self.down2(F.max_pool2d(a, 2))
        m = self.mid(F.max_pool2d(b, 2))
        u = self.dec2(torch.cat([self.up2(m), b], 1))
        return self.out(self.dec1(torch.cat([self.up1(u), a], 1)))


class MoE(nn.Module):
    """Two mixture-of-experts layers: top-2 routing, each expert on the rows routed to it (data-dependent
    shapes), summed back with index_add or scatter_add, a load-balancing loss as a second output."""

    def __init__(self, scatter: bool):
        super().__init__()
        self.scatter = scatter
        self.inp = nn.Linear(DIM, DIM)
        self.gates = nn.ModuleList(nn.Linear(DIM, 4) for _ in range(2))
        self.experts = nn.ModuleList(nn.ModuleList(nn.Sequential(nn.Linear(DIM, 32), nn.GELU(), nn.Linear(32, DIM))
                                                   for _ in range(4)) for _ in range(2))
        self.head = nn.Linear(DIM, 3)

    def forward(self, x):
        x, aux = self.inp(x), 0.0
        for gate, experts in zip(self.gates, self.experts):
            flat = x.reshape(-1, DIM)
            probs = gate(flat).softmax(-1)
            weight, index = probs.topk(2, -1)
            out = torch.zeros_like(flat)
            for e, expert in enumerate(experts):
                rows, slot = torch.where(index == e)
                y = expert(flat[rows]) * weight[rows, slot, None]
                out = (out.scatter_add(0, rows[:, None].expand(-1, DIM), y) if self.scatter
                       else out.index_add(0, rows, y))
            x = x + out.reshape(x.shape)
            aux = aux + (probs.mean(0) ** 2).sum() * 4
        return self.head(x.mean(1)), aux


class Reused(nn.Module):
    """One Linear called at two depths (weights shared by reuse), an EmbeddingBag over the inputs."""

    def __init__(self, mode: str):
        super().__init__()
        self.bag = nn.EmbeddingBag(32, DIM, mode=mode)
        self.a, self.shared, self.b = nn.Linear(DIM, DIM), nn.Linear(DIM, DIM), nn.Linear(DIM, DIM)
        self.head = nn.Linear(DIM, 3)

    def forward(self, ids, weights=None):
        x = torch.tanh(self.shared(torch.tanh(self.a(self.bag(ids, per_sample_weights=weights)))))
        return self.head(torch.tanh(self.shared(torch.tanh(self.b(x)))))


def token_loss(out, target):
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1))


def aux_loss(out, target):
    return F.cross_entropy(out[0], target) + 0.01 * out[1]


def build(name: str):
    """(model, args, target, loss, batch_dims) of a small `name`, seeded."""
    torch.manual_seed(0)
    labels = torch.randint(0, 3, (BATCH,))
    seq, ids = torch.randn(BATCH, SEQ, DIM), torch.randint(0, 32, (BATCH, SEQ))
    pad = torch.arange(SEQ).expand(BATCH, SEQ) >= SEQ - torch.arange(BATCH)[:, None]
    if name in ("lstm", "gru"):
        return RNNStack(nn.LSTM if name == "lstm" else nn.GRU, True), (seq,), labels, loss_fn, None
    if name == "gru-seq-first":
        return RNNStack(nn.GRU, False), (seq.transpose(0, 1).contiguous(),), labels, loss_fn, {"x": 1}
    if name.startswith("encoder-decoder"):
        return EncoderDecoder(name.endswith("pre-norm")), (ids, ids.flip(1), pad), ids, token_loss, None
    if name == "vit":
        return ViT(), (torch.randn(BATCH, 3, 8, 8),), labels, loss_fn, None
    if name.startswith("unet"):
        return UNet(name.split("-")[1]), (torch.randn(BATCH, 3, 8, 8),), torch.randint(0, 2, (BATCH, 8, 8)), \
            loss_fn, None
    if name.startswith("moe"):
        return MoE(name.endswith("scatter")), (seq,), labels, aux_loss, None
    if name == "reused-bag":
        return Reused("max"), (ids,), labels, loss_fn, None
    if name == "reused-bag-weighted":
        return Reused("sum"), (ids, torch.rand(BATCH, SEQ)), labels, loss_fn, None
    if name == "float64":
        return UNet("group").double(), (torch.randn(BATCH, 3, 8, 8, dtype=torch.float64),), \
            torch.randint(0, 2, (BATCH, 8, 8)), loss_fn, None
    raise ValueError(name)


@pytest.mark.parametrize("name,chunks", [
    ("lstm", 1), ("gru", 2), ("gru-seq-first", 1), ("encoder-decoder-post-norm", 1),
    ("encoder-decoder-pre-norm", 2), ("vit", 2), ("unet-group", 1), ("unet-instance", 2), ("unet-layer", 1),
    ("moe-index-add", 2), ("moe-scatter", 1), ("reused-bag", 2), ("reused-bag-weighted", 1), ("float64", 1)])
def test_plain_torch_architectures_train_and_infer_as_the_model(name, chunks):
    model, args, target, loss, batch_dims = build(name)
    pm = compile_parallel(copy.deepcopy(model), ["cpu"] * 2, args, loss, example_target=target,
                          microbatches=MICROBATCHES, chunks=chunks, batch_dims=batch_dims)
    dims = 1 if batch_dims else 0
    want_loss = 0.0
    inputs = split_batch(args, MICROBATCHES, "input", batch_size(args, dims), dims)
    for mb_args, mb_target in zip(inputs, split_batch(target, MICROBATCHES, "target")):
        mb_loss = loss(model(*mb_args), mb_target) / MICROBATCHES
        mb_loss.backward()
        want_loss += mb_loss.item()
    assert pm.train_step(*args, target=target).item() == pytest.approx(want_loss, rel=1e-5)
    want = dict(model.named_parameters())
    largest = max(p.grad.abs().max() for p in want.values())
    for n, p in pm.named_parameters():
        assert (p.grad - want[n].grad).abs().max() <= 1e-5 * max(want[n].grad.abs().max(), 1e-3 * largest), n
    state = pm.full_state_dict()
    for n, b in model.state_dict().items():  # InstanceNorm's running statistics
        torch.testing.assert_close(state[n], b, rtol=1e-5, atol=1e-7, msg=n)
    with torch.no_grad(), warnings.catch_warnings():  # eval: nn.Transformer*'s inference fast path in the model
        warnings.filterwarnings("error", "ParallelModel.forward cannot tell", RuntimeWarning)  # MoE's nonzero
        got, want_out = pm.eval()(*args), model.eval()(*args)
    got, want_out = (got[0], want_out[0]) if isinstance(got, tuple) else (got, want_out)
    torch.testing.assert_close(got, want_out, rtol=1e-5, atol=1e-6)


class RandomMask(torch.autograd.Function):
    """Dropout as a Function: its backward reads the mask its forward drew."""

    @staticmethod
    def forward(ctx, x):
        mask = (torch.rand_like(x) > 0.5).to(x.dtype) * 2
        ctx.save_for_backward(mask)
        return x * mask

    @staticmethod
    def backward(ctx, g):
        return g * ctx.saved_tensors[0]


class RandomFunction(MLP):
    def forward(self, x):
        return self.head(RandomMask.apply(self.body(x)))


def test_a_function_drawing_random_numbers_is_said_to_draw_anew_in_its_backward():
    args, target = (torch.randn(BATCH, DIM),), torch.randint(0, 3, (BATCH,))
    pm = compile_parallel(RandomFunction(), ["cpu"] * 2, args, loss_fn, example_target=target,
                          microbatches=MICROBATCHES)
    with pytest.warns(RuntimeWarning, match=r"Function .*RandomMask draws random numbers in its forward.*recomputes"
                                            r".*pass them in as a tensor argument"):
        pm.train_step(*args, target=target)


class Dropped(MLP):
    """nn.Dropout(0.5) between the body and the head: one random op, in one stage."""

    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.head(self.drop(self.body(x)))


def test_dropout_draws_fresh_masks_per_step_keeps_its_mask_in_backward_and_is_off_in_eval():
    """From the same seed the one dropout draws what the model draws (its stage runs the microbatches in
    order), so loss and gradients are the model's: the backward uses the forward's mask."""
    torch.manual_seed(0)
    model, args, target = Dropped(), (torch.randn(BATCH, DIM),), torch.randint(0, 3, (BATCH,))
    pm = compile_parallel(copy.deepcopy(model), ["cpu"] * 2, args, loss_fn, example_target=target,
                          microbatches=MICROBATCHES)
    torch.manual_seed(1)
    want_loss, want_grads = reference(model, args, target, loss_fn)
    torch.manual_seed(1)
    assert pm.train_step(*args, target=target).item() == pytest.approx(want_loss, rel=1e-5)
    for name, p in pm.named_parameters():
        assert (p.grad - want_grads[name]).abs().max() <= 1e-5 * want_grads[name].abs().max(), name
    assert pm.train_step(*args, target=target).item() != pytest.approx(want_loss, rel=1e-5)  # new masks
    with torch.no_grad():
        torch.testing.assert_close(pm.eval()(*args), model.eval()(*args), rtol=1e-5, atol=1e-6)
