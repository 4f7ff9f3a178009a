"""The ways Hugging Face users call and prepare a model, on compile_parallel (Llama, GPT-2, BERT, T5).

Inputs: a tokenizer's BatchEncoding, inputs_embeds, explicit position_ids, token_type_ids, attention masks as
bool / float / long with left or right padding, labels with -100 and the model's own loss, return_dict=False,
output_hidden_states / output_attentions, use_cache left True in the config (from_pretrained's default: captured
without the cache, passes/kv_cache.py). Preparation: gradient checkpointing (reentrant or not),
resize_token_embeddings, tied and untied embeddings, save_pretrained / from_pretrained, pm's weights back into
the model, bf16 models and mixed_precision="bf16", frozen parts and hand-made LoRA adapters. Use: eval inference
(on any multiple of the microbatch), a single-sample forward, dropout under a seed, and HF's num_items_in_batch,
with which train_step's loss and gradients equal one forward of the whole batch (without it, the mean of each
microbatch's own token mean: gradient accumulation's). Two gloo processes for the input/output patterns.

Unless said otherwise: loss and gradients equal the unpartitioned model's run with gradient accumulation over
the same microbatches, fp32, rel err < 1e-5 (test_hf_architectures.py's check).
"""
from __future__ import annotations

import copy
import math
import tempfile

import pytest
import torch
from dist_utils import run_workers
from test_hf_architectures import BATCH, SEQ, SMALL, VOCAB, accumulated, model_loss, padding_mask, token_loss

from partitioner.api import compile_parallel
from partitioner.errors import RuntimeConfigError

transformers = pytest.importorskip("transformers")


def llama(**cfg) -> torch.nn.Module:
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{
        "num_key_value_heads": 2, "use_cache": False, **SMALL, **cfg})).train()


def gpt2(**cfg) -> torch.nn.Module:
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**{
        "n_embd": 32, "n_layer": 4, "n_head": 4, "vocab_size": VOCAB, "n_positions": 64, "resid_pdrop": 0.0,
        "embd_pdrop": 0.0, "attn_pdrop": 0.0, "use_cache": False, **cfg})).train()


def bert(**cfg) -> torch.nn.Module:
    torch.manual_seed(0)
    return transformers.BertForMaskedLM(transformers.BertConfig(**{
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, **SMALL, **cfg})).train()


def t5(**cfg) -> torch.nn.Module:
    torch.manual_seed(0)
    return transformers.T5ForConditionalGeneration(transformers.T5Config(**{
        "d_model": 32, "d_ff": 64, "num_layers": 2, "num_heads": 4, "d_kv": 8, "vocab_size": VOCAB,
        "dropout_rate": 0.0, "decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 1, "use_cache": False,
        **cfg})).train()


def tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))


def labels_with_ignored() -> torch.Tensor:
    """Labels with -100 (ignore_index) entries, unevenly over the samples: the microbatches count different
    numbers of label tokens."""
    labels = tokens(2)
    labels[0, :6], labels[1, 2:] = -100, -100
    return labels


def compiled(model, args, kwargs, target, loss_fn, chunks=1, **kw):
    return compile_parallel(copy.deepcopy(model), ["cpu"] * 2, args, loss_fn, example_kwargs=kwargs,
                            example_target=target, microbatches=2, chunks=chunks, time_limit_s=1, **kw)


def assert_equals_accumulation(model, args, kwargs, target, loss_fn, chunks=1, reference=None, **kw):
    """train_step's loss and gradients against `reference` (default: a copy of the model) run with gradient
    accumulation over the same microbatches; returns the ParallelModel."""
    reference = copy.deepcopy(model) if reference is None else reference
    want_loss = accumulated(reference, args, kwargs, target, loss_fn or model_loss, microbatches=2)
    want = dict(reference.named_parameters())
    pm = compiled(model, args, kwargs, target, loss_fn, chunks, **kw)
    loss = pm.train_step(*args, target=target, **kwargs)
    assert abs(loss.item() - want_loss) <= 1e-5 * abs(want_loss)
    got = dict(pm.named_parameters())
    assert set(got) == set(want)
    largest = max(p.grad.abs().max().item() for p in want.values() if p.grad is not None)
    for name, p in got.items():
        if want[name].grad is None:
            assert p.grad is None, name
            continue
        scale = max(want[name].grad.abs().max().item(), 1e-3 * largest)
        assert (p.grad - want[name].grad).abs().max().item() <= 1e-5 * scale, name
    return pm


