"""Named, randomly initialised models with example inputs and a loss.

Nothing is downloaded: every model is built from a config. Full-size models are
built on the meta device (no memory), `small=True` gives a tiny config of the
same class on the CPU for tests. Dropout is 0 everywhere, so train mode and eval
mode compute the same numbers and a pipelined run can be compared exactly with
the unpartitioned model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import nn

from partitioner.errors import PartitionerError


@dataclass
class ZooModel:
    """A model ready to capture: call model(*example_args, **example_kwargs);
    loss_fn(output, target) -> scalar loss (mean over the batch)."""

    name: str
    model: torch.nn.Module
    example_args: tuple
    example_kwargs: dict = field(default_factory=dict)
    target: Any = None
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None


# --------------------------------------------------------------------------- losses
# Module-level functions, so a loss can be pickled to other processes.

def lm_loss(output: Any, target: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy of `output.logits` (or a logits tensor) against token ids."""
    logits = output if isinstance(output, torch.Tensor) else output["logits"]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1))


def classification_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of class logits (B, C) against class ids (B,)."""
    return F.cross_entropy(output.float(), target)


# --------------------------------------------------------------------------- plain torch models

class MLP(nn.Module):
    """A chain of Linear + GELU layers and a classifier head."""

    def __init__(self, in_dim: int, hidden: int, depth: int, n_classes: int):
        super().__init__()
        dims = [in_dim] + [hidden] * depth
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.head = nn.Linear(hidden, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, in_dim) -> (B, n_classes)
        for layer in self.layers:
            x = F.gelu(layer(x))
        return self.head(x)


class ResidualBlock(nn.Module):
    """ResNet basic block; GroupNorm instead of BatchNorm so microbatching keeps the numbers."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, groups: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.norm1 = nn.GroupNorm(min(groups, c_out), c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.norm2 = nn.GroupNorm(min(groups, c_out), c_out)
        self.skip = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.skip = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                      nn.GroupNorm(min(groups, c_out), c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        return F.relu(y + self.skip(x))


class ResNet(nn.Module):
    """ResNet-style CNN: stem, stages of residual blocks (skip connections), pooled classifier."""

    def __init__(self, widths: tuple[int, ...], blocks_per_stage: int, n_classes: int, in_channels: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False),
                                  nn.GroupNorm(min(8, widths[0]), widths[0]), nn.ReLU())
        blocks, c = [], widths[0]
        for i, w in enumerate(widths):
            for j in range(blocks_per_stage):
                blocks.append(ResidualBlock(c, w, stride=2 if (i > 0 and j == 0) else 1))
                c = w
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(c, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, n_classes)
        x = self.blocks(self.stem(x))
        return self.head(x.mean(dim=(2, 3)))


# --------------------------------------------------------------------------- configs

@dataclass(frozen=True)
class _Spec:
    """How to build one zoo entry: family, full config, small config, default sequence length."""

    family: str  # "mlp" | "cnn" | "gpt2" | "llama" | "bert" | "t5"
    full: dict
    small: dict
    seq: int = 0
    description: str = ""


_GPT2_SMALL = dict(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64)
_LLAMA_SMALL = dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=100, max_position_embeddings=64)

