"""Run configuration: dataclasses, YAML files and ``key=value`` overrides with type checks."""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A bad configuration (one-line message)."""


# The unlearning methods of ``loss.method`` (``fastunlearn.losses.methods`` computes them).
LOSS_METHODS = ("paper", "graddiff", "npo", "simnpo", "idk_dpo", "rmu")


@dataclass
class ModelSection:
    name: str = "smollm2"  # "smollm2", an HF directory, a .gguf file or a hub id
    dtype: str = "auto"  # policy weights; auto = float32 master weights
    reference_dtype: str = "auto"  # auto = same as the policy; bfloat16 halves its memory
    reference_name: str | None = None  # a different reference model (default: the policy's copy)
    # How the reference runs: auto (adapters with LoRA, else copy) | copy (frozen model in memory)
    # | adapters (LoRA policy, adapters disabled) | cached (hidden states of the normal rows,
    # and npo / idk_dpo's reference log-probabilities of the forget rows, computed once,
    # stored on disk, the reference model freed; see reference_cache.py)
    reference: str = "auto"
    reference_cache_dir: str | None = None  # cached: where to keep it (default: <out>/refcache)
    attn_implementation: str = "auto"  # auto: flash_attention_2 if installed on CUDA, else sdpa
    gradient_checkpointing: bool = False
    lean_layers: bool = False  # RMSNorm / SwiGLU that save less for backward (lean_layers.py)
    lora: bool = False  # train LoRA adapters; the reference is the model with adapters disabled
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_targets: list = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                        "gate_proj", "up_proj", "down_proj"])
    lora_merge_on_save: bool = True
    trust_remote_code: bool = False  # let a model folder run its own Python code (off: refuse)
    # dtype of the saved weights: auto (bfloat16 when training in bf16, else the weights' own)
    # | float32 | bfloat16
    save_dtype: str = "auto"


@dataclass
class DataSection:
    recipe: str = "harmful"  # harmful | copyright | hallucination (ignored for files given below)
    forget_file: str | None = None  # JSONL / CSV / JSON of (prompt, answer) pairs to forget
    normal_file: str | None = None  # (question, answer) pairs whose behaviour is kept
    prompt_column: str = "prompt"
    answer_column: str = "answer"
    normal_prompt_column: str = "prompt"
    normal_answer_column: str = "answer"
    n_forget: int | None = None  # cap on training forget pairs, >= 1 (None = all)
    n_normal: int | None = None  # the same for normal pairs
    n_heldout: int = 16  # held-out prompts per set, never trained on
    max_length: int = 160  # tokens per row (prompt + answer)
    max_prompt_length: int | None = 96
    kl_tokens: str = "answer"  # answer | all (KL on every non-pad token of normal rows)
    mismatch_answers: int = 1  # normal answers drawn afresh per forget prompt per batch (K)
    seed: int = 0


@dataclass
class LossSection:
    # paper (Yao et al.) | graddiff | npo | simnpo | idk_dpo | rmu (see the README's method table)
    method: str = "paper"
    eps_forget: float = 0.5  # weight of the method's forget term
    eps_mismatch: float = 1.0
    eps_normal: float = 1.0  # weight of the retain term on normal rows (KL, NLL for graddiff)
    beta: float | None = None  # npo / simnpo / idk_dpo inverse temperature (None: the method's)
    gamma: float = 0.0  # simnpo margin
    rmu_layer: int | None = None  # rmu: decoder layer whose output is steered (None: depth / 4)
    # rmu: length c of the random direction forget states are pushed to; about 2x the typical
    # hidden-state norm at the layer (SmolLM2-135M, layer 7: median 110)
    rmu_steer: float = 200.0
    backend: str = "auto"
    chunk_rows: int | None = None


@dataclass
class TrainSection:
    steps: int = 1000
    batch_size: int = 2  # rows of EACH kind per micro-batch
    grad_accum: int = 1
    lr: float = 2e-6
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    # auto: bf16 autocast on CUDA or with bf16 weights, else fp32 | fp32 | bf16
    precision: str = "auto"
    bucket_by_length: bool = True  # draw rows of similar length together (less padding)
    packing: bool = False  # pack rows end to end (position ids restart) instead of padding
    stop_forget_nll: float | None = None  # paper's stop rule: forget NLL threshold...
    stop_extra_steps: int = 0  # ...and the steps still taken after it is passed
    threads: int | None = None  # torch CPU threads (None = torch default)
    cpu_linear: str = "auto"  # fp32 on CPU: auto | onednn | torch GEMMs for nn.Linear layers
    # bf16 on CPU: auto (sdpa attention on fp32 copies where that is faster, timed per shape;
    # see cpu_attention.py) | native
    cpu_attention: str = "auto"
    # CPU runs: glibc keeps freed memory for the next step instead of returning large blocks to
    # the kernel (no page faults on them every step; see cpu_memory.py)
    keep_freed_memory: bool = True
    # auto: adamw_sr when a trainable weight is bf16 (model.dtype=bfloat16), else adamw
    # | adamw (torch.optim.AdamW, fused) | adamw_sr (stochastic rounding, see optim.py)
    optimizer: str = "auto"
    # Parameters checked finite after every N-th optimizer step (0: only before saving; they
    # are always checked before saving): a diverged model is never saved.
    check_finite_every: int = 10
    # Divergence guard: stop with an error when the normal KL or the mismatch NLL of a step
    # (per token, nats) exceeds this bound (None: no bound).
    max_normal_kl: float | None = 20.0
    max_mismatch_nll: float | None = 50.0
    # Checkpoints (torch.distributed.checkpoint, resumable on any number of processes) every N
    # optimizer steps (0: none), the newest K kept, in checkpoint_dir (default: <out>.checkpoints,
    # next to the output folder). `fastunlearn run --resume DIR` continues from one.
    save_every: int = 0
    keep_checkpoints: int = 1
    checkpoint_dir: str | None = None
    # Each step's metrics also to <out>/tensorboard/ (needs `pip install tensorboard`) | none:
    # metrics.jsonl only (written either way)
    report_to: str = "none"


@dataclass
class EvalSection:
    enabled: bool = True
    every: int = 0  # evaluate every N steps during training (0 = before and after only)
    generate: bool = True
    max_new_tokens: int = 48
    batch_size: int = 8
    n_harmful: int = 16
    n_normal: int = 16
    n_xstest: int = 16
    judge: str = "builtin"  # builtin | none | path to an HF sequence-classification model
    judge_harmful_labels: list = field(default_factory=list)
    samples: int = 4


@dataclass
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    loss: LossSection = field(default_factory=LossSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    out: str | None = None
    save_model: bool = True

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = ("model", "data", "loss", "train", "eval")


def _all_keys() -> dict[str, tuple[str | None, str]]:
    """Dotted key -> (section or None, field)."""
    keys: dict[str, tuple[str | None, str]] = {}
    cfg = RunConfig()
    for f in dataclasses.fields(cfg):
        if f.name in SECTIONS:
            for sub in dataclasses.fields(getattr(cfg, f.name)):
                keys[f"{f.name}.{sub.name}"] = (f.name, sub.name)
        else:
            keys[f.name] = (None, f.name)
    return keys


def _unknown(key: str) -> ConfigError:
    keys = list(_all_keys())
    leaves = [k.split(".")[-1] for k in keys]
    close = difflib.get_close_matches(key, keys, n=1) or \
        [keys[leaves.index(m)] for m in difflib.get_close_matches(key.split(".")[-1], leaves, n=1)]
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint}")


def _resolve_key(key: str) -> tuple[str | None, str]:
    keys = _all_keys()
    if key in keys:
        return keys[key]
    matches = [v for k, v in keys.items() if k.split(".")[-1] == key]
    if len(matches) == 1:  # a unique leaf name is accepted on its own (lr=1e-5)
        return matches[0]
    if len(matches) > 1:
        names = ", ".join(f"{s}.{n}" for s, n in matches)
        raise ConfigError(f"config key {key!r} is ambiguous: use one of {names}")
    raise _unknown(key)


def _field_type(section: str | None, name: str):
    owner = RunConfig if section is None else type(getattr(RunConfig(), section))
    hints = typing.get_type_hints(owner)
    return hints[name]


def _coerce(value: Any, tp, key: str) -> Any:
    """Convert ``value`` (from YAML or a command-line string) to the field type ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if tp is list or origin is list:
        if isinstance(value, str):
            import yaml  # the train extra; not needed to describe the options (--help)

            value = yaml.safe_load(value) if value.startswith("[") else \
                [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"config key {key!r} expects a list, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"config key {key!r} expects true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"config key {key!r} expects an integer, got {value!r}")
        if isinstance(value, int):
            return value
        try:
            f = float(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"config key {key!r} expects an integer, got {value!r}") from None
        if not math.isfinite(f) or f != int(f):
            raise ConfigError(f"config key {key!r} expects an integer, got {value!r}")
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"config key {key!r} expects a number, got {value!r}")
        try:
            f = float(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"config key {key!r} expects a number, got {value!r}") from None
        if not math.isfinite(f):
            raise ConfigError(f"config key {key!r} expects a finite number, got {value!r}")
        return f
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"config key {key!r} expects a string, got {value!r}")
        return str(value)
    return value


