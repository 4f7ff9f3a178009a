"""compile_parallel on Hugging Face architectures the zoo does not build: grouped-query attention
(Qwen2), a mixture of experts with data-dependent routing (Mixtral; JetMoE's per-expert row counts
are data-dependent shapes), an encoder-decoder driven by keyword inputs (BART, Whisper's
input_features) or by `labels` it shifts into decoder inputs in place and computes its own loss
from (T5, BART), image models (ViT, Swin's shifted windows), encoders with padding masks and
token types as keyword inputs (BERT), one layer shared by every depth (ALBERT), ALiBi (Bloom),
padded causal attention (Llama), sliding windows (Gemma2), two towers with a contrastive loss
(CLIP), reentrant gradient checkpointing, DeBERTa-v2's relative attention, Funnel's pooling (the sequence
shortens), multi-query attention (GPTBigCode) and a state-space scan (Mamba2). A custom torch.autograd.Function
(Reformer's reversible layers) is traced as its forward: said in a warning. Loss and gradients equal the unpartitioned model's
run with gradient accumulation over the same microbatches (fp32, rel err < 1e-5), under 1f1b and
interleaved-1f1b.
"""
from __future__ import annotations

import copy

import pytest
import torch

from partitioner.api import compile_parallel
from partitioner.microbatch import batch_size, split_batch

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


