"""compile_parallel on more Hugging Face architectures than test_hf_architectures.py, compared the same
way: loss and gradients equal the unpartitioned model's run with gradient accumulation over the same
microbatches (fp32, rel err < 1e-5), padded where the model takes a mask.

Decoders with partial rotary (GPT-NeoX), ALiBi with grouped KV heads (Falcon), sliding windows
(Gemma3), attention sinks and clamped experts (GPT-OSS), latent attention with grouped routing
(DeepSeek-V3), a router's auxiliary loss in out.loss (Qwen3-MoE), recurrent and hybrid layers (RWKV,
Jamba's mamba, attention and experts); the outputs users read besides logits (every layer's hidden
states, attention maps), inputs_embeds, one-sample microbatches, labels with ignored positions;
encoders with relative positions (MPNet, ESM's rotary), local and global layers (ModernBERT),
(batch, choices, seq) inputs (multiple choice), T5's classifier reading the last <eos>; seq2seq from
labels (Marian, Speech2Text's audio frames), audio with padding (WavLM), time series (PatchTST);
vision with relative bias (BEiT), BatchNorm (EfficientNet), convolutions (ConvNeXt), masking from a
given noise (ViT-MAE), image features scattered into token embeddings (LLaVA) and a vision
encoder-decoder (ViT to GPT-2's cross-attention). A partly frozen model under Hugging Face's
gradient checkpointing (a PEFT setup) trains without a warning about hooks.
"""
from __future__ import annotations

import copy

import pytest
import torch

from partitioner.api import compile_parallel
from test_hf_architectures import (BATCH, SEQ, SMALL, VOCAB, accumulated, assert_equals_the_model, class_loss,
                                   model_loss, padding_mask, token_loss)

transformers = pytest.importorskip("transformers")

NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
SEQ2SEQ = dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
               encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=VOCAB, max_position_embeddings=64, dropout=0.0,
               attention_dropout=0.0, activation_dropout=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2,
               decoder_start_token_id=1)


def tokens_and_target():
    return torch.randint(0, VOCAB, (BATCH, SEQ)), torch.randint(0, VOCAB, (BATCH, SEQ))


