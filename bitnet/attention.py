"""Capture the query/key/value states of chosen attention layers of a Hugging Face causal LM.

BitDistill's attention-relation distillation (:func:`bitnet.objectives.attention_relation_loss`) needs, for
one layer of the teacher and of the student, Q and K **after RoPE** and K and V **before GQA head
repetition**. In transformers 5 the llama, mistral, qwen2 and qwen3 attention modules all compute

    q, k, v = proj(x).view(...).transpose(1, 2)          # qwen3: q_norm / k_norm on the head dim first
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k, v = past_key_values.update(k, v, layer_idx)       # only when a cache is passed
    attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, eager_attention_forward)
    attention_interface(self, q, k, v, attention_mask, ...)

(``modeling_llama.py`` ``LlamaAttention.forward`` l. 254-277, ``modeling_qwen3.py`` l. 252-275,
``modeling_qwen2.py`` l. 206-229, ``modeling_mistral.py`` l. 150-173 of the installed 5.17.0), and the
``repeat_kv`` of the KV heads happens *inside* the attention function (``eager_attention_forward``;
``integrations/sdpa_attention.py`` ``sdpa_attention_forward`` l. 97-101, or SDPA's own ``enable_gqa``). So the
``(query, key, value)`` arguments of the attention function are exactly the tensors wanted:
``q`` (B, num_attention_heads, T, d), ``k``/``v`` (B, num_key_value_heads, T, d).

How: no modeling code is copied. :func:`capture_qkv` registers, through the public
``transformers.AttentionInterface.register`` (and ``AttentionMaskInterface.register``, so that the causal
/ padding mask is built exactly as for the original implementation), a wrapper named
``"bitdistill_capture:<original>"`` that records its ``(query, key, value)`` for the selected layers and
then calls the original implementation (``sdpa``, ``eager`` — the modeling module's own
``eager_attention_forward`` — or any other registered one). For the duration of the context the model's
configs point at the wrapper (``config._attn_implementation_internal``); they are restored on exit, also on
exceptions. Works the same for a plain teacher and for a converted BitNet student (the module tree and the
configs are the HF ones).

Notes
- The recorded tensors are the live autograd tensors: gradients flow from a loss on them into the student's
  projections. Nothing is copied or detached (the teacher is usually run under ``torch.no_grad()``).
- Each forward inside the context overwrites the entries (the dict holds the latest forward).
- With a non-empty ``past_key_values`` cache, k/v include the cached positions (they are recorded after the
  cache update, as the attention function sees them). For distillation run with ``use_cache=False`` or a
  fresh cache.
- The official BitDistill code obtains ``all_query_states`` / ``all_key_states`` / ``all_value_states`` from
  its patched modeling file, which was not available to read (see the module docstring of
  :mod:`bitnet.objectives`); the trainer treats each as ``[B, num_heads, seq_len, head_dim]`` and merges
  ``num_heads * head_dim``, consistent with K/V taken before repetition.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedConfig
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from bitnet.convert import decoder_layers
from bitnet.objectives import QKV

__all__ = ["QKV", "CAPTURE_PREFIX", "capture_qkv", "capture_implementation_name"]

CAPTURE_PREFIX = "bitdistill_capture:"

# id(attention module) -> list of (store, key): where the wrapper writes that module's (q, k, v).
_SINKS: dict[int, list[tuple[dict[Any, QKV], Any]]] = {}
# id(config) -> [config, original implementation name, number of active captures using it]
_SWITCHED: dict[int, list[Any]] = {}


def capture_implementation_name(original: str) -> str:
    """The registered name of the capturing wrapper around ``original`` (e.g. ``"sdpa"``)."""
    return CAPTURE_PREFIX + original


def _eager_for(module: nn.Module) -> Callable[..., Any]:
    """The modeling module's own ``eager_attention_forward`` (what ``get_interface`` falls back to)."""
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        from transformers.models.llama.modeling_llama import eager_attention_forward as fn
    return fn