def padding_mask(left: bool = False) -> torch.Tensor:
    """An attention mask with padding (zeros) in two of the samples, on the left or the right."""
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    if left:
        mask[0, :3], mask[2, :1] = 0, 0
    else:
        mask[1, 5:], mask[3, 6:] = 0, 0
    return mask


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
    elif name in ("bert-cls", "bert-mlm", "albert"):
        kwargs = {"attention_mask": padding_mask(), "token_type_ids": torch.randint(0, 2, (BATCH, SEQ))}
        dropout = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout_prob=0.0)
        if name == "albert":  # one layer's weights at every depth, embeddings narrower than the layers
            model = transformers.AlbertForSequenceClassification(transformers.AlbertConfig(
                embedding_size=16, num_labels=3, **dropout, **SMALL))
        elif name == "bert-cls":
            model = transformers.BertForSequenceClassification(transformers.BertConfig(num_labels=3, **dropout,
                                                                                       **SMALL))
        else:
            model = transformers.BertForMaskedLM(transformers.BertConfig(**dropout, **SMALL))
        args = (tokens,)
        target, loss_fn = (torch.randint(0, VOCAB, (BATCH, SEQ)), token_loss) if name == "bert-mlm" else (
            torch.randint(0, 3, (BATCH,)), class_loss)
    elif name == "bloom":  # ALiBi position biases, built from the padding mask
        model = transformers.BloomForCausalLM(transformers.BloomConfig(
            hidden_size=32, n_layer=4, n_head=4, vocab_size=VOCAB, hidden_dropout=0.0, attention_dropout=0.0))
        args, kwargs = (tokens,), {"attention_mask": padding_mask(left=True)}
        target, loss_fn = torch.randint(0, VOCAB, (BATCH, SEQ)), token_loss
    elif name in ("llama-padded", "llama-checkpointed"):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(num_key_value_heads=2, **SMALL))
        args, kwargs = (tokens,), {"attention_mask": padding_mask(left=True)}
        if name == "llama-checkpointed":
            model.gradient_checkpointing_enable({"use_reentrant": True})
        target, loss_fn = torch.randint(0, VOCAB, (BATCH, SEQ)), token_loss
    elif name == "gemma2":  # sliding-window layers alternate with global ones; logits soft-capped
        model = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
            num_key_value_heads=2, head_dim=8, sliding_window=4, **SMALL))
        args, target, loss_fn = (tokens,), torch.randint(0, VOCAB, (BATCH, SEQ)), token_loss
    elif name == "jetmoe":
        model = transformers.JetMoeForCausalLM(transformers.JetMoeConfig(
            num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, kv_channels=8, **SMALL))
        args, target, loss_fn = (tokens,), torch.randint(0, VOCAB, (BATCH, SEQ)), token_loss
    elif name == "whisper":
        model = transformers.WhisperForConditionalGeneration(transformers.WhisperConfig(
            d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
            encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=VOCAB, num_mel_bins=8, max_source_positions=8,
            max_target_positions=16, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, pad_token_id=0,
            bos_token_id=1, eos_token_id=2, decoder_start_token_id=1))
        args, kwargs = (torch.randn(BATCH, 8, 16),), {"decoder_input_ids": tokens}
        target, loss_fn = torch.randint(0, VOCAB, (BATCH, SEQ)), token_loss
    elif name == "clip":  # the contrastive loss of each microbatch's image-text pairs, return_loss=True
        model = transformers.CLIPModel(transformers.CLIPConfig(
            text_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                             vocab_size=VOCAB, max_position_embeddings=16, bos_token_id=1, eos_token_id=2),
            vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                               image_size=16, patch_size=4), projection_dim=16))
        args, kwargs = (tokens,), {"pixel_values": torch.randn(BATCH, 3, 16, 16), "return_loss": True}
        target, loss_fn = torch.zeros(BATCH), model_loss
    elif name == "swin":
        model = transformers.SwinForImageClassification(transformers.SwinConfig(
            image_size=16, patch_size=2, embed_dim=8, depths=[1, 1], num_heads=[2, 2], window_size=4, num_labels=3,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, drop_path_rate=0.0))
        args, target, loss_fn = (torch.randn(BATCH, 3, 16, 16),), torch.randint(0, 3, (BATCH,)), class_loss
    elif name == "deberta-v2":  # disentangled relative attention with log buckets
        model = transformers.DebertaV2ForSequenceClassification(transformers.DebertaV2Config(
            relative_attention=True, position_buckets=4, max_relative_positions=16, pos_att_type=["p2c", "c2p"],
            num_labels=3, type_vocab_size=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **SMALL))
        args, kwargs = (tokens,), {"attention_mask": padding_mask(), "token_type_ids": torch.randint(0, 2, (BATCH, SEQ))}
        target, loss_fn = torch.randint(0, 3, (BATCH,)), class_loss
    elif name == "funnel":  # pooling halves the sequence between blocks
        model = transformers.FunnelForMaskedLM(transformers.FunnelConfig(
            block_sizes=[1, 1], num_decoder_layers=1, d_model=32, n_head=4, d_head=8, d_inner=64, vocab_size=VOCAB,
            hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0))
        args, kwargs = (tokens,), {"attention_mask": padding_mask()}
        target, loss_fn = torch.randint(0, VOCAB, (BATCH, SEQ)), token_loss
    elif name == "gpt_bigcode":  # multi-query attention, padded
        model = transformers.GPTBigCodeForCausalLM(transformers.GPTBigCodeConfig(
            n_embd=32, n_layer=4, n_head=4, vocab_size=VOCAB, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, multi_query=True))
        args, kwargs = (tokens,), {"attention_mask": padding_mask()}
        target, loss_fn = torch.randint(0, VOCAB, (BATCH, SEQ)), token_loss
    elif name == "mamba2":  # selective state-space scan (the slow path on CPU)
        model = transformers.Mamba2ForCausalLM(transformers.Mamba2Config(
            hidden_size=32, num_hidden_layers=2, state_size=8, vocab_size=VOCAB, expand=2, conv_kernel=4, num_heads=8,
            head_dim=8, n_groups=1, chunk_size=4, time_step_rank=4, use_cache=False))
        args, target, loss_fn = (tokens,), torch.randint(0, VOCAB, (BATCH, SEQ)), token_loss
    elif name == "reformer":  # reversible layers: an autograd.Function that runs them under no_grad
        model = transformers.ReformerModelWithLMHead(transformers.ReformerConfig(
            hidden_size=32, num_attention_heads=2, attention_head_size=16, attn_layers=["local", "local"],
            feed_forward_size=64, vocab_size=VOCAB, max_position_embeddings=SEQ, axial_pos_shape=[2, 4],
            axial_pos_embds_dim=[16, 16], local_attn_chunk_length=4, is_decoder=True, hidden_dropout_prob=0.0,
            local_attention_probs_dropout_prob=0.0, chunk_size_lm_head=0, pad_token_id=0, eos_token_id=1))
        args, target, loss_fn = (tokens,), torch.randint(0, VOCAB, (BATCH, SEQ)), token_loss
    else:
        raise ValueError(name)
    model.config.use_cache = False
    return model.train(), args, kwargs, target, loss_fn


def accumulated(model, args: tuple, kwargs: dict, target, loss_fn, microbatches: int) -> float:
    """The model's loss and gradients with gradient accumulation over the microbatches the pipeline
    runs (the same as one forward of the batch unless the loss couples samples, as CLIP's does)."""
    inputs = split_batch((args, kwargs), microbatches, "input", batch_size((args, kwargs)))
    loss = 0.0
    for (mb_args, mb_kwargs), mb_target in zip(inputs, split_batch(target, microbatches, "target")):
        mb_loss = loss_fn(model(*mb_args, **mb_kwargs), mb_target) / microbatches
        mb_loss.backward()
        loss += mb_loss.item()
    return loss