def causal_lm(name: str):
    """A decoder-only causal LM config and class, by name."""
    t = transformers
    if name == "gpt_neox":
        return t.GPTNeoXForCausalLM, t.GPTNeoXConfig(rotary_pct=0.5, hidden_dropout=0.0, attention_dropout=0.0,
                                                     **SMALL)
    if name == "falcon-alibi":
        return t.FalconForCausalLM, t.FalconConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                                   vocab_size=VOCAB, hidden_dropout=0.0, attention_dropout=0.0,
                                                   new_decoder_architecture=True, num_kv_heads=2, alibi=True)
    if name == "gpt2":
        return t.GPT2LMHeadModel, t.GPT2Config(n_embd=32, n_layer=4, n_head=4, vocab_size=VOCAB, n_positions=64,
                                               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    if name == "qwen3_moe":
        return t.Qwen3MoeForCausalLM, t.Qwen3MoeConfig(num_key_value_heads=2, head_dim=8, num_experts=4,
                                                       num_experts_per_tok=2, moe_intermediate_size=32, **SMALL)
    if name == "gemma3":
        return t.Gemma3ForCausalLM, t.Gemma3TextConfig(num_key_value_heads=2, head_dim=8, sliding_window=4,
                                                       layer_types=["sliding_attention", "full_attention"] * 2,
                                                       **SMALL)
    if name == "rwkv":
        return t.RwkvForCausalLM, t.RwkvConfig(hidden_size=32, num_hidden_layers=2, attention_hidden_size=32,
                                               intermediate_size=64, vocab_size=VOCAB, context_length=64)
    if name == "deepseek_v3":  # multi-head latent attention, shared + routed experts with group-limited routing
        return t.DeepseekV3ForCausalLM, t.DeepseekV3Config(
            num_key_value_heads=4, moe_intermediate_size=16, n_shared_experts=1, n_routed_experts=4, kv_lora_rank=16,
            q_lora_rank=16, qk_rope_head_dim=4, v_head_dim=8, qk_nope_head_dim=4, n_group=2, topk_group=1,
            num_experts_per_tok=2, first_k_dense_replace=1, **SMALL)
    if name == "jamba":  # mamba and attention layers, experts every other layer
        return t.JambaForCausalLM, t.JambaConfig(num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                                                 expert_layer_period=2, expert_layer_offset=1, attn_layer_period=2,
                                                 attn_layer_offset=1, use_mamba_kernels=False, mamba_d_state=8,
                                                 mamba_dt_rank=4, **SMALL)
    if name == "gpt_oss":  # attention sinks, sliding windows, clamped SwiGLU experts
        return t.GptOssForCausalLM, t.GptOssConfig(num_key_value_heads=2, head_dim=8, num_local_experts=4,
                                                   num_experts_per_tok=2, sliding_window=4, **SMALL)
    raise KeyError(name)


CAUSAL = ["gpt_neox", "falcon-alibi", "gemma3", "rwkv", "deepseek_v3", "jamba", "gpt_oss"]


def encoder(name: str):
    """A BERT-like encoder for sequence classification, by name; (class, config, takes token types)."""
    t = transformers
    if name == "mpnet":
        return t.MPNetForSequenceClassification, t.MPNetConfig(num_labels=3, pad_token_id=1,
                                                               **NO_DROPOUT, **SMALL), False
    if name == "modernbert":
        return t.ModernBertForSequenceClassification, t.ModernBertConfig(
            hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64, vocab_size=VOCAB,
            max_position_embeddings=64, local_attention=4, global_attn_every_n_layers=2, num_labels=3,
            pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2,
            embedding_dropout=0.0, attention_dropout=0.0, mlp_dropout=0.0, classifier_dropout=0.0), False
    if name == "t5-cls":
        return t.T5ForSequenceClassification, t.T5Config(d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8,
                                                         vocab_size=VOCAB, dropout_rate=0.0, classifier_dropout=0.0,
                                                         decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
                                                         use_cache=False, num_labels=3), False
    raise KeyError(name)


ENCODERS = ["mpnet", "modernbert", "t5-cls"]


def seq2seq(name: str):
    """An encoder-decoder trained from `labels`, by name."""
    t = transformers
    if name == "marian":
        return t.MarianMTModel, t.MarianConfig(**SEQ2SEQ)
    if name == "speech_to_text":
        return t.Speech2TextForConditionalGeneration, t.Speech2TextConfig(
            input_feat_per_channel=8, conv_channels=16, max_source_positions=64, max_target_positions=64,
            encoder_layerdrop=0.0, decoder_layerdrop=0.0, **{k: v for k, v in SEQ2SEQ.items()
                                                             if k != "max_position_embeddings"})
    raise KeyError(name)


SEQ2SEQS = ["marian", "speech_to_text"]


def vision(name: str):
    """An image classifier, by name; images of 3 x 16 x 16 (32 x 32 for the convolutional ones)."""
    t = transformers
    vit = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=16,
               patch_size=4, num_labels=3, **NO_DROPOUT)
    if name == "beit":
        return t.BeitForImageClassification, t.BeitConfig(use_relative_position_bias=True, drop_path_rate=0.0,
                                                          **vit), 16
    if name == "convnext":
        return t.ConvNextForImageClassification, t.ConvNextConfig(num_channels=3, num_stages=2, hidden_sizes=[8, 16],
                                                                  depths=[1, 1], num_labels=3, drop_path_rate=0.0), 32
    if name == "efficientnet":
        return t.EfficientNetForImageClassification, t.EfficientNetConfig(
            image_size=32, width_coefficient=0.25, depth_coefficient=0.25, hidden_dim=320, num_labels=3,
            dropout_rate=0.0,
            drop_connect_rate=0.0), 32
    raise KeyError(name)


VISION = ["beit", "convnext", "efficientnet"]


