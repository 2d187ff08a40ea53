"""``fastunlearn`` end to end on a tiny model saved to disk, and every bad input."""
import json
import os
import stat

import pytest
import torch
from transformers import AutoModelForCausalLM

from fastunlearn.cli import main
from tests.tiny_model import tiny_llama, tiny_tokenizer, write_jsonl, write_tiny_run_inputs


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_run_inputs(tmp_path_factory.mktemp("tiny"))


def base_args(d, out):
    return ["run", "--quiet", "--out", str(out), f"model.name={d / 'model'}",
            f"data.forget_file={d / 'forget.jsonl'}", f"data.normal_file={d / 'normal.jsonl'}",
            "data.normal_prompt_column=q", "data.normal_answer_column=a", "data.n_heldout=2",
            "data.max_length=48", "train.steps=3", "train.lr=1e-3", "train.device=cpu",
            "eval.generate=false",
            # the paper's loss: a random tiny model gives SimNPO (the default) almost no gradient
            "loss.method=paper", "loss.eps_normal=1"]


def test_run_end_to_end_and_reload(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(base_args(tiny_dir, out)) == 0
    assert "report:" in capsys.readouterr().out
    for name in ("config.json", "metrics.jsonl", "summary.json", "summary.md", "model"):
        assert (out / name).exists(), name
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3
    row = json.loads(lines[-1])
    assert {"step", "loss", "forget_nll", "mismatch_nll", "normal_kl", "lr"} <= set(row)
    summary = json.loads((out / "summary.json").read_text())
    for key in ("steps", "wall_seconds", "backend", "tokens_per_second"):
        assert key in summary
    for when in ("before", "after"):
        assert {"forget_nll", "normal_kl"} <= set(summary[when])
    assert summary["after"]["forget_nll"] > summary["before"]["forget_nll"]
    # Save / reload round trip: the saved model differs from the original and loads back.
    reloaded = AutoModelForCausalLM.from_pretrained(out / "model")
    original = AutoModelForCausalLM.from_pretrained(tiny_dir / "model")
    diff = sum((a - b).abs().sum() for a, b in zip(reloaded.parameters(),
                                                     original.parameters()))
    assert diff > 0
    assert (out / "model" / "model.safetensors").exists()
    assert (out / "model" / "tokenizer_config.json").exists()
    # No stray partial folders left next to the output; plain permissions (not 0700 / 0600).
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((out / "summary.json").stat().st_mode) == 0o666 & ~umask


def _fails(args, capsys, message, tmp_path):
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()
    assert not any(p.name.startswith(".run") for p in tmp_path.iterdir())


def test_missing_forget_file(tiny_dir, tmp_path, capsys):
    args = base_args(tiny_dir, tmp_path / "run") + [f"data.forget_file={tmp_path / 'nope.jsonl'}"]
    _fails(args, capsys, "nope.jsonl", tmp_path)


def test_missing_column(tiny_dir, tmp_path, capsys):
    args = base_args(tiny_dir, tmp_path / "run") + ["data.answer_column=response"]
    _fails(args, capsys, "response", tmp_path)


def test_empty_forget_set(tiny_dir, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    args = base_args(tiny_dir, tmp_path / "run") + [f"data.forget_file={empty}"]
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2 and "empty" in err.lower()


def test_answer_with_no_tokens(tiny_dir, tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "answer": ""}] * 4)
    args = base_args(tiny_dir, tmp_path / "run") + [f"data.forget_file={bad}"]
    assert main(args) == 2
    assert "answer" in capsys.readouterr().err.lower()


def test_unknown_key_suggests(tiny_dir, tmp_path, capsys):
    _fails(base_args(tiny_dir, tmp_path / "run") + ["train.stepss=3"], capsys,
           "did you mean 'train.steps'", tmp_path)


def test_wrong_type(tiny_dir, tmp_path, capsys):
    _fails(base_args(tiny_dir, tmp_path / "run") + ["train.batch_size=two"], capsys,
           "expects an integer", tmp_path)


def test_unavailable_backend(tiny_dir, tmp_path, capsys):
    _fails(base_args(tiny_dir, tmp_path / "run") + ["loss.backend=nosuch"], capsys,
           "backend 'nosuch' is not available", tmp_path)


def test_missing_model(tiny_dir, tmp_path, capsys):
    _fails(base_args(tiny_dir, tmp_path / "run") + [f"model.name={tmp_path / 'nomodel'}"],
           capsys, "does not exist", tmp_path)


def test_reference_vocab_mismatch(tiny_dir, tmp_path, capsys):
    other = tmp_path / "other"
    tiny_llama(160, seed=1).save_pretrained(other)
    tiny_tokenizer().save_pretrained(other)
    args = base_args(tiny_dir, tmp_path / "run") + [f"model.reference_name={other}"]
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2 and "vocabulary" in err


def test_tokenizer_without_pad_token(tmp_path, capsys):
    d = tmp_path / "nopad"
    tiny_llama(128, seed=0).save_pretrained(d / "model")
    tok = tiny_tokenizer(pad=False)
    assert tok.pad_token is None
    tok.save_pretrained(d / "model")
    write_jsonl(d / "forget.jsonl", [{"prompt": f"x{i}", "answer": f"y{i}"} for i in range(8)])
    write_jsonl(d / "normal.jsonl", [{"q": f"q{i}", "a": f"a{i}"} for i in range(8)])
    out = tmp_path / "out"
    assert main(base_args(d, out)) == 0, capsys.readouterr().err
    assert (out / "summary.json").exists()


def test_backends_command(capsys):
    assert main(["backends"]) == 0
    text = capsys.readouterr().out
    assert "chunked" in text and "available" in text


def test_output_dir_not_empty(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "x").write_text("keep")
    assert main(base_args(tiny_dir, out)) == 2
    assert "not empty" in capsys.readouterr().err
    assert (out / "x").read_text() == "keep"


def test_help_lists_options(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    assert "train.lr" in capsys.readouterr().out


def test_grad_accum_and_sum_equivalence_smoke(tiny_dir, tmp_path):
    out = tmp_path / "acc"
    assert main(base_args(tiny_dir, out) + ["train.grad_accum=2", "train.batch_size=1"]) == 0
    assert torch.isfinite(torch.tensor(
        json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["loss"]))


def test_cached_reference_run(tiny_dir, tmp_path):
    """model.reference=cached keeps its cache inside the run folder; the output appears whole."""
    out = tmp_path / "run"
    assert main(base_args(tiny_dir, out) + ["model.reference=cached"]) == 0
    assert (out / "summary.json").exists() and (out / "refcache").is_dir()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["after"]["normal_kl"] > 0  # measured against the first state's snapshot
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_version(capsys):
    from fastunlearn import __version__

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"fastunlearn {__version__}"


def test_debug_shows_the_traceback(capsys):
    assert main(["--debug", "run", "train.steps=nan"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("fastunlearn: error:")


def test_internal_bug_says_so(monkeypatch, capsys):
    import fastunlearn.cli as cli

    def broken(args):
        raise TypeError("unsupported operand")

    monkeypatch.setattr(cli, "cmd_backends", broken)
    assert main(["backends"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "internal error (a bug in fastunlearn" in err


def test_overrides_before_and_after_options(tiny_dir, tmp_path):
    out = tmp_path / "run"
    args = base_args(tiny_dir, out)
    args = ["run", "train.warmup_steps=1", *args[1:], "--quiet", "train.weight_decay=0.01"]
    assert main(args) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["train"]["warmup_steps"] == 1 and cfg["train"]["weight_decay"] == 0.01