@pytest.mark.parametrize("name,chunks", [
    ("qwen2", 1), ("mixtral", 1), ("mixtral", 2), ("bart", 1), ("vit", 2), ("t5-labels", 1), ("t5-labels", 2),
    ("bart-labels", 1), ("bert-cls", 1), ("bert-mlm", 2), ("albert", 2), ("bloom", 1), ("llama-padded", 2),
    ("llama-checkpointed", 1), ("gemma2", 1), ("jetmoe", 2), ("whisper", 1), ("clip", 1), ("swin", 1),
    ("deberta-v2", 2), ("funnel", 1), ("gpt_bigcode", 1), ("mamba2", 2)])
def test_loss_and_gradients_equal_the_model(name, chunks):
    model, args, kwargs, target, loss_fn = build(name)
    reference = copy.deepcopy(model)
    want_loss = accumulated(reference, args, kwargs, target, loss_fn, microbatches=2)
    want = {n: p.grad for n, p in reference.named_parameters()}

    pm = compile_parallel(copy.deepcopy(model), ["cpu"] * 2, args, loss_fn, example_kwargs=kwargs,
                          example_target=target, microbatches=2, chunks=chunks)
    loss = pm.train_step(*args, target=target, **kwargs)
    assert_equals_the_model(pm, loss, want_loss, want)


def assert_equals_the_model(pm, loss: torch.Tensor, want_loss: float, want: dict) -> None:
    """The step's loss and every gradient equal the model's (fp32, rel err < 1e-5)."""
    assert abs(loss.item() - want_loss) <= 1e-5 * abs(want_loss), (loss.item(), want_loss)
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
        assert p.grad is not None, n
        assert (p.grad - want[n]).abs().max().item() <= 1e-5 * scale, n


def test_bert_infers_in_eval_mode_after_training():
    """pm.eval() captures BERT again on FakeTensor buffers (modes.fake_skeleton): its position-id lookup,
    a lookup of constant indices, has no values to read there and stays a lookup (reading the fake
    buffer's values raised DataDependentOutputException)."""
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(transformers.BertConfig(num_labels=3, **SMALL))
    tokens, kwargs = torch.randint(0, VOCAB, (BATCH, SEQ)), {"attention_mask": padding_mask()}
    target = torch.randint(0, 3, (BATCH,))
    pm = compile_parallel(copy.deepcopy(model), ["cpu"] * 2, (tokens,), class_loss, example_kwargs=kwargs,
                          example_target=target, microbatches=2, time_limit_s=1)
    pm.train_step(tokens, target=target, **kwargs)  # dropout on
    pm.eval()
    model.eval()
    with torch.no_grad():
        got, want = pm(tokens, **kwargs).logits, model(tokens, **kwargs).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    pm.train()
    pm.train_step(tokens, target=target, **kwargs)


def test_reversible_layers_say_their_backward_does_not_run():
    """Reformer's reversible layers are a torch.autograd.Function whose forward runs them under no_grad and
    whose backward recomputes them; export keeps only the forward, so no parameter before the head got a
    gradient, silently. The warning names the Function and its module."""
    model, args, kwargs, target, loss_fn = build("reformer")
    with pytest.warns(RuntimeWarning, match=r"torch.autograd.Function .*_ReversibleFunction \(in module "
                                            r"'reformer.encoder'\).*passes none back"):
        compile_parallel(model, ["cpu"] * 2, args, loss_fn, example_target=target, microbatches=2, time_limit_s=1)


def test_a_loss_checked_against_its_labels_names_the_line():
    """Wav2Vec2ForCTC checks `labels.max() >= vocab_size` before its CTC loss, a branch on tensor values no
    graph can hold: refused, naming the model's line (compute the CTC loss in loss_fn instead)."""
    from partitioner.errors import CaptureError
    torch.manual_seed(0)
    model = transformers.Wav2Vec2ForCTC(transformers.Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, conv_dim=(16, 16),
        conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=4,
        vocab_size=12, mask_time_prob=0.0, layerdrop=0.0))
    labels = torch.randint(1, 12, (BATCH, 5))
    with pytest.raises(CaptureError, match=r"data-dependent control flow in module '<root>' \(Wav2Vec2ForCTC\) at "
                                           r"modeling_wav2vec2.py:\d+ \(`if labels is not None and labels.max\(\)"):
        compile_parallel(model, ["cpu"] * 2, (torch.randn(BATCH, 400),), model_loss, example_kwargs={"labels": labels},
                         example_target=labels, microbatches=2, time_limit_s=1)