_SPECS: dict[str, _Spec] = {
    "mlp": _Spec("mlp", dict(in_dim=1024, hidden=4096, depth=16, n_classes=1000),
                 dict(in_dim=16, hidden=32, depth=4, n_classes=8), description="Linear+GELU chain"),
    "cnn": _Spec("cnn", dict(widths=(64, 128, 256, 512), blocks_per_stage=2, n_classes=1000, image=224),
                 dict(widths=(8, 16), blocks_per_stage=1, n_classes=8, image=16),
                 description="ResNet-18-style, residual skips"),
    "gpt2": _Spec("gpt2", dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257), _GPT2_SMALL, 1024, "GPT-2 124M"),
    "gpt2-medium": _Spec("gpt2", dict(n_layer=24, n_embd=1024, n_head=16, vocab_size=50257), _GPT2_SMALL, 1024, "GPT-2 355M"),
    "gpt2-large": _Spec("gpt2", dict(n_layer=36, n_embd=1280, n_head=20, vocab_size=50257), _GPT2_SMALL, 1024, "GPT-2 774M"),
    "gpt2-xl": _Spec("gpt2", dict(n_layer=48, n_embd=1600, n_head=25, vocab_size=50257), _GPT2_SMALL, 1024, "GPT-2 1.5B"),
    "llama-1b": _Spec("llama", dict(num_hidden_layers=16, hidden_size=2048, intermediate_size=8192,
                                    num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                    tie_word_embeddings=True),
                      dict(_LLAMA_SMALL, tie_word_embeddings=True), 2048, "Llama-3.2-1B shapes"),
    "llama-8b": _Spec("llama", dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=14336,
                                    num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
                      _LLAMA_SMALL, 2048, "Llama-3.1-8B shapes"),
    "llama-70b": _Spec("llama", dict(num_hidden_layers=80, hidden_size=8192, intermediate_size=28672,
                                     num_attention_heads=64, num_key_value_heads=8, vocab_size=128256),
                       _LLAMA_SMALL, 2048, "Llama-3.1-70B shapes"),
    "bert-base": _Spec("bert", dict(num_hidden_layers=12, hidden_size=768, intermediate_size=3072,
                                    num_attention_heads=12, vocab_size=30522, max_position_embeddings=512),
                       dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                            vocab_size=100, max_position_embeddings=64), 512, "BERT-base, masked LM"),
    "t5-base": _Spec("t5", dict(num_layers=12, num_decoder_layers=12, d_model=768, d_ff=3072, d_kv=64,
                                num_heads=12, vocab_size=32128),
                     dict(num_layers=2, num_decoder_layers=2, d_model=32, d_ff=64, d_kv=8, num_heads=4,
                          vocab_size=100), 512, "T5-base, encoder-decoder"),
}


def model_names() -> list[str]:
    """Names accepted by build(), in a stable order."""
    return list(_SPECS)


def _transformers():
    try:  # lazy: transformers is optional (the hf extra) and slow to import
        import transformers
    except ImportError as e:  # the `hf` extra is optional
        raise PartitionerError("the Hugging Face models of the zoo need transformers: "
                               "pip install 'partitioner[hf]' (or pip install transformers)") from e
    transformers.logging.set_verbosity_error()  # random init of a config chats about unused ids
    return transformers


def _hf_model(family: str, cfg: dict) -> nn.Module:
    tf = _transformers()
    common = dict(use_cache=False)
    if family == "gpt2":
        config = tf.GPT2Config(**cfg, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                               bos_token_id=0, eos_token_id=0, **common)
        return tf.GPT2LMHeadModel(config)
    if family == "llama":
        config = tf.LlamaConfig(**cfg, attention_dropout=0.0, rope_theta=500000.0,
                                bos_token_id=0, eos_token_id=0, **common)
        return tf.LlamaForCausalLM(config)
    if family == "bert":
        config = tf.BertConfig(**cfg, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                               pad_token_id=0, **common)
        return tf.BertForMaskedLM(config)
    if family == "t5":
        config = tf.T5Config(**cfg, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0,
                             eos_token_id=1, tie_word_embeddings=True, **common)
        return tf.T5ForConditionalGeneration(config)
    raise AssertionError(family)


def _build_module(spec: _Spec, cfg: dict) -> nn.Module:
    if spec.family == "mlp":
        return MLP(**cfg)
    if spec.family == "cnn":
        return ResNet(cfg["widths"], cfg["blocks_per_stage"], cfg["n_classes"])
    return _hf_model(spec.family, cfg)


DEFAULT_BATCH = 8  # global batch of the example inputs unless asked otherwise

_POSITIONS = {"gpt2": ("n_positions", 1024), "llama": ("max_position_embeddings", 8192),
              "bert": ("max_position_embeddings", 512)}


def context_note(name: str, seq: int | None) -> str | None:
    """A note when `seq` exceeds the context of full-size zoo model `name`: build() then enlarges its
    position table (learned positions: more parameters; rotary: positions it was not configured for)."""
    spec = _SPECS.get(name)
    if seq is None or spec is None or spec.family not in _POSITIONS:
        return None
    key, default = _POSITIONS[spec.family]
    context = spec.full.get(key, default)
    if seq <= context:
        return None
    return (f"{name} has a context of {context} positions; --seq {seq} enlarges its position table "
            f"({key}) to {seq}, so this is not the stock {spec.description or name}")