# ---------------------------------------------------------------------------------------------- inputs


def _mask(dtype: torch.dtype, left: bool) -> torch.Tensor:
    return padding_mask(left=left).to(dtype)


@pytest.mark.parametrize("case", ["inputs_embeds", "mask-bool-left", "mask-float-right"])
def test_llama_inputs(case):
    """inputs_embeds instead of input_ids (with explicit, offset position_ids and a left-padded mask), and
    padding masks of each dtype HF takes, padded on either side (long ones: the other tests)."""
    model, args, kwargs = llama(), (tokens(),), {}
    if case == "inputs_embeds":
        args, kwargs = (), {"inputs_embeds": model.get_input_embeddings()(tokens()).detach(),
                            "attention_mask": padding_mask(left=True),
                            "position_ids": torch.arange(SEQ).expand(BATCH, SEQ) + 3}
    else:
        _, dtype, side = case.split("-")
        kwargs = {"attention_mask": _mask({"bool": torch.bool, "float": torch.float, "long": torch.long}[dtype],
                                          left=side == "left")}
    assert_equals_accumulation(model, args, kwargs, tokens(3), token_loss)


def test_a_tokenizers_batch_encoding():
    """A tokenizer's BatchEncoding as example_kwargs and train_step(**batch) trains as model(**batch); given as
    example_inputs (one positional argument: forward took it whole as input_ids, failing deep in the capture
    with every tensor printed) it is refused, naming example_kwargs=dict(batch)."""
    labels = labels_with_ignored()
    batch = transformers.BatchEncoding({"input_ids": tokens(), "attention_mask": padding_mask(), "labels": labels})
    model = llama()
    want_loss = accumulated(copy.deepcopy(model), (), dict(batch), labels, model_loss, microbatches=2)
    pm = compiled(model, (), batch, labels, None)
    assert abs(pm.train_step(**batch).item() - want_loss) <= 1e-5 * want_loss
    with pytest.raises(RuntimeConfigError, match=r"example_inputs is a BatchEncoding with keys \['input_ids', "
                                                 r"'attention_mask', 'labels'\].*example_kwargs=dict\(batch\)"):
        compile_parallel(llama(), ["cpu"] * 2, batch, None, microbatches=2)


def test_gpt2_token_types_positions_and_float_mask():
    """GPT-2 untied (tie_word_embeddings=False: its own lm_head) with token types, positions, a float mask."""
    model = gpt2(tie_word_embeddings=False)
    assert model.lm_head.weight is not model.transformer.wte.weight
    kwargs = {"attention_mask": padding_mask().float(), "token_type_ids": torch.randint(0, 2, (BATCH, SEQ)),
              "position_ids": torch.arange(SEQ).expand(BATCH, SEQ)}
    assert_equals_accumulation(model, (tokens(),), kwargs, tokens(3), token_loss)


def test_bert_inputs_embeds_token_types_and_labels_with_ignored_entries(recwarn):
    """BERT's config says use_cache=True too, but an encoder's output holds no cache: nothing to say."""
    model, labels = bert(), labels_with_ignored()
    assert model.config.use_cache
    kwargs = {"inputs_embeds": model.bert.embeddings.word_embeddings(tokens()).detach(),
              "attention_mask": padding_mask().bool(), "token_type_ids": torch.randint(0, 2, (BATCH, SEQ)),
              "labels": labels}
    assert_equals_accumulation(model, (), kwargs, labels, None)
    assert not [w for w in recwarn if "use_cache" in str(w.message)]


def test_labels_with_ignored_entries_and_the_models_own_loss():
    """loss_fn=None trains out.loss; labels with -100 entries (T5's: test_use_cache_left_true_...)."""
    labels = labels_with_ignored()
    assert_equals_accumulation(llama(), (tokens(),), {"attention_mask": padding_mask(), "labels": labels}, labels,
                               None)


def test_return_dict_false_gives_tuples():
    labels = tokens(3)
    model = llama()
    kwargs = {"labels": labels, "return_dict": False}
    pm = assert_equals_accumulation(model, (tokens(),), kwargs, labels, lambda out, target: out[0])
    pm.eval()
    with torch.no_grad():
        out = pm(tokens(), **kwargs)
    assert isinstance(out, tuple) and out[1].shape == (BATCH, SEQ, VOCAB)


