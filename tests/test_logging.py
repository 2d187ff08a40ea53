"""Logging: silent library by default, info lines from the CLI, the TensorBoard sink, and the
defaults that ``run --help`` shows."""
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastunlearn import log
from fastunlearn.cli import main
from fastunlearn.config import ConfigError, describe_options, load_config
from fastunlearn.metrics_log import MetricsLog, MetricsLogError
from tests.test_packaging import _lean
from tests.tiny_model import tiny_llama, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def restore_logger():
    """The CLI configures the ``fastunlearn`` logger for the process: undo it after each test."""
    logger = logging.getLogger("fastunlearn")
    handlers, level = list(logger.handlers), logger.level
    yield
    logger.handlers[:] = handlers
    logger.setLevel(level)


def _python(script: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)


# ------------------------------------------------------------------ library vs command line

def test_library_prints_no_info_but_shows_warnings_without_setup():
    """A program that imports fastunlearn and configures nothing: Python's defaults."""
    r = _python(
        "import logging\n"
        "import fastunlearn, fastunlearn.reference_cache, fastunlearn.cpu_linear\n"
        "import fastunlearn.outputs, fastunlearn.losses._build, fastunlearn.config\n"
        "from fastunlearn.log import get_logger\n"
        "root = logging.getLogger('fastunlearn')\n"
        "assert root.handlers == [] and root.level == logging.NOTSET, root\n"
        "get_logger('fastunlearn.reference_cache').info('INFO-LINE')\n"
        "get_logger('trainer').warning('WARN-LINE')\n")
    assert r.returncode == 0, r.stderr
    assert r.stderr == "WARN-LINE\n" and r.stdout == ""


def test_compile_notice_shows_without_logging_setup():
    """The first build of an extension takes minutes: a library user sees the notice too."""
    r = _python(
        "from torch.utils import cpp_extension\n"
        "from fastunlearn.losses import _build\n"
        "_build.shutil.which = lambda _: '/usr/bin/ninja'\n"
        "cpp_extension.load = lambda **kw: 'module'\n"
        "_build._compile('demo_ext', ['a.cpp'], _build.Path('/nonexistent'), [], [], [], "
        "False)\n")
    assert r.returncode == 0, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "compiling the C++ extension 'demo_ext'" in lines[0], r.stderr


def test_configure_formats_one_line_and_replaces_itself(capsys):
    log.configure("info")
    log.configure("info")  # again: still one handler
    log.get_logger("trainer").info("step 3 done")
    log.get_logger("trainer").debug("not shown")
    assert capsys.readouterr().err == "fastunlearn: step 3 done\n"
    log.configure("warning")
    log.get_logger("trainer").info("hidden")
    log.get_logger("trainer").warning("shown")
    assert capsys.readouterr().err == "fastunlearn: shown\n"
    with pytest.raises(ValueError, match="verbosity"):
        log.configure("loud")


