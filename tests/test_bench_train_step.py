"""The train-step benchmark runs end to end in quick mode (figures are not asserted)."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_train_step.py"


def _module():
    spec = importlib.util.spec_from_file_location("bench_train_step", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quick_mode_writes_rows(tmp_path):
    out = tmp_path / "train_step_cpu_quick.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--device", "cpu",
                           "--out", str(out)], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env={**os.environ, "OUT": str(tmp_path / "o")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert (tmp_path / "o" / out.name).exists()  # $OUT copy
    assert [r["impl"] for r in rows] == ["paper", "ours", "ours+cached", "ours+lora",
                                         "ours+torchlin", "ours+lean", "ours+bf16w+sr"]
    for r in rows:
        assert "error" not in r, r
        for k in ("model", "B", "T", "impl", "ms_per_step", "tokens_per_s", "peak_gib",
                  "device", "torch", "commit", "backend"):
            assert k in r, k
        assert r["ms_per_step"] > 0 and r["tokens_per_s"] > 0 and r["peak_gib"] is not None
        assert r["tokens_per_step"] == 3 * r["B"] * r["T"]
    # Same data, same initial weights, one tiny AdamW step: both impls compute the same loss.
    paper = rows[0]["loss"]
    for r in rows[1:]:
        bf16 = r["weights"] == "bfloat16"
        assert r["loss"] == pytest.approx(paper, rel=3e-2 if bf16 else 1e-3), r["impl"]
    refs = {r["impl"]: r["reference"] for r in rows}
    assert refs == {"paper": "copy", "ours": "copy", "ours+cached": "cached",
                    "ours+lora": "adapters", "ours+torchlin": "copy", "ours+lean": "copy",
                    "ours+bf16w+sr": "copy"}
    optimizers = {r["impl"]: r.get("optimizer") for r in rows}
    assert optimizers["ours+bf16w+sr"] == "StochasticRoundingAdamW"
    assert optimizers["ours"] == "AdamW"
    gemms = {r["impl"]: r["linear_gemm"] for r in rows}
    assert gemms["paper"] == gemms["ours+torchlin"] == "torch"
    lora = next(r for r in rows if r["impl"] == "ours+lora")
    assert lora["trainable_params"] < rows[1]["trainable_params"]
    assert "paper" in proc.stdout and "ms/step" in proc.stdout  # the table


def test_parse_impl():
    mod = _module()
    assert mod.parse_impl("ours+lora+ckpt@chunked") == {
        "name": "ours", "backend": "chunked", "method": "paper", "lora": True, "cached": False,
        "bf16ref": False, "ckpt": True, "bf16w": False, "sr": False, "torchlin": False,
        "lean": False, "keepmem": False, "freemem": False}
    assert mod.parse_impl("paper")["name"] == "paper"
    assert mod.parse_impl("paper+keepmem")["keepmem"]
    assert mod.parse_impl("ours+freemem")["freemem"]
    assert mod.parse_impl("ours+npo+lean")["method"] == "npo"
    for bad in ("liger", "ours+fast", "paper+lora", "paper@chunked", "ours+sr", "paper+npo",
                "ours+npo+rmu",
                "ours+keepmem", "paper+freemem"):
        with pytest.raises(ValueError):
            mod.parse_impl(bad)


def test_bad_arguments_are_one_line_errors():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--impls", "ours+nope"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode != 0 and "unknown impl option 'nope'" in proc.stderr


def test_interleaved_rounds_pair_every_step_with_the_first_impls(tmp_path, capsys):
    """--interleave --rounds 2: every impl in one process, steps taken in turn, each round a
    row per impl with its paired ratio to the first impl (1 for the first itself); the losses
    are those of separate runs (each impl keeps its own model and optimizer)."""
    mod = _module()
    out = tmp_path / "inter.json"
    assert mod.main(["--quick", "--interleave", "--rounds", "2", "--steps", "2",
                     "--impls", "ours,ours+simnpo", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["impl"], r["round"]) for r in rows] == [("ours", 0), ("ours+simnpo", 0),
                                                      ("ours", 1), ("ours+simnpo", 1)]
    for r in rows:
        assert len(r["ms_all"]) == 2 and r["interleaved_with"] == ["ours", "ours+simnpo"]
        assert r["paired_ratio"] > 0 and r["peak_gib"] is None
    assert rows[0]["paired_ratio"] == rows[2]["paired_ratio"] == 1.0
    assert rows[0]["loss"] == pytest.approx(rows[2]["loss"], rel=1e-5)  # fresh build per round
    assert "paired / first" in capsys.readouterr().out
