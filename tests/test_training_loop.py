"""An ordinary PyTorch training script's calls on a ParallelModel (partitioner/parallel_model.py).

Each pattern either matches the same script on the unpartitioned model (loss, gradients and
parameters within 1e-5) or is refused with a message naming the fix: loss.backward() after
train_step, GradScaler, pm.to / pm.cuda / pm.half, nn.Module methods it lacks, freezing the model
given to compile_parallel instead of pm's copies, a loss_fn returning a dict or tuple.
"""
from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from dist_utils import build, max_rel_err

from partitioner.api import compile_parallel
from partitioner.errors import RuntimeConfigError


def compiled(zm, chunks=1, devices=None, **kw):
    return compile_parallel(copy.deepcopy(zm.model), devices or ["cpu"] * 2, zm.example_args, zm.loss_fn,
                            example_kwargs=zm.example_kwargs, microbatches=2, chunks=chunks, time_limit_s=1, **kw)


def grads_match(pm, model) -> None:
    want = dict(model.named_parameters())
    for name, p in pm.named_parameters():
        assert (p.grad is None) == (want[name].grad is None), name
        if p.grad is not None:
            assert max_rel_err(p.grad, want[name].grad) < 1e-5, name


@pytest.mark.parametrize("chunks", [1, 2])
def test_gradients_accumulate_over_train_steps_without_zero_grad(chunks):
    """Two train_steps without zero_grad add up as two loss.backward() calls do; a schedule steps alike."""
    zm = build("mlp")
    pm, model = compiled(zm, chunks=chunks), copy.deepcopy(zm.model)
    for _ in range(2):
        zm.loss_fn(model(*zm.example_args), zm.target).backward()
        pm.train_step(*zm.example_args, target=zm.target)
    grads_match(pm, model)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (model, pm)]
    scheds = [torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=4) for o in opts]
    for o, s in zip(opts, scheds):
        o.step(), s.step()
    assert opts[0].param_groups[0]["lr"] == opts[1].param_groups[0]["lr"]
    want = dict(model.named_parameters())
    assert max(max_rel_err(p, want[n].detach()) for n, p in pm.named_parameters()) < 1e-5


def test_freezing_a_tied_weight_held_on_two_devices_leaves_its_gradient_none():
    """GPT-2's tied embedding has a copy on each device; freezing the exposed one through
    pm.named_parameters() left the other trainable, whose gradient was summed into the frozen one."""
    zm = build("gpt2")
    pm, model = compiled(zm, devices=["cpu:0", "cpu:1"]), copy.deepcopy(zm.model)
    assert len(pm.store.replicas["transformer.wte.weight"]) == 2
    dict(pm.named_parameters())["transformer.wte.weight"].requires_grad_(False)
    model.transformer.wte.weight.requires_grad_(False)
    zm.loss_fn(model(*zm.example_args), zm.target).backward()
    pm.train_step(*zm.example_args, target=zm.target)
    grads_match(pm, model)
    pm.zero_grad(), model.zero_grad()
    pm.requires_grad_(True), model.requires_grad_(True)  # unfrozen: trains again
    zm.loss_fn(model(*zm.example_args), zm.target).backward()
    pm.train_step(*zm.example_args, target=zm.target)
    grads_match(pm, model)


def test_freezing_the_compiled_model_after_compile_parallel_warns_naming_pms_copies():
    zm = build("mlp")
    model = copy.deepcopy(zm.model)
    pm = compile_parallel(model, ["cpu"] * 2, zm.example_args, zm.loss_fn, microbatches=2)
    pm.train_step(*zm.example_args, target=zm.target)
    model.layers[0].requires_grad_(False)
    with pytest.warns(RuntimeWarning, match=r"'layers.0.weight' of the model given to compile_parallel was set to "
                                            r"requires_grad=False .*pm.named_parameters\(\)"):
        pm.train_step(*zm.example_args, target=zm.target)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            p.requires_grad_(not name.startswith("layers.0."))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pm.train_step(*zm.example_args, target=zm.target)  # said once; pm's copies now match


def test_loss_backward_after_train_step_says_train_step_ran_it():
    """A script's habitual loss.backward() (and GradScaler's scaler.scale(loss).backward()) failed with
    autograd's 'element 0 of tensors does not require grad'."""
    zm = build("mlp")
    pm = compiled(zm)
    loss = pm.train_step(*zm.example_args, target=zm.target)
    assert loss.dim() == 0 and loss.dtype == torch.float32 and f"{loss:.3f}" == f"{loss.item():.3f}"
    with pytest.raises(RuntimeConfigError, match=r"train_step already ran the forward and backward .* drop "
                                                 r"loss.backward\(\)"):
        loss.backward()
    scaler = torch.amp.GradScaler("cpu")
    with pytest.raises(RuntimeConfigError, match=r"GradScaler, instead of scaler.scale\(loss\).backward\(\) pass it "
                                                 r"to train_step: .*scaler=scaler\)"):
        scaler.scale(pm.train_step(*zm.example_args, target=zm.target)).backward()