def test_hidden_states_and_attentions_in_the_loss_and_in_inference():
    """output_hidden_states / output_attentions (eager attention): a loss reading them trains as the model's;
    pm(...) returns them for the whole batch."""
    model = llama(attn_implementation="eager")
    kwargs = {"attention_mask": padding_mask(left=True), "output_hidden_states": True, "output_attentions": True}

    def loss_fn(out, target):
        return token_loss(out, target) + out.hidden_states[2].pow(2).mean() + out.attentions[1].pow(2).mean()

    pm = assert_equals_accumulation(model, (tokens(),), kwargs, tokens(3), loss_fn)
    pm.eval()
    model.eval()
    with torch.no_grad():
        got, want = pm(tokens(), **kwargs), model(tokens(), **kwargs)
    assert len(got.hidden_states) == len(want.hidden_states) and len(got.attentions) == len(want.attentions)
    for g, w in zip([got.logits, *got.hidden_states, *got.attentions],
                    [want.logits, *want.hidden_states, *want.attentions]):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["llama", "t5"])
def test_use_cache_left_true_in_the_config_runs_without_the_cache(name):
    """from_pretrained leaves use_cache=True: the model's output held a DynamicCache (EncoderDecoderCache for
    T5, whose decoder keeps its own copy of the config) that pytree cannot flatten, so compile_parallel
    refused it. Now it runs without the cache, says so once, restores the config, and pm(...) returns
    past_key_values=None. The model's own loss over labels with -100 entries."""
    model = llama(use_cache=True) if name == "llama" else t5(use_cache=True)
    labels = labels_with_ignored()  # T5 shifts them into its decoder inputs, -100 as padding
    configs = {id(m.config): (m.config, m.config.use_cache) for m in model.modules() if hasattr(m, "config")}
    with pytest.warns(RuntimeWarning, match="config has use_cache=True .* runs it with use_cache=False"):
        pm = assert_equals_accumulation(model, (tokens(),), {"labels": labels}, labels, None)
    assert all(config.use_cache == flag for config, flag in configs.values())
    pm.eval()
    model.eval()
    with torch.no_grad():
        got, want = pm(tokens(), labels=labels), model(tokens(), labels=labels)
    assert got.past_key_values is None and want.past_key_values is not None
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-6)


def test_use_cache_passed_true_is_refused_without_a_note_on_batched_inputs():
    """use_cache=True passed by the caller is kept, and its cache refused naming the fix. The note on inputs
    cut only because their size equals the batch's left out the mask and labels, shaped as input_ids (it
    named every HF model's attention_mask and labels under any capture error)."""
    from partitioner.errors import CaptureError
    labels = tokens(3)
    with pytest.raises(CaptureError, match="DynamicCache.*pass use_cache=False or leave it out") as err:
        compiled(llama(), (tokens(),), {"attention_mask": padding_mask(), "labels": labels, "use_cache": True},
                 labels, None)
    assert "ONE microbatch" not in str(err.value)


# ----------------------------------------------------------------------------------------- preparation


@pytest.mark.parametrize("name,kwargs", [("llama", None), ("gpt2", {"use_reentrant": False})])
def test_gradient_checkpointing_enable(name, kwargs, recwarn):
    """Checkpointed layers train as the model without checkpointing (what to recompute is the plan's call;
    use_reentrant=True under frozen weights: test_frozen_parts). The hook gradient_checkpointing_enable
    puts on the input embeddings (enable_input_require_grads) is not warned about as a user's hook."""
    build = llama if name == "llama" else gpt2
    model = build()
    if kwargs is None:
        model.gradient_checkpointing_enable()
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    assert model.get_input_embeddings()._forward_hooks
    assert_equals_accumulation(model, (tokens(),), {"attention_mask": padding_mask()}, tokens(3), token_loss,
                               reference=build())
    assert not [w for w in recwarn if "forward hooks" in str(w.message)]