def build(name: str, *, batch: int = DEFAULT_BATCH, seq: int | None = None, device: str | torch.device | None = None,
          dtype: torch.dtype = torch.float32, small: bool = False, seed: int = 0) -> ZooModel:
    """Build zoo model `name`; device None = meta for large models, cpu for small ones.

    seq: sequence length of language models (default: the model's context, or 16 when small).
    Token-id inputs and targets are int64; image/feature inputs have `dtype`.
    """
    if name not in _SPECS:
        raise PartitionerError(f"unknown zoo model '{name}'; known: {', '.join(model_names())} "
                               "(see `partitioner models`)")
    if batch < 1 or (seq is not None and seq < 1):
        raise PartitionerError(f"zoo model '{name}': batch {batch} and seq {seq} must be positive "
                               "(seq None: the model's default)")
    spec = _SPECS[name]
    cfg = dict(spec.small if small else spec.full)
    device = torch.device(device if device is not None else ("cpu" if small else "meta"))
    seq = seq if seq is not None else (16 if small else spec.seq)
    if spec.family in _POSITIONS:  # learned/rotary position tables must cover seq
        key, default = _POSITIONS[spec.family]
        cfg[key] = max(cfg.get(key, default), seq)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device(device):
            model = _build_module(spec, {k: v for k, v in cfg.items() if k != "image"})
    model = model.to(dtype=dtype)

    gen = torch.Generator().manual_seed(seed + 1)

    def ids(*shape: int) -> torch.Tensor:
        return torch.randint(0, cfg["vocab_size"], shape, generator=gen, dtype=torch.int64).to(device)

    kwargs: dict = {}
    if spec.family == "mlp":
        args = (torch.randn(batch, cfg["in_dim"], generator=gen).to(device=device, dtype=dtype),)
        target = torch.randint(0, cfg["n_classes"], (batch,), generator=gen).to(device)
        loss_fn = classification_loss
    elif spec.family == "cnn":
        image = cfg["image"]
        args = (torch.randn(batch, 3, image, image, generator=gen).to(device=device, dtype=dtype),)
        target = torch.randint(0, cfg["n_classes"], (batch,), generator=gen).to(device)
        loss_fn = classification_loss
    elif spec.family == "t5":
        dec_seq = max(1, seq // 4)  # summaries are shorter than documents
        args = (ids(batch, seq),)
        kwargs = {"decoder_input_ids": ids(batch, dec_seq)}
        target = ids(batch, dec_seq)
        loss_fn = lm_loss
    else:  # causal / masked LMs: predict a token per position
        args = (ids(batch, seq),)
        target = ids(batch, seq)
        loss_fn = lm_loss
    return ZooModel(name=name, model=model, example_args=args, example_kwargs=kwargs,
                    target=target, loss_fn=loss_fn)


def describe(zm: ZooModel) -> dict[str, Any]:
    """One row about a built zoo model: class, unique parameter count, input shapes."""
    params = sum(p.numel() for p in zm.model.parameters())  # parameters() skips tied duplicates
    inputs = [tuple(a.shape) for a in zm.example_args]
    inputs += [f"{k}={tuple(v.shape)}" for k, v in zm.example_kwargs.items()]
    return {"name": zm.name, "class": type(zm.model).__name__, "params": params,
            "inputs": ", ".join(str(i) for i in inputs),
            "description": _SPECS[zm.name].description}


def print_models(batch: int = 8) -> None:
    """Print the zoo as a table (built on meta: no weights allocated)."""
    table = Table(title="partitioner model zoo (random init, nothing downloaded)")
    for col, just in (("name", "left"), ("class", "left"), ("parameters", "right"),
                      ("example inputs", "left"), ("about", "left")):
        table.add_column(col, justify=just)
    for name in model_names():
        try:
            row = describe(build(name, batch=batch, device="meta"))
        except PartitionerError as e:  # e.g. transformers missing: list what we can
            table.add_row(name, "-", "-", "-", str(e).split(":")[0])
            continue
        table.add_row(row["name"], row["class"], _human(row["params"]), row["inputs"], row["description"])
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)
    console.print(table)


def _human(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)