def _make_wrapper(original: str) -> Callable[..., Any]:
    def capturing_attention(
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        for store, key_name in _SINKS.get(id(module), ()):
            store[key_name] = QKV(query, key, value)
        fn = _eager_for(module) if original == "eager" else ALL_ATTENTION_FUNCTIONS[original]
        # Some implementations (flash) read their own name from module.config: show them the original one.
        config = getattr(module, "config", None)
        switched = config is not None and getattr(config, "_attn_implementation_internal", None) == (
            capture_implementation_name(original)
        )
        if switched:
            config._attn_implementation_internal = original
        try:
            return fn(module, query, key, value, attention_mask, *args, **kwargs)
        finally:
            if switched:
                config._attn_implementation_internal = capture_implementation_name(original)

    capturing_attention.__name__ = f"capturing_attention[{original}]"
    return capturing_attention


def _ensure_registered(original: str) -> str:
    name = capture_implementation_name(original)
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _make_wrapper(original))
    if original in ALL_MASK_ATTENTION_FUNCTIONS and name not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original])
    return name


def _model_configs(model: nn.Module) -> list[PreTrainedConfig]:
    seen: dict[int, PreTrainedConfig] = {}
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if isinstance(cfg, PreTrainedConfig):
            seen.setdefault(id(cfg), cfg)
    return list(seen.values())


def _switch(config: PreTrainedConfig) -> None:
    entry = _SWITCHED.get(id(config))
    if entry is not None and entry[0] is config:
        entry[2] += 1
        return
    original = config._attn_implementation
    if original is None:
        raise ValueError("the model's config has no attention implementation set (config._attn_implementation is None)")
    if original.startswith("paged|"):
        raise ValueError(f"capturing q/k/v is not supported with the paged attention implementation {original!r}")
    if original.startswith(CAPTURE_PREFIX):  # defensive: switched by something we no longer track
        original = original[len(CAPTURE_PREFIX) :]
    config._attn_implementation_internal = _ensure_registered(original)
    _SWITCHED[id(config)] = [config, original, 1]


def _unswitch(config: PreTrainedConfig) -> None:
    entry = _SWITCHED.get(id(config))
    if entry is None or entry[0] is not config:
        return
    entry[2] -= 1
    if entry[2] <= 0:
        config._attn_implementation_internal = entry[1]
        del _SWITCHED[id(config)]


@contextmanager
def capture_qkv(model: nn.Module, layers: Sequence[int]) -> Iterator[dict[int, QKV]]:
    """Record ``QKV(q, k, v)`` of the given decoder layers on every forward inside the context.

    ``layers``: decoder-layer indices; negative ones count from the end (-1 = last). The yielded dict is keyed
    by the indices **as given** (``capture_qkv(m, [-1])`` fills ``d[-1]``) and filled by each forward (the
    latest forward wins). q: ``(B, num_attention_heads, T, head_dim)`` after RoPE (and after Qwen3's q_norm);
    k, v: ``(B, num_key_value_heads, T, head_dim)``, k after RoPE, both before GQA repetition.

    The model's attention implementation is switched to a capturing wrapper around the current one
    (``sdpa``, ``eager``, …) and restored on exit, even when the body raises. Outputs are unchanged. Nested
    captures (teacher and student, or the same model twice) are fine. Pass the bare HF model, not a
    DDP wrapper (``decoder_layers`` reads ``model.config.model_type``).
    """
    blocks = decoder_layers(model)
    n = len(blocks)
    keys: list[int] = []
    modules: list[nn.Module] = []
    for i in layers:
        idx = int(i)
        if not -n <= idx < n:
            raise IndexError(f"layer index {i} out of range for a model with {n} decoder layers")
        attn = getattr(blocks[idx % n], "self_attn", None)
        if attn is None:
            raise ValueError(f"decoder layer {idx % n} has no self_attn module")
        keys.append(i)
        modules.append(attn)

    store: dict[int, QKV] = {}
    configs = _model_configs(model)
    registered: list[tuple[int, tuple[dict[Any, QKV], Any]]] = []
    switched: list[PreTrainedConfig] = []
    try:
        for cfg in configs:
            _switch(cfg)
            switched.append(cfg)
        for key_name, attn in zip(keys, modules, strict=True):
            sink = (store, key_name)
            _SINKS.setdefault(id(attn), []).append(sink)
            registered.append((id(attn), sink))
        yield store
    finally:
        for mid, sink in registered:
            sinks = _SINKS.get(mid, [])
            for j, s in enumerate(sinks):
                if s is sink:
                    del sinks[j]
                    break
            if not sinks:
                _SINKS.pop(mid, None)
        for cfg in reversed(switched):
            _unswitch(cfg)