@pytest.mark.parametrize("case", ["llama-resized-tied", "gpt2-resized-tied"])
def test_resized_tied_embeddings(case):
    """resize_token_embeddings keeps the tie (untied: test_gpt2_token_types_positions_and_float_mask)."""
    if case == "llama-resized-tied":
        model = llama(tie_word_embeddings=True)
        model.resize_token_embeddings(VOCAB + 8, pad_to_multiple_of=16)
        assert model.lm_head.weight is model.model.embed_tokens.weight
    else:
        model = gpt2()
        model.resize_token_embeddings(VOCAB + 3)
    assert_equals_accumulation(model, (tokens(),), {}, tokens(3), token_loss, chunks=2 if case[0] == "l" else 1)


def test_from_pretrained_then_trained_weights_back_into_the_model(tmp_path):
    """save_pretrained -> from_pretrained (use_cache=True and eval mode, as it loads) -> compile_parallel
    -> a step -> pm.state_dict() into a fresh model -> save_pretrained -> from_pretrained: the reloaded
    model infers as pm does."""
    gpt2(use_cache=True).save_pretrained(tmp_path / "base")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").train()
    with pytest.warns(RuntimeWarning, match="use_cache=True"):
        pm = assert_equals_accumulation(model, (tokens(),), {}, tokens(3), token_loss)
    torch.optim.SGD(pm.parameters(), lr=0.5).step()
    for method in ("save_pretrained", "generate", "config"):  # the model's, named with how to reach them
        with pytest.raises(AttributeError, match=rf"ParallelModel has no '{method}': it is GPT2LMHeadModel's.*"
                                                 r"model.load_state_dict\(pm.full_state_dict\(\)\)"):
            getattr(pm, method)
    fresh = gpt2()
    assert not fresh.load_state_dict(pm.state_dict(), strict=True).missing_keys
    fresh.save_pretrained(tmp_path / "trained")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "trained").eval()
    pm.eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(tokens()).logits, reloaded(tokens()).logits, rtol=0, atol=0)
        assert not torch.equal(reloaded(tokens()).logits, model.eval()(tokens()).logits)  # it did train


def test_bf16_model_trains_as_the_bf16_model():
    """A model in bf16 (torch_dtype=torch.bfloat16 / .to(torch.bfloat16)) runs its stages in bf16: the
    same ops in the same order as its own gradient accumulation (bf16 rel err < 1e-2 stated; equal here)."""
    model = llama().to(torch.bfloat16)
    reference = copy.deepcopy(model)
    kwargs = {"attention_mask": padding_mask()}
    want_loss = accumulated(reference, (tokens(),), kwargs, tokens(3), token_loss, microbatches=2)
    pm = compiled(model, (tokens(),), kwargs, tokens(3), token_loss)
    assert next(pm.parameters()).dtype == torch.bfloat16
    assert abs(pm.train_step(tokens(), target=tokens(3), **kwargs).item() - want_loss) <= 1e-2 * abs(want_loss)
    want = dict(reference.named_parameters())
    for name, p in pm.named_parameters():
        err = (p.grad.float() - want[name].grad.float()).norm() / want[name].grad.float().norm()
        assert err < 1e-2, name


def test_mixed_precision_bf16_against_autocast():
    """mixed_precision="bf16": fp32 weights and gradients, bf16 compute. Compared with the model under
    torch.autocast("cpu", bf16) (which keeps some ops, e.g. the softmax inside SDPA's math path, in fp32): loss
    within 1e-3 and each gradient within 5e-2 relative norm (bf16 rounds at 3 decimal digits)."""
    model, labels = llama(), tokens(3)
    reference = copy.deepcopy(model)
    with torch.autocast("cpu", torch.bfloat16):
        want_loss = accumulated(reference, (tokens(),), {"labels": labels}, labels, model_loss, microbatches=2)
    pm = compiled(model, (tokens(),), {"labels": labels}, labels, None, mixed_precision="bf16")
    loss = pm.train_step(tokens(), labels=labels)
    assert abs(loss.item() - want_loss) <= 1e-3 * abs(want_loss)
    want = dict(reference.named_parameters())
    for name, p in pm.named_parameters():
        assert p.dtype == p.grad.dtype == torch.float32
        assert (p.grad - want[name].grad).norm() / want[name].grad.norm() < 5e-2, name


