import builtins

import pytest
import torch

from partitioner import zoo
from partitioner.errors import PartitionerError

CLASSES = {"mlp": "MLP", "cnn": "ResNet", "gpt2": "GPT2LMHeadModel", "gpt2-medium": "GPT2LMHeadModel",
           "gpt2-large": "GPT2LMHeadModel", "gpt2-xl": "GPT2LMHeadModel", "llama-1b": "LlamaForCausalLM",
           "llama-8b": "LlamaForCausalLM", "llama-70b": "LlamaForCausalLM", "bert-base": "BertForMaskedLM",
           "t5-base": "T5ForConditionalGeneration"}


def test_model_names():
    assert zoo.model_names() == list(CLASSES)


@pytest.mark.parametrize("name", list(CLASSES))
def test_small_models_run_with_a_scalar_loss(name):
    zm = zoo.build(name, small=True, batch=2)
    assert type(zm.model).__name__ == CLASSES[name]
    assert all(p.device.type == "cpu" for p in zm.model.parameters())
    assert sum(p.numel() for p in zm.model.parameters()) < 200_000
    out = zm.model(*zm.example_args, **zm.example_kwargs)
    loss = zm.loss_fn(out, zm.target)
    assert loss.dim() == 0 and torch.isfinite(loss)
    if name not in ("mlp", "cnn"):
        assert zm.example_args[0].dtype == torch.int64 and zm.example_args[0].shape == (2, 16)


def test_build_is_deterministic_and_seeded():
    a, b, c = (zoo.build("gpt2", small=True, seed=s) for s in (0, 0, 1))
    torch.testing.assert_close(a.model.lm_head.weight, b.model.lm_head.weight)
    assert torch.equal(a.example_args[0], b.example_args[0])
    assert not torch.equal(a.model.lm_head.weight, c.model.lm_head.weight)


def test_dropout_is_zero_so_train_equals_eval():
    zm = zoo.build("bert-base", small=True, batch=2)
    zm.model.train()
    train_out = zm.model(*zm.example_args).logits
    zm.model.eval()
    torch.testing.assert_close(train_out, zm.model(*zm.example_args).logits, rtol=0, atol=0)


def test_full_size_defaults_to_meta_with_real_shapes():
    zm = zoo.build("gpt2", batch=4)
    assert all(p.is_meta for p in zm.model.parameters())
    assert zm.example_args[0].shape == (4, 1024) and zm.example_args[0].is_meta
    assert sum(p.numel() for p in zm.model.parameters()) == 124_439_808  # GPT-2 small
    assert zm.model.lm_head.weight is zm.model.transformer.wte.weight
    t5 = zoo.build("t5-base", batch=2, seq=64)
    assert t5.example_kwargs["decoder_input_ids"].shape == (2, 16)
    assert t5.model.lm_head.weight is t5.model.shared.weight


def test_seq_longer_than_small_context_grows_positions():
    zm = zoo.build("gpt2", small=True, seq=128, batch=1)  # the small config has 64 positions
    assert zm.model.config.n_positions == 128 and zm.model.transformer.wpe.weight.shape[0] == 128
    logits = zm.model(*zm.example_args).logits
    assert logits.shape == (1, 128, 100) and torch.isfinite(logits).all()


def test_context_note_says_when_positions_grow():
    assert zoo.context_note("gpt2", 1024) is None and zoo.context_note("gpt2", None) is None
    assert "context of 1024 positions; --seq 4096" in zoo.context_note("gpt2", 4096)
    assert zoo.context_note("t5-base", 4096) is None and zoo.context_note("mlp", 4096) is None  # no position table
    assert zoo.context_note("no-such-model", 4096) is None


@pytest.mark.parametrize("kwargs", [dict(batch=0), dict(batch=-1), dict(seq=0), dict(seq=-4)])
def test_non_positive_shapes_are_refused(kwargs):
    with pytest.raises(PartitionerError, match="must be positive"):
        zoo.build("gpt2", small=True, **kwargs)


def test_dtype():
    zm = zoo.build("cnn", small=True, dtype=torch.bfloat16)
    assert zm.example_args[0].dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in zm.model.parameters())


def test_unknown_name():
    with pytest.raises(PartitionerError, match="unknown zoo model 'gpt5'.*gpt2-xl"):
        zoo.build("gpt5")


def test_missing_transformers_is_a_clear_error(monkeypatch):
    real_import = builtins.__import__

    def no_transformers(name, *args, **kwargs):
        if name == "transformers" or name.startswith("transformers."):
            raise ImportError("No module named 'transformers'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_transformers)
    with pytest.raises(PartitionerError, match=r"pip install 'partitioner\[hf\]'"):
        zoo.build("gpt2", small=True)
    zoo.build("mlp", small=True)  # plain torch models need nothing else


def test_print_models(monkeypatch, capsys):
    monkeypatch.setattr(zoo, "model_names", lambda: ["mlp", "gpt2", "t5-base"])
    zoo.print_models()
    text = capsys.readouterr().out
    assert "124.44M" in text and "GPT2LMHeadModel" in text and "decoder_input_ids=(8, 128)" in text
