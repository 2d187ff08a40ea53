import pytest

from fastunlearn.config import ConfigError, load_config


def test_bundled_default_and_overrides():
    cfg = load_config("default", ["train.lr=1e-5", "steps=7", "eval.every=2", "data.n_forget=none",
                                  "model.lora_targets=q_proj,v_proj", "save_model=false"])
    assert cfg.model.name == "smollm2" and cfg.data.recipe == "harmful"
    assert cfg.train.lr == 1e-5 and cfg.train.steps == 7 and cfg.eval.every == 2
    assert cfg.data.n_forget is None
    assert cfg.model.lora_targets == ["q_proj", "v_proj"]
    assert cfg.save_model is False


def test_yaml_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  steps: 3\n  lr: 1.0e-4\nloss:\n  eps_normal: 2\n")
    cfg = load_config(str(p))
    assert cfg.train.steps == 3 and cfg.loss.eps_normal == 2.0


@pytest.mark.parametrize("override, message", [
    ("train.lrr=1", "did you mean 'train.lr'"),
    ("stepz=3", "did you mean 'train.steps'"),
    ("train.steps=abc", "expects an integer"),
    ("train.steps=2.5", "expects an integer"),
    ("train.lr=fast", "expects a number"),
    ("model.lora=maybe", "expects true/false"),
    ("seed=1", "ambiguous"),
    ("train.steps", "key=value"),
    ("train.steps=0", "train.steps must be >= 1"),
    ("loss.eps_forget=-1", "coefficients must be >= 0"),
    ("train.cpu_linear=mkl", "train.cpu_linear must be auto, onednn or torch"),
    ("train.cpu_attention=fp16", "train.cpu_attention must be auto or native"),
    ("train.optimizer=sgd", "train.optimizer must be auto, adamw or adamw_sr"),
])
def test_bad_overrides(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("default", [override])


def test_bad_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  stepss: 3\n")
    with pytest.raises(ConfigError, match="did you mean 'train.steps'"):
        load_config(str(p))
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "missing.yaml"))
    p.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(str(p))


def test_validate_checks_configs_built_in_code():
    """The same checks for a RunConfig built in code: finite numbers, integers, ranges."""
    from fastunlearn.config import RunConfig, validate

    for section, name, value, message in [
        ("train", "lr", float("inf"), "finite"), ("train", "steps", float("nan"), "integer"),
        ("loss", "eps_mismatch", float("nan"), "finite"), ("train", "steps", 2.5, "integer"),
        ("train", "max_grad_norm", -1.0, "max_grad_norm"), ("data", "n_normal", 0, "n_normal"),
        ("loss", "chunk_rows", 0, "chunk_rows"), ("train", "threads", -1, "threads"),
    ]:
        cfg = RunConfig()
        setattr(getattr(cfg, section), name, value)
        with pytest.raises(ConfigError, match=message):
            validate(cfg)
    cfg = RunConfig()
    cfg.train.lr = 1  # an int where a float is declared is normalised, not refused
    validate(cfg)
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)


def test_non_utf8_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_bytes("train:\n  steps: 3 # caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(str(p))


def test_new_keys_defaults():
    cfg = load_config("default")
    assert cfg.model.trust_remote_code is False
    assert cfg.train.check_finite_every >= 1
    assert cfg.train.max_normal_kl > 0 and cfg.train.max_mismatch_nll > 0


@pytest.mark.parametrize("overrides, message", [
    (["data.mismatch_answers=0"], "mismatch_answers must be in"),
    (["data.mismatch_answers=65"], "mismatch_answers must be in"),
    (["model.lora=true", "model.reference=adapters", "model.reference_name=other"],
     "cannot also name"),
    (["model.lora=true", "model.reference=copy"], "copy with model.reference_name"),
])
def test_reference_and_mismatch_combinations(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("default", overrides)


def test_lora_with_a_named_copy_reference_is_accepted():
    cfg = load_config("default", ["model.lora=true", "model.reference=copy",
                                  "model.reference_name=other", "data.mismatch_answers=4"])
    assert cfg.model.reference_name == "other" and cfg.data.mismatch_answers == 4


def test_an_unusable_judge_fails_in_validation(tmp_path):
    """Before any data or model loads; eval.enabled=false skips the judge entirely."""
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("default", [f"eval.judge={tmp_path / 'missing'}"])
    assert load_config("default", [f"eval.judge={tmp_path / 'missing'}", "eval.enabled=false"])