@pytest.mark.parametrize("init_scale", [2.0 ** 10, 2.0 ** 127], ids=["finite", "overflows"])
def test_a_grad_scaler_passed_to_train_step_scales_as_on_the_model(init_scale):
    """scaler.scale(loss).backward() on the model; train_step(..., scaler=) on pm: the same scaled
    gradients, the same step (or the same skipped step where they overflow) and the same next scale."""
    zm = build("gpt2")
    pm, model = compiled(zm, chunks=2), copy.deepcopy(zm.model)
    scalers = [torch.amp.GradScaler("cpu", init_scale=init_scale) for _ in range(2)]
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (model, pm)]
    want = zm.loss_fn(model(*zm.example_args), zm.target)
    scalers[0].scale(want).backward()
    loss = pm.train_step(*zm.example_args, target=zm.target, scaler=scalers[1])
    assert max_rel_err(loss, want.detach()) < 1e-5  # unscaled
    if init_scale < 2.0 ** 100:
        grads_match(pm, model)
    for scaler, opt in zip(scalers, opts):
        scaler.step(opt)
        scaler.update()
    assert scalers[0].get_scale() == scalers[1].get_scale()
    assert (scalers[1].get_scale() < init_scale) == (init_scale > 2.0 ** 100)  # the overflow skipped the step
    ref = dict(model.named_parameters())
    assert max(max_rel_err(p, ref[n].detach()) for n, p in pm.named_parameters()) < 1e-5


def test_to_on_the_stages_device_is_a_no_op_moving_or_casting_is_refused():
    zm = build("mlp")
    pm = compiled(zm)
    assert pm.to("cpu") is pm and pm.cpu() is pm and pm.float() is pm and pm.to(torch.device("cpu")) is pm
    with pytest.raises(RuntimeConfigError, match=r"pm.to\('cuda'\): the stages are on \['cpu'\].*compile_parallel, "
                                                 r"e.g. devices=\['cuda:0', 'cuda:1'\]"):
        pm.cuda()
    with pytest.raises(RuntimeConfigError, match=r"pm.to\(torch.float16\): the stages' weights are \['torch.float32'\]"
                                                 r".*mixed_precision='bf16'"):
        pm.half()
    with pytest.raises(AttributeError, match=r"ParallelModel has no nn.Module.named_modules.*It offers train_step"):
        pm.named_modules()
    assert not hasattr(pm, "apply") and not hasattr(pm, "no_such_thing")
    assert [t.shape for t in pm.buffers()] == [t.shape for _, t in pm.named_buffers()]


def test_loss_fn_none_trains_the_loss_the_model_computes():
    zm = build("gpt2")
    model = copy.deepcopy(zm.model)
    pm = compile_parallel(copy.deepcopy(zm.model), ["cpu"] * 2, zm.example_args, None, microbatches=2,
                          example_kwargs={"labels": zm.target}, time_limit_s=1)
    want = model(*zm.example_args, labels=zm.target).loss
    want.backward()
    assert max_rel_err(pm.train_step(*zm.example_args, labels=zm.target), want.detach()) < 1e-5
    grads_match(pm, model)
    with pytest.raises(RuntimeConfigError, match=r"loss_fn=None\) trains the loss the model computes itself .* "
                                                 r"CausalLMOutputWithCrossAttentions with keys \['logits'\], has none"):
        compile_parallel(copy.deepcopy(zm.model), ["cpu"] * 2, zm.example_args, None, microbatches=2, time_limit_s=1)


@pytest.mark.parametrize("loss_fn,fix", [
    (lambda out, t: {"loss": F.cross_entropy(out, t), "acc": (out.argmax(-1) == t).float().mean()},
     r"a dict with keys \['loss', 'acc'\].*return its 'loss' entry"),
    (lambda out, t: (F.cross_entropy(out, t), out.square().mean()), r"a tuple of 2.*fn\(out, t\)\[0\]")])
def test_a_loss_fn_returning_a_dict_or_tuple_names_the_entry_to_return(loss_fn, fix):
    zm = build("mlp")
    pm = compile_parallel(copy.deepcopy(zm.model), ["cpu"] * 2, zm.example_args, loss_fn, microbatches=2)
    with pytest.raises(RuntimeConfigError, match=fix):
        pm.train_step(*zm.example_args, target=zm.target)


def test_a_summing_partial_loss_is_refused_naming_mean():
    zm = build("mlp")
    with pytest.raises(RuntimeConfigError, match=r"loss_fn cross_entropy\(reduction='sum'\).*reduction='mean'"):
        compile_parallel(copy.deepcopy(zm.model), ["cpu"] * 2, zm.example_args,
                         functools.partial(F.cross_entropy, reduction="sum"), microbatches=2)


