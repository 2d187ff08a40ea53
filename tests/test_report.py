"""write_report: files exist, JSON parses, markdown has the table and samples, PNGs are PNGs."""
import json

import pytest

from fastunlearn.report import write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _metrics(harm, sim, kl, answer):
    return {"forget_nll": 2.0 + harm, "normal_kl": kl, "harmful_rate": harm,
            "refusal_rate": 1 - harm, "normal_similarity_cosine": sim, "normal_rouge_l": sim,
            "degenerate_rate_harmful": 0.0, "degenerate_rate_normal": 0.0,
            "samples": [{"kind": "harmful", "prompt": "How to do a bad thing?",
                         "answer": answer},
                        {"kind": "normal", "prompt": "Capital | of France?", "answer": "Paris"}]}


def _summary(evals):
    before = _metrics(0.8, 1.0, 0.0, "Sure, step 1 ...")
    after = _metrics(0.1, 0.9, 0.05, "   ")
    after["forget_nll"] = float("nan")  # non-finite must still give valid JSON
    s = {"steps": 10, "wall_seconds": 12.5, "backend": "chunked", "tokens_per_second": 1000.0,
         "config": {"loss": {"eps_forget": 0.5}}, "model": "tiny", "recipe": "harmful",
         "before": before, "after": after, "stopped_early": False}
    if evals == "during":
        s["evals"] = [{"step": 0, **before}, {"step": 5, **_metrics(0.5, 0.95, 0.02, "no")},
                      {"step": 10, **after}]
    elif evals == "before_after":
        s["evals"] = [{"step": 0, **before}, {"step": 10, **after}]
    return s


ROWS = [{"step": i, "loss": 1.0 - 0.1 * i, "forget_nll": 2.0 + i, "mismatch_nll": 3.0,
         "normal_kl": 0.01 * i, "lr": 2e-6, "grad_norm": 1.0, "tokens_per_s": 100.0}
        for i in range(1, 11)]


@pytest.mark.parametrize("evals", ["during", "before_after", "missing"])
def test_write_report_files(tmp_path, evals):
    write_report(tmp_path, _summary(evals), ROWS)
    summary = json.loads((tmp_path / "summary.json").read_text())  # strict parse
    assert summary["after"]["forget_nll"] is None and summary["steps"] == 10
    md = (tmp_path / "summary.md").read_text()
    assert "| metric | before | after | delta |" in md
    assert "| harmful_rate | 0.8 | 0.1 | -0.7 |" in md
    assert "How to do a bad thing?" in md and "Sure, step 1" in md
    assert "*(whitespace only, 3 chars)*" in md  # collapsed output is visible
    assert "Capital \\| of France?" in md  # pipes escaped in table cells
    assert ("Evaluations during training" in md) == (evals == "during")
    pngs = sorted(p.name for p in (tmp_path / "plots").glob("*.png"))
    assert pngs == ["degeneration.png", "harm_utility.png", "kl.png", "losses.png"]
    for name in pngs:
        assert (tmp_path / "plots" / name).read_bytes()[:8] == PNG_MAGIC
        assert f"(plots/{name})" in md


def test_write_report_missing_metrics_and_rows(tmp_path):
    s = {"model": "m", "recipe": "harmful", "before": {"forget_nll": 1.0},
         "after": {"forget_nll": 3.0, "samples": []}, "evals": []}
    write_report(tmp_path, s, [])
    md = (tmp_path / "summary.md").read_text()
    assert "| forget_nll | 1 | 3 | +2 |" in md
    assert json.loads((tmp_path / "summary.json").read_text())["model"] == "m"
    # no loss rows, no harm / KL / degeneration data: those plots are skipped, no crash
    assert not (tmp_path / "plots" / "losses.png").exists()


def test_write_report_rejects_non_dict(tmp_path):
    with pytest.raises(ValueError):
        write_report(tmp_path, [], [])