def set_value(cfg: RunConfig, key: str, value: Any) -> None:
    section, name = _resolve_key(key)
    dotted = name if section is None else f"{section}.{name}"
    coerced = _coerce(value, _field_type(section, name), dotted)
    setattr(cfg if section is None else getattr(cfg, section), name, coerced)


def _apply_mapping(cfg: RunConfig, data: dict, source: str) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    for key, value in data.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: section {key!r} must be a mapping")
            for sub, v in value.items():
                if f"{key}.{sub}" not in _all_keys():
                    raise _unknown(f"{key}.{sub}")
                set_value(cfg, f"{key}.{sub}", v)
        else:
            set_value(cfg, key, value)


def bundled_config_names() -> list[str]:
    root = resources.files("fastunlearn.configs")
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def read_yaml(path_or_name: str) -> tuple[dict, str]:
    import yaml  # the train extra; not needed to describe the options (--help)

    path = Path(path_or_name)
    if not path.exists() and path_or_name in bundled_config_names():
        text = (resources.files("fastunlearn.configs") / f"{path_or_name}.yaml").read_text()
        return yaml.safe_load(text) or {}, f"bundled config {path_or_name!r}"
    if not path.exists():
        names = ", ".join(bundled_config_names())
        raise ConfigError(f"config file {path_or_name} not found (bundled configs: {names})")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}, str(path)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"cannot read config {path}: not UTF-8 text (byte {exc.start})") \
            from None
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read config {path}: {str(exc).splitlines()[0]}") from None


