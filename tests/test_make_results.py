"""benchmarks/make_results.py: RESULTS.md is generated from the JSON rows, and kept current."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "make_results.py"


def _run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)


def test_tables_come_from_the_json_rows(tmp_path):
    rows = [{"model": "m", "B": 2, "T": 8, "impl": "paper", "backend": "hf",
             "ms_per_step": 400.0, "device": "cpu", "commit": "abc1234"},
            {"model": "m", "B": 2, "T": 8, "impl": "ours", "backend": "cpp",
             "ms_per_step": 100.0, "device": "cpu", "commit": "abc1234"}]
    (tmp_path / "train_step_cpu.json").write_text(json.dumps(rows))
    out = tmp_path / "RESULTS.md"
    assert _run("--results", str(tmp_path), "--out", str(out)).returncode == 0
    text = out.read_text()
    assert "| m | 2 x 8 | - | ours | cpp | 100 |" in text and "4.00x" in text
    assert "commit: abc1234" in text
    assert _run("--results", str(tmp_path), "--out", str(out), "--check").returncode == 0
    out.write_text(text + "edited by hand\n")
    assert _run("--results", str(tmp_path), "--out", str(out), "--check").returncode == 1


def test_interleaved_rows_get_their_paired_ratio_column(tmp_path):
    rows = [{"model": "m", "B": 2, "T": 8, "impl": impl, "backend": "cpp", "ms_per_step": ms,
             "device": "cpu", "commit": "abc1234", "paired_ratio": ratio, "round": 0}
            for impl, ms, ratio in (("ours", 100.0, 1.0), ("ours+npo", 103.0, 1.021))]
    (tmp_path / "train_step_cpu_paired.json").write_text(json.dumps(rows))
    out = tmp_path / "RESULTS.md"
    assert _run("--results", str(tmp_path), "--out", str(out)).returncode == 0
    text = out.read_text()
    assert "paired / first" in text and "| m | 2 x 8 | 0 | ours+npo | cpp | 103 |" in text
    assert text.rstrip().endswith("| 1.02 |")


def test_repository_results_file_is_current():
    done = _run("--check")
    assert done.returncode == 0, done.stderr
