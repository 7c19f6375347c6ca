"""Save and load BitNet students: safetensors weights + JSON configs, never pickle.

Layout of a student directory::

    config.json          the Hugging Face config of the underlying architecture
    bitnet.json          the BitNetConfig used by convert_to_bitnet (SubLN placement, LRC rank, λ)
    model.safetensors    the full state dict (latent weights, SubLN, LRC adapters)
    tokenizer files      optional, when a tokenizer is passed to save_student
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file, save_model
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerBase

from bitnet.convert import BitNetConfig, convert_to_bitnet
from bitnet.io import atomic_dir, model_dir, sort_safetensors_metadata, write_json_atomic

BITNET_CONFIG = "bitnet.json"
WEIGHTS = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint is missing, malformed or does not fit the model."""


def save_student(
    model: nn.Module,
    path: str | Path,
    tokenizer: PreTrainedTokenizerBase | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``model`` (a converted student) to ``path`` atomically.

    ``state_dict`` replaces the model's own tensors, e.g. the full state gathered on rank 0 from an FSDP-sharded
    model (``Trainer.full_state_dict()``); of tied names (``lm_head.weight`` = ``embed_tokens.weight``) one is
    written, as ``save_model`` does.
    """
    cfg: BitNetConfig | None = getattr(model, "bitnet_config", None)
    if cfg is None:
        raise ValueError("save_student needs a model converted with convert_to_bitnet")
    path = Path(path)
    with atomic_dir(path, marker=BITNET_CONFIG, expected=_tensor_bytes(model, state_dict)) as tmp:
        model.config.save_pretrained(tmp)
        write_json_atomic(tmp / BITNET_CONFIG, cfg.model_dump())
        meta = {"format": "pt", "bitdistill": "student"}
        if state_dict is None:
            save_model(model, str(tmp / WEIGHTS), metadata=meta)
        else:
            save_file(_untied(model, state_dict), str(tmp / WEIGHTS), metadata=meta)
        sort_safetensors_metadata(tmp / WEIGHTS)  # the same model, the same bytes
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return path


def _tensor_bytes(model: nn.Module, state: dict[str, torch.Tensor] | None) -> int:
    """About the size of the weights file (tied tensors once): what a full disk is told the write needs."""
    try:
        tensors = state if state is not None else model.state_dict()
        return sum(t.numel() * t.element_size() for t in {t.data_ptr(): t for t in tensors.values()}.values())
    except Exception:  # noqa: BLE001 - an estimate only (e.g. sharded tensors without storage here)
        return 0


def _untied(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` as contiguous CPU tensors, keeping the first name of each group of tied parameters."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    drop = {n for names in groups.values() for n in sorted(names)[1:]}
    return {k: v.detach().contiguous().cpu() for k, v in state.items() if k not in drop}


def read_bitnet_config(path: str | Path) -> BitNetConfig:
    file = Path(path) / BITNET_CONFIG
    if not file.is_file():
        raise CheckpointError(f"{path} is not a student checkpoint: {BITNET_CONFIG} missing")
    try:
        return BitNetConfig.model_validate(json.loads(file.read_text()))
    except (ValueError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: malformed BitNet config: {str(e).splitlines()[0]}") from e


def load_state_dict_checked(model: nn.Module, file: str | Path) -> None:
    """Load a safetensors state dict into ``model``; mismatched names or shapes raise CheckpointError."""
    try:
        state = load_file(str(file))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: unreadable safetensors file ({e})") from e
    own = model.state_dict()
    missing = [k for k in own if k not in state and not _is_tied_alias(model, k, state)]
    unexpected = [k for k in state if k not in own]
    wrong = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items()
             if k in own and tuple(own[k].shape) != tuple(v.shape)]
    if problem := state_mismatch(missing, unexpected, wrong):
        raise CheckpointError(f"{file} does not fit this model: {problem}")
    model.load_state_dict(state, strict=False)


def state_mismatch(missing: list[str], unexpected: list[str], wrong: list[tuple[str, tuple, tuple]]) -> str | None:
    """Why a state dict does not fit a model, in one line (``wrong``: name, stored shape, model shape); ``None``
    when it fits."""
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    if wrong:
        k, theirs, ours = wrong[0]
        parts.append(f"{len(wrong)} with other shapes (e.g. {k}: {theirs} vs {ours})")
    return "; ".join(parts) or None


def _is_tied_alias(model: nn.Module, key: str, state: dict[str, torch.Tensor]) -> bool:
    """safetensors' save_model drops one name of each shared tensor (e.g. tied lm_head.weight)."""
    own = model.state_dict()
    ptr = own[key].data_ptr()
    return any(k in state and own[k].data_ptr() == ptr for k in own if k != key)


def load_student(path: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Rebuild the module tree described by ``path`` (a student directory, or a stage output holding one in
    ``model/``) and load its weights (identical logits)."""
    path = model_dir(path)
    if not path.is_dir():
        raise CheckpointError(f"student checkpoint {path} does not exist")
    bcfg = read_bitnet_config(path)
    if not (path / WEIGHTS).is_file():
        raise CheckpointError(f"{path} is not a student checkpoint: {WEIGHTS} missing")
    try:
        hf_config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable config.json ({str(e).splitlines()[0]})") from e
    model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    convert_to_bitnet(model, bcfg)
    load_state_dict_checked(model, path / WEIGHTS)
    model.eval()
    return model
