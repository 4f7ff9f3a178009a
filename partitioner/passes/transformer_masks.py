"""nn.TransformerEncoder / TransformerDecoder given a mask without an is_causal hint, traced.

Without the hint they compare the mask's values with a causal mask (`_detect_is_causal_mask`) to pick
SDPA's is_causal path: a Python branch on tensor values, which no graph can hold, so
`nn.Transformer(...)(src, tgt, tgt_mask=causal)`, the way its docs call it, failed to capture as
data-dependent control flow. capture() and the runs on fake tensors (fake_run.py) therefore take the
mask as given (is_causal=False unless the caller says True): both paths compute the same values, and
passes/causal_mask.py folds a constant causal mask into is_causal=True afterwards.
"""
from __future__ import annotations

import contextlib
from typing import Iterator


@contextlib.contextmanager
def causal_mask_detection_off() -> Iterator[None]:
    """Within: torch.nn's transformer modules read a missing is_causal hint as False, not from the mask's values."""
    from torch.nn.modules import transformer
    detect = getattr(transformer, "_detect_is_causal_mask", None)  # private: a torch without it is left alone
    if detect is not None:
        transformer._detect_is_causal_mask = lambda mask, is_causal=None, size=None: is_causal is True
    try:
        yield
    finally:
        if detect is not None:
            transformer._detect_is_causal_mask = detect
