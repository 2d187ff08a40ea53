"""The bad-input catalogue: every user mistake and flaky-machine fault ends in exit 2, exactly
one line on stderr, and nothing written or changed outside a fresh output folder (which is not
created either). Cases fail before the model loads where they can; the rest use a tiny model.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastunlearn.cli import main
from tests.test_cli import base_args  # noqa: F401 - also used by test_finite_guard
from tests.tiny_model import write_jsonl, write_tiny_run_inputs

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Input files shared by every case (the catalogue checks that none of them changes)."""
    d = write_tiny_run_inputs(tmp_path_factory.mktemp("inputs"))
    (d / "prompts.forget.jsonl").write_text('{"prompt": "p"}\n')
    (d / "latin1.yaml").write_bytes("train:\n  steps: 3 # caf\xe9\n".encode("latin-1"))
    (d / "random.gguf").write_bytes(os.urandom(4096))
    # A GGUF header cut off after the tensor count.
    (d / "truncated.gguf").write_bytes(b"GGUF" + struct.pack("<IQ", 3, 5) + b"\x01\x02")
    (d / "a_file").write_text("not a folder")
    (d / "stray_quote.csv").write_text(
        'prompt,answer\np1,"a1\np2,a2\np3,a3\np4,a4\np5,a5\np6,a6\n')
    (d / "dup_header.csv").write_text("prompt,answer,answer\np,a,b\nq,c,d\nr,e,f\n")
    return d