def test_configure_shows_info_on_rank_zero_only(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    log.configure("info")
    log.get_logger().info("from rank 1")
    log.get_logger().warning("warning from rank 1")
    assert capsys.readouterr().err == "fastunlearn: warning from rank 1\n"


def test_reference_cache_says_whether_it_computes_or_reuses(tmp_path, caplog):
    from fastunlearn.losses import KIND_NORMAL
    from fastunlearn.reference_cache import load_or_build_cache
    from fastunlearn.step import ReferenceRunner
    from tests.test_reference_cache import _setup

    tok, model, ref, rows = _setup()
    kw = dict(device="cpu", compute_dtype=torch.float32, pad_id=tok.pad_token_id)
    with caplog.at_level(logging.INFO, logger="fastunlearn"):
        for _ in range(2):
            load_or_build_cache(ReferenceRunner(model, ref), rows[KIND_NORMAL], tmp_path, **kw)
    said = [r.getMessage() for r in caplog.records if r.name == "fastunlearn.reference_cache"]
    assert len(said) == 2
    assert said[0].startswith("reference cache: computing") and "reusing" in said[1]


@pytest.fixture(scope="module")
def tiny_run_inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    tiny_llama(128, seed=0).save_pretrained(d / "model")
    tiny_tokenizer().save_pretrained(d / "model")
    for name, rows in (("forget", [{"prompt": f"bad request {i}", "answer": f"bad answer {i}"}
                                   for i in range(8)]),
                       ("normal", [{"prompt": f"what is {i}?", "answer": f"it is {i}."}
                                   for i in range(8)])):
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def _run_args(d, out, *extra):
    return ["run", "--out", str(out), f"model.name={d / 'model'}",
            f"data.forget_file={d / 'forget.jsonl'}", f"data.normal_file={d / 'normal.jsonl'}",
            "data.n_heldout=2", "data.max_length=48", "train.steps=3", "train.lr=1e-3",
            "train.device=cpu", "eval.generate=false", *extra]


def test_cli_shows_info_lines_and_quiet_hides_them(tiny_run_inputs, tmp_path, capsys):
    args = _run_args(tiny_run_inputs, tmp_path / "a", "model.reference=cached")
    assert main(args) == 0
    err = capsys.readouterr().err
    assert re.search(r"^fastunlearn: reference cache: computing .* normal rows", err, re.M), err
    quiet = _run_args(tiny_run_inputs, tmp_path / "b", "model.reference=cached", "--quiet")
    assert main(quiet) == 0
    assert "reference cache" not in capsys.readouterr().err


# ------------------------------------------------------------------------------ TensorBoard

ROWS = [{"step": s, "loss": 1.0 / s, "forget_nll": 0.5 * s, "lr": 1e-5, "clipped": s == 2,
         "note": "text", "grad_norm": None} for s in (1, 2, 3)]


def _scalars(board_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(board_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_sink_writes_every_number_of_every_step(tmp_path):
    pytest.importorskip("tensorboard")
    with MetricsLog(tmp_path, "tensorboard") as metrics:
        for row in ROWS:
            metrics.step(row)
        metrics.evaluation({"step": 3, "forget_nll": 2.5, "samples": ["a"]})
    assert [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] \
        == ROWS
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0
    got = _scalars(tmp_path / "tensorboard")
    assert set(got) == {"train/loss", "train/forget_nll", "train/lr", "eval/forget_nll"}
    assert [s for s, _ in got["train/loss"]] == [1, 2, 3]
    assert [v for _, v in got["train/loss"]] == pytest.approx([1.0, 0.5, 1 / 3])
    assert got["eval/forget_nll"] == [(3, 2.5)]


def test_metrics_log_of_other_ranks_writes_nothing(tmp_path):
    pytest.importorskip("tensorboard")
    with MetricsLog(tmp_path, "tensorboard", enabled=False) as metrics:
        metrics.step(ROWS[0])
        metrics.evaluation({"step": 1, "forget_nll": 1.0})
    assert list(tmp_path.iterdir()) == []


def test_without_tensorboard_setup_fails_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    with pytest.raises(MetricsLogError, match=r"pip install tensorboard$") as e:
        MetricsLog(tmp_path, "tensorboard", enabled=False)
    assert "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []
    with MetricsLog(tmp_path, "none") as metrics:  # metrics.jsonl needs nothing
        metrics.step(ROWS[0])
    assert (tmp_path / "metrics.jsonl").exists()


def test_report_to_is_validated_without_importing_tensorboard(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    assert load_config(None, ["train.report_to=tensorboard"]).train.report_to == "tensorboard"
    with pytest.raises(ConfigError, match="train.report_to must be none or tensorboard"):
        load_config(None, ["train.report_to=wandb"])


def test_cli_run_reports_to_tensorboard(tiny_run_inputs, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    assert main(_run_args(tiny_run_inputs, out, "--quiet", "train.report_to=tensorboard")) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    got = _scalars(out / "tensorboard")
    assert [s for s, _ in got["train/loss"]] == [1, 2, 3]
    assert [v for _, v in got["train/loss"]] == pytest.approx([r["loss"] for r in rows])
    assert {s for s, _ in got["eval/forget_nll"]} == {0, 3}


# ----------------------------------------------------------------------------- help defaults

def _help_values(text: str) -> dict[str, str]:
    return dict(re.findall(r"^  ([\w.]+) = (.*)$", text, re.M))


def test_run_help_shows_what_the_default_config_runs_with(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    shown = _help_values(capsys.readouterr().out)
    assert shown["train.steps"] == "80 (built-in default 1000)"
    assert shown["train.lr"] == "5e-05 (built-in default 2e-06)"
    # Every key: the value a plain `fastunlearn run` uses, from the bundled YAML.
    cfg = load_config("default").to_dict()
    for key, text in shown.items():
        section, _, name = key.rpartition(".")
        value = cfg[section][name] if section else cfg[name]
        assert text.split(" (built-in default")[0] == repr(value), key


def test_help_without_pyyaml_falls_back_to_built_in_defaults():
    r = _lean("run", "--help")
    assert r.returncode == 0, r.stderr[-3000:]
    shown = _help_values(r.stdout)
    assert shown["train.steps"] == "1000" and shown["train.lr"] == "2e-06"
    assert "PyYAML" in r.stdout
    assert "(built-in default" in describe_options()  # here, with PyYAML: the bundled values


def test_cli_main_leaves_no_handler_behind(capsys):
    """After an in-process main(), the library is silent at info level again."""
    import logging

    from fastunlearn import cli

    cli.main(["configs"])
    capsys.readouterr()
    logging.getLogger("fastunlearn.test").info("not shown")
    assert "not shown" not in capsys.readouterr().err