def test_an_optimizer_state_saved_from_the_model_loads_onto_the_same_parameters():
    """optimizer.load_state_dict maps state to parameters by position: pm.parameters() came in stage
    order (T5's layer norms before their block's dense weights), so an unpartitioned run's optimizer
    state resumed onto other parameters: a shape error, or silently where the shapes agree."""
    import io
    zm = build("t5-base")
    pm, model = compiled(zm), copy.deepcopy(zm.model)
    assert [n for n, _ in pm.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert list(pm.state_dict()) == list(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    zm.loss_fn(model(*zm.example_args, **zm.example_kwargs), zm.target).backward()
    opt.step(), opt.zero_grad()
    saved = io.BytesIO()
    torch.save(opt.state_dict(), saved)
    saved.seek(0)
    pm.load_state_dict(model.state_dict())
    pm_opt = torch.optim.SGD(pm.parameters(), lr=0.1, momentum=0.9)
    pm_opt.load_state_dict(torch.load(saved))
    zm.loss_fn(model(*zm.example_args, **zm.example_kwargs), zm.target).backward()
    opt.step()
    pm.train_step(*zm.example_args, target=zm.target, **zm.example_kwargs)
    pm_opt.step()
    want = dict(model.named_parameters())
    assert max(max_rel_err(p, want[n].detach()) for n, p in pm.named_parameters()) < 1e-5


def test_inputs_by_keyword_or_in_another_keyword_order_run_as_the_example_layout():
    """A module takes model(x) and model(input_ids=x) alike, keywords in any order; the stages were
    refused such a call ('structured differently' for a mere keyword order)."""
    zm = build("t5-base")
    pm, model = compiled(zm), copy.deepcopy(zm.model)
    x, d = zm.example_args[0], zm.example_kwargs["decoder_input_ids"]
    want = zm.loss_fn(model(input_ids=x, decoder_input_ids=d), zm.target)
    assert max_rel_err(pm.train_step(decoder_input_ids=d, input_ids=x, target=zm.target), want.detach()) < 1e-5
    with torch.no_grad():
        assert max_rel_err(pm(decoder_input_ids=d, input_ids=x).logits, model(x, decoder_input_ids=d).logits) < 1e-5
    with pytest.raises(RuntimeConfigError, match="inputs lack keyword argument 'decoder_input_ids'"):
        pm(input_ids=x)


def test_state_dict_is_detached_and_load_state_dict_returns_the_keys_as_modules_do():
    """A script writing into state_dict() entries (an EMA copy back) hit 'a leaf Variable that requires
    grad is being used in an in-place operation'; `missing, unexpected = load_state_dict(strict=False)`
    unpacked None."""
    zm = build("mlp")
    pm = compiled(zm)
    state = pm.state_dict()
    assert not any(t.requires_grad for t in state.values())
    state["head.bias"].zero_()  # shares memory, as Module.state_dict()'s entries
    assert not dict(pm.named_parameters())["head.bias"].any()
    assert all(isinstance(t, nn.Parameter) for k, t in pm.state_dict(keep_vars=True).items() if "bias" in k)
    partial = {k: v for k, v in zm.model.state_dict().items() if k != "head.bias"}
    missing, unexpected = pm.load_state_dict({**partial, "extra": torch.ones(1)}, strict=False)
    assert (missing, unexpected) == (["head.bias"], ["extra"])


def test_a_batch_of_another_shape_names_how_to_shape_it():
    """The stages are captured for the example's shapes: a smaller last batch, a bigger batch, another
    sequence length and another dtype each get their fix."""
    zm = build("gpt2")
    pm = compiled(zm)
    x, = zm.example_args
    for batch, fix in ((x[:2], r"drop_last=True"), (torch.cat([x, x]), r"a batch of 8: call compile_parallel with "
                                                                       r"example inputs of that batch"),
                       (x[:, :4], r"dim 1 is 4, not 8: pad every batch to 8"),
                       (torch.cat([x, x], 1), r"dim 1 is 16, not 8: truncate it to 8"),
                       (x.int(), r"convert it: x.to\(torch.int64\)")):
        with pytest.raises(RuntimeConfigError, match=fix):
            pm.train_step(batch, target=zm.target)


def test_the_target_passed_by_position_names_target_keyword():
    zm = build("mlp")
    pm = compiled(zm)
    with pytest.raises(RuntimeConfigError, match=r"2 positional arguments .* and no target=: pass the target by "
                                                 r"keyword, pm.train_step\(\*inputs, target=y\)"):
        pm.train_step(*zm.example_args, zm.target)


def test_switching_the_compiled_models_mode_warns_naming_pms():
    """model.eval() before validating with pm(...): pm kept running in train mode (dropout on), silently."""
    zm = build("mlp")
    model = copy.deepcopy(zm.model)
    pm = compile_parallel(model, ["cpu"] * 2, zm.example_args, zm.loss_fn, microbatches=2)
    model.eval()
    with torch.no_grad(), pytest.warns(RuntimeWarning, match=r"MLP.eval\(\) was called on the model given to "
                                                             r"compile_parallel.*train mode: it switches with pm.eval"):
        pm(*zm.example_args)
    pm.eval()
    import warnings
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        pm(*zm.example_args)  # pm in the model's mode: nothing to say