class LoRALinear(torch.nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update, as users write LoRA by hand without peft."""

    def __init__(self, base: torch.nn.Linear, rank: int = 4, alpha: float = 8.0):
        super().__init__()
        self.base, self.scale = base, alpha / rank
        self.lora_a = torch.nn.Linear(base.in_features, rank, bias=False)
        self.lora_b = torch.nn.Linear(rank, base.out_features, bias=False)
        torch.nn.init.normal_(self.lora_b.weight, std=0.02)  # (zeros in LoRA; random here so gradients differ)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_b(self.lora_a(x)) * self.scale


def _frozen(case: str) -> torch.nn.Module:
    model = gpt2() if case == "gpt2-tied-head" else llama()
    if case in ("all-but-head", "gpt2-tied-head"):
        model.requires_grad_(False)
        model.lm_head.requires_grad_(True)
    else:
        model.requires_grad_(False)
        for layer in model.model.layers:
            layer.self_attn.q_proj = LoRALinear(layer.self_attn.q_proj)
            layer.self_attn.v_proj = LoRALinear(layer.self_attn.v_proj)
    return model


@pytest.mark.parametrize("case", ["all-but-head", "gpt2-tied-head", "lora-checkpointed"])
def test_frozen_parts(case):
    """Frozen parameters (embeddings among them) keep .grad None; GPT-2's head is its (tied) embedding,
    trainable through lm_head.
    LoRA adapters on a frozen model with reentrant gradient checkpointing (the adapter recipe) train as
    without checkpointing."""
    model = _frozen(case)
    if case == "lora-checkpointed":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    pm = assert_equals_accumulation(model, (tokens(),), {"attention_mask": padding_mask()}, tokens(3), token_loss,
                                    reference=_frozen(case))
    trained = {n for n, p in pm.named_parameters() if p.grad is not None}
    assert trained == {n for n, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------------------------------- use


def test_eval_inference_on_other_batch_sizes():
    """pm.eval() + no_grad: the model's logits and hidden states for the training batch, and for any batch that
    is a multiple of the microbatch (2 here), run as that many microbatches (it was refused: "the stages were
    captured for that shape"); another batch or sequence length is refused naming the sizes or the fix."""
    model = llama()
    batch, mask = torch.cat([tokens(), tokens(4)]), torch.cat([padding_mask(), padding_mask(left=True)])
    kwargs = {"attention_mask": mask[:BATCH], "output_hidden_states": True}
    pm = compiled(model, (tokens(),), kwargs, tokens(3), token_loss, chunks=2)
    pm.train_step(tokens(), target=tokens(3), **kwargs)
    pm.eval()
    model.eval()
    with torch.no_grad():
        for n in (BATCH, 2, 8, 6):
            got = pm(batch[:n], attention_mask=mask[:n], output_hidden_states=True)
            want = model(batch[:n], attention_mask=mask[:n], output_hidden_states=True)
            for g, w in zip([got.logits, *got.hidden_states], [want.logits, *want.hidden_states]):
                torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
        with pytest.raises(RuntimeConfigError, match=r"batch of 3; it infers on batches of a multiple of 2 samples "
                                                     r".*e.g. 2 or 4"):
            pm(batch[:3], attention_mask=mask[:3], output_hidden_states=True)
        with pytest.raises(RuntimeConfigError, match=r"input 1 is \(4, 8\) .* in a batch of 8 .* it is \(8, 8\)"):
            pm(batch, attention_mask=mask[:4], output_hidden_states=True)
        with pytest.raises(RuntimeConfigError, match="dim 1 is 5, not 8: pad every batch to 8"):
            pm(batch[:4, :5], attention_mask=mask[:4, :5], output_hidden_states=True)
    pm.train()
    with pytest.raises(RuntimeConfigError, match=r"input 0 is \(8, 8\) .*a batch of 8: call compile_parallel"):
        pm.train_step(batch, target=torch.cat([tokens(3)] * 2), attention_mask=mask, output_hidden_states=True)


def test_generation_like_single_forward():
    """One sample, microbatches=1: the next token's logits as the model gives them."""
    model, prompt = llama(), tokens()[:1]
    pm = compile_parallel(copy.deepcopy(model), ["cpu"] * 2, (prompt,), token_loss, microbatches=1, time_limit_s=1)
    pm.eval()
    model.eval()
    with torch.no_grad():
        got, want = pm(prompt).logits[:, -1], model(prompt).logits[:, -1]
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert got.argmax(-1) == want.argmax(-1)


def test_dropout_draws_follow_the_seed():
    """With dropout > 0 the stages draw their own masks, in the schedule's order: train_step repeats under the
    same torch.manual_seed and differs under another, but is not the model's own draws (equal in
    distribution, not in value); eval mode (dropout off) equals the model."""
    model, target = gpt2(resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1), tokens(3)
    pm = compiled(model, (tokens(),), {}, target, token_loss)
    losses = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        losses.append(pm.train_step(tokens(), target=target).item())
        pm.zero_grad()
    assert losses[0] == losses[1] != losses[2]
    pm.eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(tokens()).logits, model(tokens()).logits, rtol=0, atol=0)


def _whole_batch(model, labels, **kwargs):
    """Loss and gradients of one forward of the whole batch, as a user without pipelining gets them."""
    reference = copy.deepcopy(model)
    loss = reference(tokens(), labels=labels, **kwargs).loss
    loss.backward()
    return loss.item(), dict(reference.named_parameters())


def test_num_items_in_batch_gives_the_whole_batchs_token_mean():
    """HF's loss is each microbatch's mean over its own label tokens, so with -100 entries spread unevenly
    the mean over microbatches (gradient accumulation's, pm's default) is not the whole batch's token mean:
    here the first microbatch has no label token at all, so its mean is NaN (0 / 0), and so is the step's,
    where one forward of the batch is finite. Given num_items_in_batch (the batch's count of label tokens,
    as HF's Trainer passes it), each microbatch's loss is its share of that mean and train_step sums them:
    loss and gradients equal one forward of the whole batch (Llama's: test_call_patterns_on_two_processes)."""
    model, labels = gpt2(), labels_with_ignored()
    labels[:BATCH // 2] = -100
    want_loss, want = _whole_batch(model, labels)
    pm = compiled(model, (tokens(),), {"labels": labels}, labels, None)
    assert math.isnan(pm.train_step(tokens(), labels=labels).item())

    count = (labels[:, 1:] != -100).sum()  # the causal shift drops each sample's first label
    kwargs = {"labels": labels, "num_items_in_batch": count}
    pm = compiled(model, (tokens(),), kwargs, labels, None, chunks=2)
    assert abs(pm.train_step(tokens(), **kwargs).item() - want_loss) <= 1e-5 * want_loss
    for n, p in pm.named_parameters():
        assert (p.grad - want[n].grad).abs().max() <= 1e-5 * want[n].grad.abs().max(), n


def test_num_items_in_batch_refused_where_it_cannot_act():
    """A Python int would be a constant of the graph (the next batch's count refused); a model whose loss
    does not read it (T5's, BERT's in this transformers) keeps its per-microbatch mean, which summing would
    multiply by the microbatch count."""
    labels = labels_with_ignored()
    count = int((labels != -100).sum())
    with pytest.raises(RuntimeConfigError, match="num_items_in_batch is int; .*torch.tensor"):
        compiled(llama(), (tokens(),), {"labels": labels, "num_items_in_batch": count}, labels, None)
    with pytest.raises(RuntimeConfigError, match="T5ForConditionalGeneration is given num_items_in_batch but does "
                                                 "not read it.*drop num_items_in_batch"):
        compiled(t5(), (tokens(),), {"labels": labels, "num_items_in_batch": torch.tensor(count)}, labels, None)


# ------------------------------------------------------------------------------------- two processes


def _grad_error(pm, want: dict) -> float:
    """The largest relative error of this rank's gradients (inf where one is missing or extra)."""
    errors = [0.0]
    for n, p in pm.named_parameters():
        if want[n].grad is None or p.grad is None:
            errors.append(0.0 if want[n].grad is None and p.grad is None else float("inf"))
        else:
            errors.append(((p.grad - want[n].grad).abs().max() / want[n].grad.abs().max()).item())
    return max(errors)


def _two_ranks(rank: int, world: int, _arg) -> dict:
    """Each pattern on 2 gloo ranks: this rank's largest gradient error (and the loss), and the output on
    the last rank."""
    torch.manual_seed(0)
    results = {}
    labels, mask = labels_with_ignored(), padding_mask(left=True)
    # use_cache=True in the config, the model's own loss over labels with -100, num_items_in_batch
    model = llama(use_cache=True)
    kwargs = {"attention_mask": mask, "labels": labels, "num_items_in_batch": (labels[:, 1:] != -100).sum()}
    want_loss, want = _whole_batch(model, labels, attention_mask=mask)
    pm = compiled(model, (tokens(),), kwargs, labels, None)
    loss = pm.train_step(tokens(), **kwargs).item()
    results["labels"] = (abs(loss - want_loss) / want_loss, _grad_error(pm, want))
    # a step, then the trained weights into an HF model on rank 0 (save_pretrained / from_pretrained), which
    # infers as pm does on the last rank
    torch.optim.SGD(pm.parameters(), lr=0.5).step()
    full = pm.full_state_dict()
    if rank == 0:
        with tempfile.TemporaryDirectory() as tmp:
            fresh = llama()
            fresh.load_state_dict(full)
            fresh.save_pretrained(tmp)
            reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp).eval()
        with torch.no_grad():
            results["reloaded"] = reloaded(tokens(), attention_mask=mask).logits
    pm.eval()
    with torch.no_grad():
        out = pm(tokens(), **kwargs)
    results["trained"] = None if out is None else out.logits
    # inputs_embeds with a bool mask; then eval inference of the hidden states on the last rank
    model = llama()
    kwargs = {"inputs_embeds": model.get_input_embeddings()(tokens()).detach(), "attention_mask": mask.bool(),
              "output_hidden_states": True}
    reference = copy.deepcopy(model)
    want_loss = accumulated(reference, (), kwargs, tokens(3), token_loss, microbatches=2)
    want = dict(reference.named_parameters())
    pm = compiled(model, (), kwargs, tokens(3), token_loss)
    loss = pm.train_step(target=tokens(3), **kwargs).item()
    results["embeds"] = (abs(loss - want_loss) / want_loss, _grad_error(pm, want))
    pm.eval()
    model.eval()
    for n in (BATCH, 2, 8):  # the training batch, and others: a multiple of the microbatch of 2
        call = {**kwargs, "inputs_embeds": torch.cat([kwargs["inputs_embeds"]] * 2)[:n],
                "attention_mask": torch.cat([mask.bool(), padding_mask().bool()])[:n]}
        with torch.no_grad():
            out, expected = pm(**call), model(**call)
        results[f"output {n}"] = None if out is None else max(
            (g - w).abs().max().item() for g, w in zip([out.logits, *out.hidden_states],
                                                       [expected.logits, *expected.hidden_states]))
    # attention dropout in training, seen in the attention weights pm(...) returns: which entries each layer
    # dropped, per microbatch; and a draw of the script's after the step
    model = llama(attn_implementation="eager", attention_dropout=0.5)
    pm = compiled(model, (tokens(),), {"output_attentions": True}, tokens(3), token_loss)
    torch.manual_seed(1)
    out = pm(tokens(), output_attentions=True)
    results["after"] = torch.rand(()).item()
    if out is not None:
        results["dropped"] = [(a[i:i + 2] == 0) for a in out.attentions for i in (0, 2)]
    return results


def test_call_patterns_on_two_processes():
    """The model's own loss with num_items_in_batch and use_cache=True in its config, then its trained weights
    through pm.full_state_dict() into an HF model saved and reloaded on rank 0; inputs_embeds with a
    bool mask and eval inference of the hidden states (batches of 4, 2 and 8), and attention dropout, on 2
    gloo ranks."""
    results = run_workers(_two_ranks, 2, timeout_s=240)
    for rank, got in enumerate(results):
        for pattern in ("labels", "embeds"):
            loss_err, grad_err = got[pattern]
            assert loss_err < 1e-5 and grad_err < 1e-5, (rank, pattern, got)
    torch.testing.assert_close(results[1]["trained"], results[0]["reloaded"], rtol=1e-5, atol=1e-6)
    for n in (BATCH, 2, 8):
        assert results[0][f"output {n}"] is None and results[1][f"output {n}"] < 1e-5, (n, results)
    # ranks seeded alike drew the same dropout masks for their stages' layers (rank 1's first layer dropped
    # what rank 0's first dropped, microbatch by microbatch); now each rank draws its own, while the script's
    # generator stays in step on both ranks
    dropped = results[1]["dropped"]
    assert not any(torch.equal(a, b) for i, a in enumerate(dropped) for b in dropped[i + 1:])
    assert results[0]["after"] == results[1]["after"]