def load_config(config: str | None = "default", overrides: list[str] | None = None) -> RunConfig:
    """Defaults <- YAML file (path or bundled name) <- ``key=value`` overrides."""
    cfg = RunConfig()
    if config:
        data, source = read_yaml(config)
        _apply_mapping(cfg, data, source)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
        key, value = item.split("=", 1)
        set_value(cfg, key.strip(), value.strip())
    validate(cfg)
    return cfg


_DTYPE_NAMES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")


def _normalise_types(cfg: RunConfig) -> None:
    """Every value through the same type checks as YAML and overrides (also for configs built
    in code): integers are integers, numbers are finite."""
    for key, (section, name) in _all_keys().items():
        owner = cfg if section is None else getattr(cfg, section)
        setattr(owner, name, _coerce(getattr(owner, name), _field_type(section, name), key))


def _at_least(value, low, key: str, *, none_ok: bool = False, hint: str = ""):
    """(ok, message) for ``value >= low`` (or None when ``none_ok``)."""
    if value is None and none_ok:
        return True, ""
    what = f"{key} must be >= {low}" + (" or none" if none_ok else "")
    return value is not None and value >= low, f"{what}{hint}, got {value!r}"


def validate(cfg: RunConfig) -> None:
    """Every type and range check, in one step that runs before anything heavy (no model or
    data is loaded yet). ConfigError with a one-line message on the first failure."""
    _normalise_types(cfg)
    t, d, lo, m, e = cfg.train, cfg.data, cfg.loss, cfg.model, cfg.eval
    ranges = [
        _at_least(t.steps, 1, "train.steps"),
        _at_least(t.batch_size, 1, "train.batch_size"),
        _at_least(t.grad_accum, 1, "train.grad_accum"),
        (t.lr > 0, f"train.lr must be > 0, got {t.lr!r}"),
        _at_least(t.weight_decay, 0, "train.weight_decay"),
        _at_least(t.warmup_steps, 0, "train.warmup_steps"),
        (t.max_grad_norm is None or t.max_grad_norm > 0,
         f"train.max_grad_norm must be > 0 or none (no clipping), got {t.max_grad_norm!r}"),
        _at_least(t.threads, 1, "train.threads", none_ok=True),
        _at_least(t.stop_extra_steps, 0, "train.stop_extra_steps"),
        _at_least(t.check_finite_every, 0, "train.check_finite_every",
                  hint=" (0: only before saving)"),
        (t.max_normal_kl is None or t.max_normal_kl > 0,
         f"train.max_normal_kl must be > 0 or none, got {t.max_normal_kl!r}"),
        (t.max_mismatch_nll is None or t.max_mismatch_nll > 0,
         f"train.max_mismatch_nll must be > 0 or none, got {t.max_mismatch_nll!r}"),
        _at_least(t.save_every, 0, "train.save_every", hint=" (0: no checkpoints)"),
        _at_least(t.keep_checkpoints, 1, "train.keep_checkpoints"),
        _at_least(d.n_forget, 1, "data.n_forget", none_ok=True, hint=" (none: all)"),
        _at_least(d.n_normal, 1, "data.n_normal", none_ok=True, hint=" (none: all)"),
        _at_least(d.n_heldout, 1, "data.n_heldout"),
        (isinstance(d.mismatch_answers, int) and 1 <= d.mismatch_answers <= 64,
         f"data.mismatch_answers must be in [1, 64], got {d.mismatch_answers!r}"),
        _at_least(d.max_length, 8, "data.max_length"),
        _at_least(d.max_prompt_length, 1, "data.max_prompt_length", none_ok=True),
        _at_least(lo.chunk_rows, 1, "loss.chunk_rows", none_ok=True, hint=" (none: automatic)"),
        (min(lo.eps_forget, lo.eps_mismatch, lo.eps_normal) >= 0,
         "loss coefficients must be >= 0 (the ascent sign is built in)"),
        (lo.beta is None or lo.beta > 0, f"loss.beta must be > 0 or none, got {lo.beta!r}"),
        _at_least(lo.rmu_layer, 0, "loss.rmu_layer", none_ok=True, hint=" (none: depth / 4)"),
        (lo.rmu_steer > 0, f"loss.rmu_steer must be > 0, got {lo.rmu_steer!r}"),
        _at_least(m.lora_r, 1, "model.lora_r"),
        (m.lora_alpha > 0, f"model.lora_alpha must be > 0, got {m.lora_alpha!r}"),
        (0 <= m.lora_dropout < 1, f"model.lora_dropout must be in [0, 1), got {m.lora_dropout!r}"),
        (bool(m.lora_targets) or not m.lora, "model.lora_targets must name at least one module"),
        _at_least(e.every, 0, "eval.every"),
        _at_least(e.batch_size, 1, "eval.batch_size"),
        _at_least(e.max_new_tokens, 1, "eval.max_new_tokens"),
    ] + [_at_least(getattr(e, k), 0, f"eval.{k}")
         for k in ("n_harmful", "n_normal", "n_xstest", "samples")]
    choices = [
        (lo.method in LOSS_METHODS, f"loss.method must be one of {', '.join(LOSS_METHODS)}, "
                                    f"got {lo.method!r}"),
        (lo.method != "rmu" or lo.eps_mismatch == 0,
         "loss.method=rmu steers hidden states and has no head term: set loss.eps_mismatch=0"),
        (lo.method != "rmu" or t.stop_forget_nll is None,
         "train.stop_forget_nll needs the forget NLL, which loss.method=rmu never computes"),
        (lo.method != "rmu" or m.reference != "cached",
         "loss.method=rmu compares hidden states inside the model: model.reference=cached "
         "holds only the last ones (use copy, or adapters with LoRA)"),
        (lo.method != "graddiff" or not m.reference_name,
         "loss.method=graddiff uses no reference model: model.reference_name does not apply"),
        (t.device in ("auto", "cpu", "cuda") or t.device.startswith("cuda:"),
         "train.device must be auto, cpu or cuda[:N]"),
        (t.precision in ("auto", "fp32", "bf16"), "train.precision must be auto, fp32 or bf16"),
        (t.cpu_linear in ("auto", "onednn", "torch"),
         "train.cpu_linear must be auto, onednn or torch"),
        (t.cpu_attention in ("auto", "native"), "train.cpu_attention must be auto or native"),
        (t.optimizer in ("auto", "adamw", "adamw_sr"),
         "train.optimizer must be auto, adamw or adamw_sr"),
        (t.report_to in ("none", "tensorboard"), "train.report_to must be none or tensorboard"),
        (d.kl_tokens in ("answer", "all"), "data.kl_tokens must be 'answer' or 'all'"),
        (m.dtype in _DTYPE_NAMES, f"model.dtype must be one of {', '.join(_DTYPE_NAMES)}"),
        (m.reference_dtype in _DTYPE_NAMES,
         f"model.reference_dtype must be one of {', '.join(_DTYPE_NAMES)}"),
        (m.save_dtype in ("auto", "float32", "bfloat16"),
         "model.save_dtype must be auto, float32 or bfloat16"),
        (m.reference in ("auto", "copy", "adapters", "cached"),
         "model.reference must be auto, copy, adapters or cached"),
        (m.reference != "adapters" or m.lora,
         "model.reference=adapters needs model.lora=true"),
        (m.reference != "adapters" or not m.reference_name,
         "model.reference=adapters uses the policy with its adapters off; it cannot also name "
         "model.reference_name (use reference=copy or cached)"),
        (m.reference != "copy" or not m.lora or m.reference_name,
         "model.lora=true takes model.reference=adapters or cached, or copy with "
         "model.reference_name"),
    ]
    for ok, msg in ranges + choices:
        if not ok:
            raise ConfigError(msg)
    if e.enabled:  # a judge path that cannot load fails here, not after the model has loaded
        from .eval.judge import check_judge_spec

        check_judge_spec(e.judge)


def describe_options(config: str = "default") -> str:
    """Every key with the value a run takes when no file sets it, for ``--help``: the value of
    the bundled ``config`` (``run``'s default --config), and the built-in default of the
    dataclasses too where they differ. Without PyYAML (no train extra) the built-in defaults."""
    built_in = RunConfig()
    try:
        bundled: RunConfig | None = load_config(config)
    except ImportError:
        bundled = None
    lines = [f"  (as the bundled config {config!r} sets them; `fastunlearn configs {config}` "
             "prints it)" if bundled else "  (built-in defaults; the bundled configs need "
             "PyYAML: pip install 'fastunlearn[train]')"]
    for key, (section, name) in _all_keys().items():
        default = getattr(built_in if section is None else getattr(built_in, section), name)
        if bundled is None:
            lines.append(f"  {key} = {default!r}")
            continue
        value = getattr(bundled if section is None else getattr(bundled, section), name)
        lines.append(f"  {key} = {value!r}"
                     + ("" if value == default else f" (built-in default {default!r})"))
    return "\n".join(lines)
