"""compile_parallel on plain torch models and call patterns beyond the transformer zoo.

BatchNorm (a ResNet-style network, a Sequential CNN) normalises each microbatch with that
microbatch's statistics and updates its running statistics once per microbatch, in microbatch
order: the pipeline equals the unpartitioned model run with gradient accumulation over the same
microbatches (not one forward of the whole batch: num_batches_tracked advances by `microbatches`
per step). Also: spectral_norm (a no_grad power iteration writing its buffers with out=),
torch.utils.checkpoint with use_reentrant=True, rows selected by a mask (a data-dependent shape
inside a stage), weight_norm and parametrize parametrizations with an Embedding(max_norm) that
renormalises its rows in forward, parameters the graph never reads, and the errors for what cannot
be captured.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from partitioner.api import compile_parallel
from partitioner.errors import CaptureError, RuntimeConfigError
from partitioner.microbatch import batch_size, split_batch

BATCH, MICROBATCHES = 4, 2


class BasicBlock(nn.Module):
    """ResNet's basic block: two 3x3 conv + BatchNorm, a strided 1x1 conv + BatchNorm shortcut."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)) \
            if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + self.down(x))


def resnet() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         BasicBlock(8, 8, 1), BasicBlock(8, 16, 2), BasicBlock(16, 16, 1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3))


def cnn(spectral: bool = False, **bn) -> nn.Module:
    conv = nn.Conv2d(8, 8, 3, padding=1)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8, **bn), nn.ReLU(),
                         nn.utils.parametrizations.spectral_norm(conv) if spectral else conv,
                         nn.BatchNorm2d(8, **bn), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))


class Checkpointed(nn.Module):
    """Layers run through torch.utils.checkpoint; the reentrant form is an autograd.Function."""

    def __init__(self, use_reentrant: bool):
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.layers = nn.ModuleList(nn.Linear(16, 16) for _ in range(4))
        self.head = nn.Linear(16, 3)
        self.use_reentrant = use_reentrant

    def forward(self, x):
        h = self.inp(x)
        for layer in self.layers:
            h = torch.utils.checkpoint.checkpoint(lambda t, layer=layer: torch.tanh(layer(t)), h,
                                                  use_reentrant=self.use_reentrant)
        return self.head(h)