def build_more(name: str):
    """(model, args, kwargs, target, loss_fn) of a small randomly initialised `name`, dropout off."""
    torch.manual_seed(0)
    kwargs: dict = {}
    if name in CAUSAL:
        cls, cfg = causal_lm(name)
        model = cls(cfg)
        tokens, target = tokens_and_target()
        args, kwargs, loss_fn = (tokens,), {"attention_mask": padding_mask(left=True)}, token_loss
    elif name in ENCODERS:
        cls, cfg, token_types = encoder(name)
        model = cls(cfg)
        args = (torch.randint(3, VOCAB, (BATCH, SEQ)),)
        kwargs = {"attention_mask": padding_mask()}
        if name == "t5-cls":  # classified from the last <eos>'s state
            args[0][:, -1] = 1
        if token_types:
            kwargs["token_type_ids"] = torch.randint(0, 2, (BATCH, SEQ))
        target, loss_fn = torch.randint(0, 3, (BATCH,)), class_loss
    elif name in SEQ2SEQS:  # labels: the model shifts them into decoder inputs and computes the loss
        cls, cfg = seq2seq(name)
        model = cls(cfg)
        target = torch.randint(3, VOCAB, (BATCH, SEQ))
        args, kwargs = (torch.randint(3, VOCAB, (BATCH, SEQ)),), {"labels": target, "attention_mask": padding_mask()}
        loss_fn = model_loss
        if name == "speech_to_text":  # filter-bank frames in
            args, kwargs = (torch.randn(BATCH, 16, 8),), {"labels": target}
    elif name in VISION:
        cls, cfg, size = vision(name)
        model = cls(cfg)
        args, target, loss_fn = (torch.randn(BATCH, 3, size, size),), torch.randint(0, 3, (BATCH,)), class_loss
    elif name == "vision-encoder-decoder":  # ViT encoder, GPT2 decoder, labels
        enc = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                     image_size=16, patch_size=4, **NO_DROPOUT)
        dec = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False)
        cfg = transformers.VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
        cfg.decoder_start_token_id, cfg.pad_token_id = 1, 0
        model = transformers.VisionEncoderDecoderModel(cfg)
        target = torch.randint(3, VOCAB, (BATCH, SEQ))
        args, kwargs, loss_fn = (torch.randn(BATCH, 3, 16, 16),), {"labels": target}, model_loss
    elif name == "qwen3_moe-aux":  # labels, and the router's load-balancing loss added to out.loss
        cls, cfg = causal_lm("qwen3_moe")
        cfg.output_router_logits = True
        model = cls(cfg)
        target = torch.randint(0, VOCAB, (BATCH, SEQ))
        args, kwargs, loss_fn = (target,), {"labels": target, "attention_mask": padding_mask()}, model_loss
    elif name == "llama-frozen":  # frozen embeddings and first layers, reentrant checkpointing (a PEFT setup)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(num_key_value_heads=2, **SMALL))
        for module in (model.model.embed_tokens, model.model.layers[0], model.model.layers[1]):
            module.requires_grad_(False)
        model.gradient_checkpointing_enable({"use_reentrant": True})
        tokens, target = tokens_and_target()
        args, kwargs, loss_fn = (tokens,), {"attention_mask": padding_mask()}, token_loss
    elif name == "llama-hidden-states":  # every layer's hidden states out, an intermediate one in the loss
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(num_key_value_heads=2, **SMALL))
        tokens, target = tokens_and_target()
        args, kwargs = (tokens,), {"output_hidden_states": True}

        def loss_fn(out, t):
            return token_loss(out, t) + out.hidden_states[2].pow(2).mean()
    elif name == "gpt2-attentions":  # eager attention, the attention maps out and in the loss
        cls, cfg = causal_lm("gpt2")
        cfg._attn_implementation = "eager"
        model = cls(cfg)
        tokens, target = tokens_and_target()
        args, kwargs = (tokens,), {"attention_mask": padding_mask(), "output_attentions": True}

        def loss_fn(out, t):
            return token_loss(out, t) + sum(a.pow(2).mean() for a in out.attentions)
    elif name == "llama-inputs-embeds":  # embeddings given instead of token ids
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(num_key_value_heads=2, **SMALL))
        tokens, target = tokens_and_target()
        args, kwargs, loss_fn = (), {"inputs_embeds": torch.randn(BATCH, SEQ, 32),
                                     "attention_mask": padding_mask(left=True)}, token_loss
    elif name == "bert-token-cls":  # labels with ignored (-100) positions, the model's loss
        model = transformers.BertForTokenClassification(transformers.BertConfig(num_labels=5, **NO_DROPOUT, **SMALL))
        target = torch.randint(0, 5, (BATCH, SEQ))
        target[0, :5], target[3, 2:] = -100, -100
        args, kwargs = (torch.randint(0, VOCAB, (BATCH, SEQ)),), {"labels": target, "attention_mask": padding_mask()}
        loss_fn = model_loss
    elif name == "llama-one-sample":  # microbatches of one sample
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(num_key_value_heads=2, **SMALL))
        tokens, target = torch.randint(0, VOCAB, (2, SEQ)), torch.randint(0, VOCAB, (2, SEQ))
        args, kwargs, loss_fn = (tokens,), {"attention_mask": padding_mask(left=True)[:2]}, token_loss
    elif name == "esm":  # protein language model: rotary attention, token dropout's rescaling
        model = transformers.EsmForMaskedLM(transformers.EsmConfig(
            mask_token_id=3, pad_token_id=1, position_embedding_type="rotary", token_dropout=True, **NO_DROPOUT,
            **SMALL))
        tokens, target = tokens_and_target()
        tokens[:, 3] = 3
        args, kwargs, loss_fn = (tokens,), {"attention_mask": padding_mask()}, token_loss
    elif name == "patchtst":  # time-series forecasting from patches of the past values, its own MSE
        model = transformers.PatchTSTForPrediction(transformers.PatchTSTConfig(
            num_input_channels=3, context_length=32, patch_length=4, patch_stride=4, prediction_length=8,
            num_hidden_layers=2, d_model=32, num_attention_heads=4, ffn_dim=64, attention_dropout=0.0,
            positional_dropout=0.0, path_dropout=0.0, ff_dropout=0.0, head_dropout=0.0))
        target = torch.randn(BATCH, 8, 3)
        args, kwargs, loss_fn = (torch.randn(BATCH, 32, 3),), {"future_values": target}, model_loss
    elif name == "gpt2-labels":
        cls, cfg = causal_lm("gpt2")
        model = cls(cfg)
        target = torch.randint(0, VOCAB, (BATCH, SEQ))
        args, kwargs, loss_fn = (target,), {"labels": target}, model_loss
    elif name == "vitmae":  # masked autoencoder: random masking from the `noise` input, its own loss
        model = transformers.ViTMAEForPreTraining(transformers.ViTMAEConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=16,
            patch_size=4, decoder_hidden_size=16, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
            decoder_intermediate_size=32, mask_ratio=0.5, **NO_DROPOUT))
        args, kwargs = (torch.randn(BATCH, 3, 16, 16),), {"noise": torch.rand(BATCH, 16)}
        target, loss_fn = torch.zeros(BATCH), model_loss
    elif name == "wavlm":  # padded audio, gated relative position bias, utterance classification
        model = transformers.WavLMForSequenceClassification(transformers.WavLMConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, conv_dim=(16, 16),
            conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=4,
            num_labels=3, mask_time_prob=0.0, layerdrop=0.0, hidden_dropout=0.0, attention_dropout=0.0,
            activation_dropout=0.0, feat_proj_dropout=0.0, final_dropout=0.0, do_stable_layer_norm=True,
            feat_extract_norm="layer"))
        mask = torch.ones(BATCH, 400, dtype=torch.long)
        mask[1, 300:] = 0
        args, kwargs = (torch.randn(BATCH, 400),), {"attention_mask": mask}
        target, loss_fn = torch.randint(0, 3, (BATCH,)), class_loss
    elif name == "bert-multiple-choice":  # (batch, choices, seq) inputs
        model = transformers.BertForMultipleChoice(transformers.BertConfig(**NO_DROPOUT, **SMALL))
        args = (torch.randint(0, VOCAB, (BATCH, 3, SEQ)),)
        kwargs = {"attention_mask": torch.ones(BATCH, 3, SEQ, dtype=torch.long)}
        target, loss_fn = torch.randint(0, 3, (BATCH,)), class_loss
    elif name == "gemma3-mm":  # image tokens attend bidirectionally: a mask function vmapped over positions
        model = transformers.Gemma3ForConditionalGeneration(transformers.Gemma3Config(
            vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                               image_size=16, patch_size=4),
            text_config=dict(num_key_value_heads=2, head_dim=8, sliding_window=4, use_cache=False, **SMALL),
            mm_tokens_per_image=4, image_token_index=VOCAB - 1, boi_token_index=VOCAB - 2, eoi_token_index=VOCAB - 3))
        tokens = torch.randint(0, VOCAB - 3, (BATCH, 12))
        tokens[:, 2:6] = VOCAB - 1
        args, kwargs = (tokens,), {"pixel_values": torch.randn(BATCH, 3, 16, 16),
                                   "token_type_ids": (tokens == VOCAB - 1).long()}
        target, loss_fn = torch.randint(0, VOCAB, (BATCH, 12)), token_loss
    elif name == "blip2":  # a Q-Former's queries cross-attend to the image, projected into OPT's embeddings
        model = transformers.Blip2ForConditionalGeneration(transformers.Blip2Config(
            vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                               image_size=16, patch_size=4),
            qformer_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                encoder_hidden_size=32, vocab_size=VOCAB, **NO_DROPOUT),
            text_config=dict(model_type="opt", hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
                             vocab_size=VOCAB, word_embed_proj_dim=32, dropout=0.0, attention_dropout=0.0,
                             use_cache=False),
            num_query_tokens=4, image_token_index=VOCAB - 1))
        tokens = torch.randint(0, VOCAB - 1, (BATCH, 12))
        tokens[:, :4] = VOCAB - 1
        args, kwargs = (torch.randn(BATCH, 3, 16, 16),), {"input_ids": tokens}  # pixel_values comes first
        target, loss_fn = torch.randint(0, VOCAB, (BATCH, 12)), token_loss
    elif name == "llava":  # image features scattered into the image tokens' embeddings
        model = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(
            vision_config=dict(model_type="clip_vision_model", hidden_size=32, num_hidden_layers=2,
                               num_attention_heads=4, intermediate_size=64, image_size=16, patch_size=4),
            text_config=dict(model_type="llama", num_key_value_heads=2, use_cache=False, **SMALL),
            image_token_index=VOCAB - 1, image_seq_length=17, vision_feature_select_strategy="full",
            vision_feature_layer=-1))
        tokens = torch.randint(0, VOCAB - 1, (BATCH, 20))
        tokens[:, 2:19] = VOCAB - 1  # 16 patches and the class embedding
        args, kwargs = (tokens,), {"pixel_values": torch.randn(BATCH, 3, 16, 16)}
        target, loss_fn = torch.randint(0, VOCAB, (BATCH, 20)), token_loss
    else:
        raise ValueError(name)
    model.config.use_cache = False
    return model.train(), args, kwargs, target, loss_fn


