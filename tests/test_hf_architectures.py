"""compile_parallel on Hugging Face architectures the zoo does not build: grouped-query attention
(Qwen2), a mixture of experts with data-dependent routing (Mixtral), an encoder-decoder driven by
keyword inputs (BART) or by `labels` it shifts into decoder inputs in place and computes its own loss
from (T5, BART), and an image model (ViT). Loss and gradients equal the unpartitioned
model's (fp32, rel err < 1e-5), under 1f1b and interleaved-1f1b.
"""
from __future__ import annotations

import copy

import pytest
import torch

from partitioner.api import compile_parallel

transformers = pytest.importorskip("transformers")

BATCH, SEQ, VOCAB = 4, 8, 64
SMALL = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64, vocab_size=VOCAB,
             max_position_embeddings=64)


def token_loss(out, target: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), target.reshape(-1))


def model_loss(out, target: torch.Tensor) -> torch.Tensor:
    """The loss the model computed from its `labels` input (the Trainer's way)."""
    return out.loss


def class_loss(out, target: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(out.logits, target)


def build(name: str):
    """(model, args, kwargs, target, loss_fn) of a small randomly initialised `name`, dropout off."""
    torch.manual_seed(0)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ))
    kwargs: dict = {}
    if name == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(num_key_value_heads=2, **SMALL))
        args, target, loss_fn = (tokens,), torch.randint(0, VOCAB, (BATCH, SEQ)), token_loss
    elif name == "mixtral":
        cfg = transformers.MixtralConfig(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, **SMALL)
        model = transformers.MixtralForCausalLM(cfg)
        args, target, loss_fn = (tokens,), torch.randint(0, VOCAB, (BATCH, SEQ)), token_loss
    elif name == "bart":
        cfg = transformers.BartConfig(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                                      decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                                      vocab_size=VOCAB, max_position_embeddings=64, dropout=0.0,
                                      attention_dropout=0.0, activation_dropout=0.0)
        model = transformers.BartForConditionalGeneration(cfg)
        args, kwargs = (tokens,), {"decoder_input_ids": torch.randint(0, VOCAB, (BATCH, SEQ))}
        target, loss_fn = torch.randint(0, VOCAB, (BATCH, SEQ)), token_loss
    elif name in ("t5-labels", "bart-labels"):  # the model shifts `labels` into decoder inputs in place
        if name == "t5-labels":
            model = transformers.T5ForConditionalGeneration(transformers.T5Config(
                d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8, vocab_size=VOCAB, dropout_rate=0.0,
                decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, use_cache=False))
        else:
            model = transformers.BartForConditionalGeneration(transformers.BartConfig(
                d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=VOCAB, max_position_embeddings=64, dropout=0.0,
                attention_dropout=0.0, activation_dropout=0.0, use_cache=False))
        target = torch.randint(2, VOCAB, (BATCH, SEQ))
        args, kwargs, loss_fn = (tokens,), {"labels": target}, model_loss
    elif name == "vit":
        cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
                                     image_size=16, patch_size=4, num_labels=3, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
        model = transformers.ViTForImageClassification(cfg)
        args, target, loss_fn = (torch.randn(BATCH, 3, 16, 16),), torch.randint(0, 3, (BATCH,)), class_loss
    else:
        raise ValueError(name)
    model.config.use_cache = False
    return model.train(), args, kwargs, target, loss_fn


@pytest.mark.parametrize("name,chunks", [("qwen2", 1), ("mixtral", 1), ("mixtral", 2), ("bart", 1), ("vit", 2),
                                        ("t5-labels", 1), ("t5-labels", 2), ("bart-labels", 1)])
def test_loss_and_gradients_equal_the_model(name, chunks):
    model, args, kwargs, target, loss_fn = build(name)
    reference = copy.deepcopy(model)
    want_loss = loss_fn(reference(*args, **kwargs), target)
    want_loss.backward()
    want = {n: p.grad for n, p in reference.named_parameters()}

    pm = compile_parallel(copy.deepcopy(model), ["cpu"] * 2, args, loss_fn, example_kwargs=kwargs,
                          example_target=target, microbatches=2, chunks=chunks)
    loss = pm.train_step(*args, target=target, **kwargs)

    assert abs(loss.item() - want_loss.item()) <= 1e-5 * abs(want_loss.item())
    got = dict(pm.named_parameters())
    assert set(got) == set(want)
    largest = max(g.abs().max().item() for g in want.values() if g is not None)
    for n, p in got.items():
        if want[n] is None:
            assert p.grad is None or not p.grad.any(), n
            continue
        # a gradient that is zero up to rounding (attention key biases: softmax ignores them) is
        # compared against the model's largest gradient instead of its own size
        scale = max(want[n].abs().max().item(), 1e-3 * largest)
        assert (p.grad - want[n]).abs().max().item() <= 1e-5 * scale, n