class MaskedRows(nn.Module):
    """An adapter applied to the rows a mask selects (X-MOD's language adapters): h[mask] has a
    shape known only at run time, inside one layer."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))
        self.adapters = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))
        self.head = nn.Linear(8, 3)

    def forward(self, x, lang):
        h = x
        for layer, adapter in zip(self.layers, self.adapters):
            h = torch.tanh(layer(h))
            out = torch.zeros_like(h)
            out[lang == 1] = adapter(h[lang == 1])
            h = h + out
        return self.head(h)


class WithUnused(nn.Module):
    """A model whose `embed` is not used when called with embeddings (HF's inputs_embeds)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.layers = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))

    def forward(self, x=None, x_embeds=None):
        return self.layers(self.embed(x) if x_embeds is None else x_embeds)


class Symmetric(nn.Module):
    """A parametrization: the weight as the symmetric matrix of its upper triangle."""

    def forward(self, w):
        return w.triu() + w.triu(1).T


class Parametrized(nn.Module):
    """Tokens through an Embedding with max_norm (renormalises the rows it reads, in place, in forward),
    then Linears under weight_norm and a custom torch.nn.utils.parametrize parametrization."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 8, padding_idx=0, max_norm=1.0)
        self.a = nn.utils.parametrizations.weight_norm(nn.Linear(8, 8))
        self.b = nn.Linear(8, 8)
        nn.utils.parametrize.register_parametrization(self.b, "weight", Symmetric())
        self.c = nn.utils.parametrizations.weight_norm(nn.Linear(8, 8), dim=None)
        self.head = nn.Linear(8, 3)

    def forward(self, ids):
        h = self.embed(ids).mean(1)
        return self.head(torch.tanh(self.c(torch.tanh(self.b(torch.tanh(self.a(h)))))))


def build(name: str):
    """(model, args, target) of a small randomly initialised `name` in training mode."""
    torch.manual_seed(0)
    image, label = torch.randn(BATCH, 3, 8, 8), torch.randint(0, 3, (BATCH,))
    if name == "resnet":
        return resnet(), (image,), label
    if name == "cnn":
        return cnn(), (image,), label
    if name == "spectral-norm":
        return cnn(spectral=True), (image,), label
    if name in ("checkpoint-reentrant", "checkpoint"):
        return Checkpointed(name == "checkpoint-reentrant"), (torch.randn(BATCH, 8),), label
    if name == "parametrized":
        return Parametrized(), (torch.randint(0, 16, (BATCH, 5)) * (torch.rand(BATCH, 5) > 0.3),), label
    if name == "masked-rows":
        return MaskedRows(), (torch.randn(BATCH, 8), torch.tensor([1, 0, 1, 1])), label
    raise ValueError(name)


def loss_fn(out, target):
    return nn.functional.cross_entropy(out, target)


def train_reference(model: nn.Module, args: tuple, target: torch.Tensor, steps: int) -> list[float]:
    """`steps` SGD steps of the model with gradient accumulation over the microbatches the pipeline
    uses; the loss of each step (the mean over microbatches). Leaves the last step's gradients."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for step in range(steps):
        if step:
            opt.step()
            opt.zero_grad()
        inputs = split_batch(args, MICROBATCHES, "input", batch_size(args))
        loss = 0.0
        for mb_args, mb_target in zip(inputs, split_batch(target, MICROBATCHES, "target")):
            mb_loss = loss_fn(model(*mb_args), mb_target) / MICROBATCHES
            mb_loss.backward()
            loss += mb_loss.item()
        losses.append(loss)
    return losses


def train_parallel(pm, args: tuple, target: torch.Tensor, steps: int) -> list[float]:
    opt = torch.optim.SGD(list(pm.parameters()), lr=0.1)
    losses = []
    for step in range(steps):
        if step:
            opt.step()
            pm.zero_grad()
        losses.append(pm.train_step(*args, target=target).item())
    return losses


def assert_matches(pm, model: nn.Module, tol: float) -> None:
    """Every gradient and every buffer (BatchNorm's running stats and counters, spectral_norm's
    vectors) equal the model's."""
    want = dict(model.named_parameters())
    got = dict(pm.named_parameters())
    assert set(got) == set(want)
    largest = max(p.grad.abs().max().item() for p in want.values() if p.grad is not None)
    for n, p in got.items():
        if want[n].grad is None:  # frozen, or unused
            assert p.grad is None, n
            continue
        # a gradient that is zero up to rounding (a conv bias before BatchNorm) is compared against
        # the model's largest gradient instead of its own size
        scale = max(want[n].grad.abs().max().item(), 1e-3 * largest)
        assert (p.grad - want[n].grad).abs().max().item() <= tol * scale, n
    state = pm.full_state_dict()
    for n, b in model.state_dict().items():
        if b.is_floating_point():
            torch.testing.assert_close(state[n], b, rtol=tol, atol=1e-7, msg=n)
        else:
            assert torch.equal(state[n], b), n


@pytest.mark.parametrize("name,chunks,compile", [
    ("resnet", 1, False), ("resnet", 2, False), ("cnn", 1, True), ("spectral-norm", 1, False),
    ("spectral-norm", 2, False), ("checkpoint-reentrant", 1, False), ("checkpoint", 2, False),
    ("masked-rows", 1, False), ("masked-rows", 2, False), ("parametrized", 1, False)])
def test_training_and_buffers_equal_gradient_accumulation(name, chunks, compile):
    model, args, target = build(name)
    pm = compile_parallel(copy.deepcopy(model), ["cpu"] * 2, args, loss_fn, example_target=target,
                          microbatches=MICROBATCHES, chunks=chunks, compile=compile)
    tol = 1e-4 if compile else 1e-5
    want = train_reference(model, args, target, steps=2)
    got = train_parallel(pm, args, target, steps=2)
    assert got == pytest.approx(want, rel=tol)
    assert_matches(pm, model, tol)
    if name == "resnet":  # eval reads the running statistics the training steps left
        with torch.no_grad():
            torch.testing.assert_close(pm.eval()(*args), model.eval()(*args), rtol=1e-5, atol=1e-6)


def test_unused_parameters_are_parameters_without_gradient():
    torch.manual_seed(0)
    model, x, target = WithUnused(), torch.randn(BATCH, 8), torch.randint(0, 3, (BATCH,))
    pm = compile_parallel(copy.deepcopy(model), ["cpu"] * 2, (), loss_fn, example_kwargs={"x_embeds": x},
                          example_target=target, microbatches=MICROBATCHES)
    pm.train_step(x_embeds=x, target=target)
    got = dict(pm.named_parameters())
    assert set(got) == set(dict(model.named_parameters()))
    assert got["embed.weight"].grad is None and got["layers.0.weight"].grad is not None
    assert set(pm.full_state_dict()) == set(model.state_dict())


def test_batchnorm_with_cumulative_average_names_the_module_and_the_fix():
    model, args, target = cnn(momentum=None), (torch.randn(BATCH, 3, 8, 8),), torch.randint(0, 3, (BATCH,))
    with pytest.raises(CaptureError, match=r"module '1' \(BatchNorm2d\).*momentum is None.*set the module's momentum"):
        compile_parallel(model, ["cpu"] * 2, args, loss_fn, example_target=target, microbatches=MICROBATCHES)


class LayerDrop(nn.Module):
    """Skips each layer with probability `layerdrop` in training (m2m_100's, nllb_moe's default)."""

    def __init__(self, layerdrop: float):
        super().__init__()
        self.layerdrop = layerdrop
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        for layer in self.layers:
            if self.training and torch.rand([]) < self.layerdrop:
                continue
            x = torch.tanh(layer(x))
        return self.head(x)


def test_layerdrop_in_training_names_the_probability_and_the_fix():
    """A layer skipped at random would be skipped for good by a traced graph: refused; at 0 it is said."""
    args, target = (torch.randn(BATCH, 8),), torch.randint(0, 3, (BATCH,))
    with pytest.raises(CaptureError, match=r"data-dependent control flow.*layerdrop = 0\.1 skip\(s\) layers at random"
                                           r".*set it to 0"):
        compile_parallel(LayerDrop(0.1), ["cpu"] * 2, args, loss_fn, example_target=target, microbatches=MICROBATCHES)
    with pytest.warns(RuntimeWarning, match="drew random numbers.*replays that one draw every step"):
        compile_parallel(LayerDrop(0.0), ["cpu"] * 2, args, loss_fn, example_target=target, microbatches=MICROBATCHES)


class AddTable(nn.Module):
    """Adds a table shared by every sample, its first input, to the batch."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, table, x):
        return self.layers(x + table)


def test_a_shared_first_input_is_named_in_the_batch_error():
    table, x = torch.randn(1, 8), torch.randn(BATCH, 8)
    with pytest.raises(RuntimeConfigError, match=r"first tensor input, 'table'.*as a keyword input"):
        compile_parallel(AddTable(), ["cpu"] * 2, (table, x), loss_fn, microbatches=MICROBATCHES)