def snapshot(*folders: Path) -> dict:
    """Every file and folder under ``folders`` with its content hash (folders: None)."""
    state = {}
    for top in folders:
        for p in sorted(top.rglob("*")):
            state[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
    return state


def refused(argv, message, inputs, work, capsys, *, out=None):
    """Exit 2, one stderr line containing ``message``, nothing changed, no output folder."""
    before = snapshot(inputs, work)
    try:
        code = main(argv)
    except SystemExit as exc:  # argument errors leave through argparse
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert message in err, err
    assert snapshot(inputs, work) == before, "something outside the output was written"
    if out is not None:
        assert not Path(out).exists()
    return err


# ----------------------------------------------------------- config values (no model load)
BAD_VALUES = [
    ("train.lr=inf", "finite"), ("train.lr=nan", "finite"), ("train.lr=-1", "train.lr"),
    ("train.steps=nan", "expects an integer"), ("train.steps=inf", "expects an integer"),
    ("train.steps=1e400", "expects an integer"), ("train.steps=0", "train.steps"),
    ("loss.eps_forget=nan", "finite"), ("loss.eps_mismatch=inf", "finite"),
    ("loss.eps_normal=-inf", "finite"), ("loss.eps_normal=-1", "coefficients"),
    ("train.max_grad_norm=-1", "train.max_grad_norm"), ("train.max_grad_norm=0", "none"),
    ("loss.chunk_rows=-5", "loss.chunk_rows"), ("loss.chunk_rows=0", "loss.chunk_rows"),
    ("train.warmup_steps=-5", "train.warmup_steps"),
    ("data.n_forget=-1", "data.n_forget"), ("data.n_forget=0", "none: all"),
    ("data.n_normal=-3", "data.n_normal"), ("train.threads=-1", "train.threads"),
    ("train.weight_decay=-1", "train.weight_decay"), ("eval.batch_size=0", "eval.batch_size"),
    ("model.lora_r=0", "model.lora_r"), ("model.lora_dropout=1", "model.lora_dropout"),
    ("train.check_finite_every=-1", "check_finite_every must be"),
    ("train.max_normal_kl=0", "max_normal_kl must be"), ("model.dtype=fp8", "model.dtype"),
    ("train.stepss=3", "did you mean"), ("train.batch_size=two", "expects an integer"),
]


@pytest.mark.parametrize("override, message", BAD_VALUES, ids=[o for o, _ in BAD_VALUES])
def test_bad_config_value(override, message, inputs, tmp_path, capsys):
    out = tmp_path / "run"
    refused(base_args(inputs, out) + [override], message, inputs, tmp_path, capsys, out=out)


def test_non_utf8_yaml(inputs, tmp_path, capsys):
    out = tmp_path / "run"
    refused(base_args(inputs, out) + ["--config", str(inputs / "latin1.yaml")], "not UTF-8",
            inputs, tmp_path, capsys, out=out)


def test_override_after_out_and_unknown_option(inputs, tmp_path, capsys):
    out = tmp_path / "run"
    refused(["run", "--out", str(out), "train.steps=nan"], "train.steps", inputs, tmp_path,
            capsys, out=out)
    refused(["run", "train.lr=1", "--out", str(out), "--no-such-flag", "train.steps=2"],
            "--no-such-flag", inputs, tmp_path, capsys, out=out)


# ------------------------------------------------------------------- output locations
def test_out_is_a_file_or_under_a_file(inputs, tmp_path, capsys):
    refused(base_args(inputs, inputs / "a_file"), "is a file", inputs, tmp_path, capsys)
    refused(base_args(inputs, inputs / "a_file" / "run"), "which is a file", inputs, tmp_path,
            capsys)


def test_out_not_empty(inputs, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep").write_text("earlier result")
    refused(base_args(inputs, out), "not empty", inputs, tmp_path, capsys)


def test_read_only_output_location(inputs, tmp_path, capsys, monkeypatch):
    def read_only(*a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(a[0]))

    monkeypatch.setattr(os, "mkdir", read_only)  # root ignores chmod: simulate the mount
    out = tmp_path / "ro" / "run"
    refused(base_args(inputs, out), "Read-only file system", inputs, tmp_path, capsys, out=out)


def test_uncreatable_reference_cache_dir(inputs, tmp_path, capsys):
    out = tmp_path / "run"
    refused(base_args(inputs, out) + ["model.reference=cached",
                                      f"model.reference_cache_dir={inputs / 'a_file' / 'c'}"],
            "reference cache", inputs, tmp_path, capsys, out=out)


def test_another_run_holds_the_output(inputs, tmp_path, capsys):
    """A live run's working folder is the output's lock: the second run fails at once."""
    out = tmp_path / "run"
    lock = tmp_path / ".run.partial"
    lock.mkdir()
    (lock / ".fastunlearn-owner").write_text(f"{os.getpid()} {os.uname().nodename}")
    refused(base_args(inputs, out), "another run", inputs, tmp_path, capsys, out=out)


# ------------------------------------------------------- model files (before/at load)
def test_random_bytes_gguf(inputs, tmp_path, capsys):
    out = tmp_path / "run"
    refused(base_args(inputs, out) + [f"model.name={inputs / 'random.gguf'}"], "GGUF", inputs,
            tmp_path, capsys, out=out)


def test_truncated_gguf(inputs, tmp_path, capsys):
    out = tmp_path / "run"
    refused(base_args(inputs, out) + [f"model.name={inputs / 'truncated.gguf'}"], "truncated",
            inputs, tmp_path, capsys, out=out)


def test_mistyped_model_name_offline(inputs, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "run"
    t0 = time.perf_counter()
    refused(base_args(inputs, out) + ["model.name=smolm2"], "did you mean 'smollm2'", inputs,
            tmp_path, capsys, out=out)
    assert time.perf_counter() - t0 < 30  # no hub retries


def test_mistyped_model_name_unreachable_hub(inputs, tmp_path, capsys, monkeypatch):
    import fastunlearn.models as models

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setattr(models, "_hub_probe", lambda host, port: False)
    out = tmp_path / "run"
    refused(base_args(inputs, out) + ["model.name=someone/no-such-model"], "unreachable", inputs,
            tmp_path, capsys, out=out)


def test_remote_code_is_never_run(inputs, tmp_path, capsys):
    """A model folder that needs its own Python: refused in one line, the code never runs."""
    d = tmp_path / "custom"
    d.mkdir()
    marker = tmp_path / "code_ran"
    (d / "config.json").write_text(json.dumps({
        "model_type": "fu_custom", "auto_map": {"AutoConfig": "configuration_x.XConfig",
                                                "AutoModelForCausalLM": "modeling_x.XModel"}}))
    code = f"open({str(marker)!r}, 'w').write('ran')\n"
    (d / "configuration_x.py").write_text(code)
    (d / "modeling_x.py").write_text(code)
    out = tmp_path / "run"
    refused(base_args(inputs, out) + [f"model.name={d}"], "trust_remote_code", inputs,
            tmp_path, capsys, out=out)
    assert not marker.exists()


@pytest.mark.parametrize("overrides, message", [
    (["model.lora=true", "model.lora_targets=q_projj"], "q_projj"),  # peft's argument error
    (["model.attn_implementation=bogus"], "bogus"),  # transformers' argument error
], ids=["lora-target", "attn-implementation"])
def test_library_argument_errors(overrides, message, inputs, tmp_path, capsys):
    out = tmp_path / "run"
    refused(base_args(inputs, out) + overrides, message, inputs, tmp_path, capsys, out=out)


# ------------------------------------------------------------ training faults (tiny model)
@pytest.mark.parametrize("lr", ["inf", "1e10"])
def test_exploding_lr_saves_nothing(lr, inputs, tmp_path, capsys):
    """lr=inf is refused by validation; lr=1e10 trains one step into non-finite weights,
    which the check before saving catches: exit 2 and no model written."""
    out = tmp_path / "run"
    refused(base_args(inputs, out) + [f"train.lr={lr}", "train.steps=1", "eval.enabled=false",
                                      "train.max_grad_norm=none"],
            "finite", inputs, tmp_path, capsys, out=out)


def test_disk_full_while_saving(inputs, tmp_path, capsys, monkeypatch):
    import fastunlearn.trainer as trainer

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(a[2]))

    monkeypatch.setattr(trainer, "save_model", full)
    out = tmp_path / "run"
    refused(base_args(inputs, out) + ["train.steps=1", "eval.enabled=false"],
            "No space left on device", inputs, tmp_path, capsys, out=out)


def test_nan_in_a_loss_term_is_caught(inputs, tmp_path, capsys, monkeypatch):
    """The loss propagates NaN inputs; the trainer's guard covers every term."""
    import fastunlearn.trainer as trainer

    real = trainer.micro_batch_loss

    def nan_mismatch(*a, **k):
        out = real(*a, **k)
        out.mismatch_nll = out.mismatch_nll * float("nan")
        return out

    monkeypatch.setattr(trainer, "micro_batch_loss", nan_mismatch)
    out = tmp_path / "run"
    refused(base_args(inputs, out) + ["train.steps=1", "eval.enabled=false"],
            "mismatch_nll=nan", inputs, tmp_path, capsys, out=out)


def test_divergence_guard(inputs, tmp_path, capsys):
    out = tmp_path / "run"
    refused(base_args(inputs, out) + ["train.max_normal_kl=1e-12", "eval.enabled=false"],
            "training diverged", inputs, tmp_path, capsys, out=out)


# ------------------------------------------------------------------- other commands
def test_collect_never_writes_over_its_input(inputs, tmp_path, capsys):
    src = inputs / "prompts.forget.jsonl"
    refused(["collect", "--prompts", str(src), "--model", str(inputs / "model"),
             "--out", str(src)], "also an input", inputs, tmp_path, capsys)


def test_collect_out_exists(inputs, tmp_path, capsys):
    refused(["collect", "--prompts", str(inputs / "prompts.forget.jsonl"),
             "--model", str(inputs / "model"), "--out", str(inputs / "forget.jsonl")],
            "exists", inputs, tmp_path, capsys)


def test_collect_bad_argument_is_one_line(inputs, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["collect", "--prompts"])
    assert exc.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def eval_args(inputs, out):
    return ["eval", "--model", str(inputs / "model"), "--recipe", "harmful", "--device", "cpu",
            "--no-generate", "--n-harmful", "2", "--n-normal", "2", "--n-xstest", "0",
            "--n-likelihood", "2", "--max-length", "64", "--no-progress", "--out", str(out)]


def test_eval_out_is_an_existing_file(inputs, tmp_path, capsys):
    refused(eval_args(inputs, inputs / "a_file"), "is a file", inputs, tmp_path, capsys)


def test_eval_out_is_a_finished_run(inputs, tmp_path, capsys):
    run = tmp_path / "finished"
    run.mkdir()
    (run / "summary.json").write_text('{"steps": 3}\n')
    (run / "summary.md").write_text("# the run's report\n")
    refused(eval_args(inputs, run), "not empty", inputs, tmp_path, capsys)


# --------------------------------------------------------- owned by the data-file reader
def test_csv_with_a_stray_quote(inputs, tmp_path, capsys):
    out = tmp_path / "run"
    refused(base_args(inputs, out) + [f"data.forget_file={inputs / 'stray_quote.csv'}"],
            "check the quotes", inputs, tmp_path, capsys, out=out)


def test_csv_with_a_duplicate_header(inputs, tmp_path, capsys):
    out = tmp_path / "run"
    refused(base_args(inputs, out) + [f"data.forget_file={inputs / 'dup_header.csv'}"],
            "appears twice", inputs, tmp_path, capsys, out=out)


def test_whitespace_answer_in_the_heldout_split(inputs, tmp_path, capsys):
    rows = [{"prompt": f"p{i}", "answer": " " if i == 0 else f"a{i}"} for i in range(6)]
    f = write_jsonl(tmp_path / "ws.jsonl", rows)
    out = tmp_path / "run"
    refused(base_args(inputs, out) + [f"data.forget_file={f}", "data.n_heldout=5"],
            "blank", inputs, tmp_path, capsys, out=out)


def test_unusable_judge(inputs, tmp_path, capsys):
    out = tmp_path / "run"
    refused(base_args(inputs, out) + ["eval.judge=/nonexistent", "eval.generate=true",
                                      "eval.max_new_tokens=2", "train.steps=1"],
            "judge", inputs, tmp_path, capsys, out=out)


# --------------------------------------------------------------- signals and concurrency
def _start_run(inputs, out, steps):
    """A real ``fastunlearn run`` in another process; returns it once its lock folder exists."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = base_args(inputs, out) + [f"train.steps={steps}", "eval.enabled=false"]
    proc = subprocess.Popen([sys.executable, "-m", "fastunlearn", *argv], cwd=out.parent,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = out.parent / f".{out.name}.partial"
    deadline = time.time() + 120
    while not (lock / "metrics.jsonl").exists():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise AssertionError(f"run did not start: {proc.communicate()}")
        time.sleep(0.2)
    return proc


def test_concurrent_run_and_sigterm(inputs, tmp_path, capsys):
    """Two runs to the same --out: the second fails at once in one line. SIGTERM then stops
    the first like Ctrl-C: exit 2, one line, and its unfinished output is removed."""
    import signal

    out = tmp_path / "run"
    first = _start_run(inputs, out, steps=100000)
    try:
        before = snapshot(inputs)
        code = main(base_args(inputs, out))
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1 and "another run" in err, err
        assert snapshot(inputs) == before
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=60)
    finally:
        first.kill()
    assert first.returncode == 2, err
    assert "terminated" in err and len(err.strip().splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []  # no output, no hidden partial folder


# ------------------------------------------------------------------ library inputs
def _loss_args(**changes):
    import torch

    g = torch.Generator().manual_seed(0)
    n, h, v = 6, 8, 16
    args = dict(hidden=torch.randn(n, h, generator=g), weight=torch.randn(v, h, generator=g),
                labels=torch.randint(0, v, (n,), generator=g),
                kind=torch.tensor([0, 0, 1, 1, 2, 2]), ref_hidden=torch.randn(n, h, generator=g))
    args["ref_weight"] = args["weight"]
    args.update(changes)
    return args


def _meta_weight():
    import torch

    return torch.empty(16, 8, device="meta")


API_CASES = [
    ("meta weight, cpp", "cpp", lambda: {"weight": _meta_weight()}, "meta"),
    ("meta weight, chunked", "chunked", lambda: {"weight": _meta_weight()}, "meta"),
    ("kind 3, reference", "reference",
     lambda: {"kind": __import__("torch").tensor([0, 0, 1, 3, 2, 2])}, "kind"),
    ("kind -1, reference", "reference",
     lambda: {"kind": __import__("torch").tensor([0, 0, 1, -1, 2, 2])}, "kind"),
    ("integer hidden, reference", "reference",
     lambda: {"hidden": __import__("torch").ones(6, 8, dtype=__import__("torch").long)},
     "hidden"),
]


@pytest.mark.parametrize("backend, changes, message", [c[1:] for c in API_CASES],
                         ids=[c[0] for c in API_CASES])
def test_loss_refuses_bad_tensors(backend, changes, message):
    from fastunlearn import unlearn_loss
    from fastunlearn.losses import resolve_backend

    try:
        resolve_backend(backend, "cpu")
    except Exception as exc:  # noqa: BLE001 - the cpp extension may not build here
        pytest.skip(f"backend {backend} unavailable: {exc}")
    with pytest.raises(ValueError, match=message) as exc:
        unlearn_loss(**_loss_args(**changes()), backend=backend)
    assert len(str(exc.value).splitlines()) == 1


def test_loss_propagates_nan_inputs():
    """Documented: NaN inputs give a NaN loss (the trainer's guard then stops the run)."""
    import torch

    from fastunlearn import unlearn_loss

    out = unlearn_loss(**_loss_args(hidden=torch.full((6, 8), float("nan"))), backend="chunked")
    assert torch.isnan(out.loss)


def test_reference_cache_with_foreign_objects(tmp_path):
    """A cache file holding pickled objects is never unpickled: one line naming the cache."""
    import torch

    from fastunlearn.reference_cache import ReferenceCache

    class Foreign:
        def __reduce__(self):
            return (print, ("this would run",))

    path = tmp_path / "refcache-x.pt"
    torch.save({"meta": Foreign()}, path)
    with pytest.raises(ValueError, match="reference cache") as exc:
        ReferenceCache.load(path)
    assert len(str(exc.value).splitlines()) == 1