def check(name: str, chunks: int) -> None:
    model, args, kwargs, target, loss_fn = build_more(name)
    reference = copy.deepcopy(model)
    want_loss = accumulated(reference, args, kwargs, target, loss_fn, microbatches=2)
    want = {n: p.grad for n, p in reference.named_parameters()}

    pm = compile_parallel(copy.deepcopy(model), ["cpu"] * 2, args, loss_fn, example_kwargs=kwargs,
                          example_target=target, microbatches=2, chunks=chunks, time_limit_s=2)
    loss = pm.train_step(*args, target=target, **kwargs)
    assert_equals_the_model(pm, loss, want_loss, want)


def test_gradient_checkpointing_of_a_partly_frozen_model_is_not_said_to_run_hooks():
    """gradient_checkpointing_enable() puts a forward hook on the input embeddings of every Hugging Face text
    model (enable_input_require_grads) that only marks their output as requiring grad: it was said to have
    side effects that would not run. With the embeddings and the first layers frozen (a PEFT setup), the
    rest trains as the model."""
    import warnings
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "forward hooks", RuntimeWarning)
        check("llama-frozen", chunks=1)


PASSING = [("gpt_neox", 2), ("falcon-alibi", 1), ("gemma3", 2), ("gpt_oss", 1), ("deepseek_v3", 2),
           ("qwen3_moe-aux", 1), ("jamba", 1), ("rwkv", 2), ("llama-hidden-states", 1), ("llama-inputs-embeds", 1),
           ("llama-one-sample", 1), ("gpt2-attentions", 1), ("gpt2-labels", 2), ("mpnet", 1), ("modernbert", 2),
           ("bert-token-cls", 1), ("bert-multiple-choice", 1), ("esm", 1), ("t5-cls", 1), ("marian", 1),
           ("speech_to_text", 1), ("wavlm", 1), ("patchtst", 1), ("beit", 2), ("convnext", 2), ("efficientnet", 1),
           ("vitmae", 1), ("llava", 2), ("gemma3-mm", 1), ("blip2", 1), ("vision-encoder-decoder", 1)]


@pytest.mark.parametrize("name,chunks", PASSING)
def test_loss_and_gradients_equal_the_model(name, chunks):
    check(name, chunks)
