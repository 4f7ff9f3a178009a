"""partitioner/output_assembly.py: ParallelModel.forward's output for the whole batch.

Per-sample outputs equal the unpartitioned model's, batch-independent ones come back once, and
outputs that mix samples across the batch raise RuntimeConfigError naming the output; where the
model cannot be run on fake tensors, every output is concatenated as before, with a warning.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
from dist_utils import max_rel_err

from partitioner.api import compile_parallel
from partitioner.errors import RuntimeConfigError
from partitioner.output_assembly import whole_batch_shapes
from partitioner.passes.capture import capture
from partitioner.passes.split import even_plan


class TwoLayers(nn.Module):
    """Two linear layers: each model below returns its per-sample features and something else."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 6)

    def features(self, x):
        return self.b(torch.relu(self.a(x)))


class PairScores(TwoLayers):
    """Per-sample features and a (batch, batch) score of every pair of samples."""

    def forward(self, x):
        h = self.features(x)
        return {"h": h, "scores": h @ h.T}


class SharedOutputs(TwoLayers):
    """A per-sample output, a batch-independent one (a parameter) and a 0-dim one (a mean)."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(3, 2))

    def forward(self, x):
        h = self.features(x)
        return h, self.scale * 1, h.pow(2).mean()


class SequenceFirst(TwoLayers):
    """Per-sample features, also returned sequence-first: (seq, batch, hidden)."""

    def forward(self, x):  # x: (batch, seq, 6)
        h = self.features(x)
        return h, h.transpose(0, 1)


class BatchMean(TwoLayers):
    """An output of fixed shape that averages over the batch's samples."""

    def forward(self, x):
        h = self.features(x)
        return h, h.mean(0)


class EagerItem(nn.Module):
    """Reads a value as a Python number when not exported: runs on real tensors and captures, but
    not on fake ones (data-dependent control flow)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 6)

    def forward(self, x):
        h = self.a(x)
        if not torch.compiler.is_exporting() and float(x.abs().sum()) < 0:
            h = -h
        return self.b(torch.relu(h))


def first_loss(output, target):
    out = output[0] if isinstance(output, tuple) else output["h"] if isinstance(output, dict) else output
    return nn.functional.mse_loss(out, target)


def compile_small(model, x, microbatches=4):
    plan = even_plan(capture(model, (x[:len(x) // microbatches],)), 2, microbatches=microbatches)
    return compile_parallel(model, ["cpu"] * 2, (x,), first_loss, microbatches=microbatches, plan=plan)


def test_an_output_that_mixes_samples_is_refused_by_name():
    torch.manual_seed(0)
    model, x = PairScores(), torch.randn(8, 6)
    pm = compile_small(model, x)
    with pytest.raises(RuntimeConfigError, match=r"output\['scores'\] is \(8, 8\) for the whole batch but \(2, 2\) "
                                                 r"per microbatch.*mixes samples across the batch.*microbatches=1"):
        pm(x)
    one = compile_small(model, x, microbatches=1)  # one microbatch: the whole batch, nothing to assemble
    with torch.no_grad():
        torch.testing.assert_close(one(x)["scores"], model(x)["scores"], rtol=1e-5, atol=1e-6)


def test_per_sample_outputs_match_and_batch_independent_ones_come_back_once():
    torch.manual_seed(0)
    model, x = SharedOutputs(), torch.randn(8, 6)
    pm = compile_small(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the model runs on fake tensors: no fallback warning
        h, scale, sq = pm(x)
    with torch.no_grad():
        want_h, want_scale, _ = model(x)
    assert max_rel_err(h, want_h) < 1e-5
    assert scale.shape == (3, 2) and torch.equal(scale, want_scale)
    assert sq.shape == (4,)  # 0-dim outputs: one per microbatch, stacked
    torch.testing.assert_close(sq, torch.stack([want_h[i:i + 2].pow(2).mean() for i in range(0, 8, 2)]))


def test_a_sequence_first_output_is_concatenated_along_its_batch_dim():
    torch.manual_seed(0)
    model, x = SequenceFirst(), torch.randn(8, 3, 6)
    h, h_seq = compile_small(model, x)(x)
    with torch.no_grad():
        want_h, want_seq = model(x)
    assert h_seq.shape == (3, 8, 6)
    assert max_rel_err(h, want_h) < 1e-5 and max_rel_err(h_seq, want_seq) < 1e-5


def test_a_fixed_shape_output_that_differs_between_microbatches_is_refused():
    torch.manual_seed(0)
    model, x = BatchMean(), torch.randn(8, 6)
    pm = compile_small(model, x)
    with pytest.raises(RuntimeConfigError, match=r"output\[1\] has shape \(6,\) whatever the batch, but "
                                                 r"microbatches 0 and 1 give it different values"):
        pm(x)


def test_a_model_that_does_not_run_on_fake_tensors_falls_back_to_concatenation():
    torch.manual_seed(0)
    model, x = EagerItem(), torch.randn(8, 6)
    pm = compile_small(model, x)
    with pytest.warns(RuntimeWarning, match="cannot tell which outputs are per sample: EagerItem does not run on "
                                            "fake tensors"):
        y = pm(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        assert torch.equal(pm(x), y)
    with torch.no_grad():
        assert max_rel_err(y, model(x)) < 1e-5


def test_whole_batch_shapes_leaves_the_real_model_alone():
    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 6)
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, x, pos):
            self.calls += 1
            return self.lin(x) + pos, x @ x.T

    model = Counting().eval()
    x, pos = torch.randn(8, 6), torch.randn(1, 6)  # pos: shared by every sample (dim 0 is not the batch)
    like = [torch.zeros(2, 6), torch.zeros(2, 2)]  # a microbatch's output leaves
    assert whole_batch_shapes(model, True, (x, pos), {}, like) == [(8, 6), (8, 8)]
    assert whole_batch_shapes(model, True, (x,), {"pos": pos}, like, replicas=2) == [(4, 6), (4, 4)]
    assert model.calls.item() == 0 and not model.training and model.lin.weight.device.type == "cpu"
    with pytest.warns(RuntimeWarning, match=r"Counting's output does not match the captured graph's \(2 vs 3 leaves"):
        assert whole_batch_shapes(model, True, (x, pos), {}, [*like, torch.zeros(2)]) is None


def test_clip_similarities_are_refused_by_name():
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "CLIPModel"):
        pytest.skip("this transformers has no CLIPModel")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    layers = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    config = transformers.CLIPConfig(text_config=dict(layers, vocab_size=100, max_position_embeddings=16),
                                     vision_config=dict(layers, image_size=16, patch_size=8), projection_dim=16)
    model = transformers.CLIPModel(config)
    ids, pixels = torch.randint(0, 100, (4, 7)), torch.randn(4, 3, 16, 16)
    pm = compile_parallel(model, ["cpu"] * 2, (ids, pixels), clip_loss, microbatches=2)
    with pytest.raises(RuntimeConfigError, match=r"output\['logits_per_image'\] is \(4, 4\) for the whole batch "
                                                 r"but \(2, 2\) per microbatch"):
        pm(ids, pixels)


def clip_loss(output, target):
    return output.image_embeds.pow(2).mean()
