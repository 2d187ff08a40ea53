"""benchmarks/plot_runs.py: curves of finished runs, one-line errors for bad arguments."""
import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "plot_runs.py"


def _module():
    spec = importlib.util.spec_from_file_location("plot_runs", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run_dir(path: Path, steps: int) -> Path:
    path.mkdir()
    rows = [{"step": i + 1, "forget_nll": 1.0 + i, "mismatch_nll": 3.0, "normal_kl": 0.01 * i}
            for i in range(steps)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_writes_a_png(tmp_path):
    mod = _module()
    a, b = _run_dir(tmp_path / "a", 5), _run_dir(tmp_path / "b", 3)
    out = tmp_path / "plots" / "curves.png"
    assert mod.main([str(out), f"fp32={a}", f"bf16={b}"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_moving_average():
    assert _module().moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]


def test_bad_arguments(tmp_path, capsys):
    mod = _module()
    out = tmp_path / "x.png"
    assert mod.main([str(out)]) == 2
    assert mod.main([str(out), "no-label"]) == 2
    assert "LABEL=RUN_DIR" in capsys.readouterr().err
    assert mod.main([str(out), f"a={tmp_path / 'missing'}"]) == 2
    assert "no such file" in capsys.readouterr().err
    assert not out.exists()
