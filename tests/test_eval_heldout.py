"""``fastunlearn eval`` evaluates on held-out rows only: a run's own, or a count-free split."""
import json

import pytest

from fastunlearn.config import DataSection, RunConfig
from fastunlearn.eval import cli as eval_cli
from fastunlearn.eval.heldout import HELDOUT_FILE, read_heldout
from fastunlearn.inputs import load_training_data
from fastunlearn.trainer import Trainer
from tests.tiny_model import tiny_llama, tiny_tokenizer


def _prompts(pairs):
    return {p.prompt for p in pairs}


@pytest.fixture
def recorded(monkeypatch):
    """Every Evaluator the eval CLI builds, and a tiny model in place of any model spec."""
    made = []

    class Recording(eval_cli.Evaluator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(eval_cli, "Evaluator", Recording)
    monkeypatch.setattr(eval_cli, "_load",
                        lambda spec, device: (tiny_llama(128, seed=1), tiny_tokenizer()))
    return made


def _run(tmp_path, **data):
    cfg = RunConfig()
    cfg.data.max_prompt_length = 24  # the tiny tokenizer is character-level
    for k, v in data.items():
        setattr(cfg.data, k, v)
    cfg.train.steps, cfg.train.device, cfg.train.batch_size = 1, "cpu", 1
    cfg.eval.enabled, cfg.save_model = False, False
    trainer = Trainer(cfg, model=tiny_llama(128), tokenizer=tiny_tokenizer(), progress=False)
    trainer.run(tmp_path / "run")
    return trainer, tmp_path / "run"


def _eval(tmp_path, *args):
    return eval_cli.eval_main([*args, "--device", "cpu", "--no-generate", "--no-progress",
                               "--n-likelihood", "64", "--out", str(tmp_path / "ev")])


def test_eval_of_a_run_uses_its_heldout_rows_and_max_length(tmp_path, recorded):
    trainer, run = _run(tmp_path, n_forget=6, n_normal=6, max_length=56, seed=3)
    assert (run / HELDOUT_FILE).exists()
    assert _eval(tmp_path, "--model", str(run / "model")) == 0
    ev = recorded[-1]
    assert ev.cfg.max_length == 56
    trained = _prompts(trainer.recipe.forget) | _prompts(trainer.recipe.normal)
    used = _prompts(ev.forget_pairs) | _prompts(ev.normal_pairs) | set(ev.harmful_prompts) \
        | set(ev.forget_prompts)
    assert used and not used & trained
    assert ev.forget_pairs == trainer.recipe.heldout_forget[:64]
    assert ev.normal_pairs == trainer.recipe.heldout_normal[:64]
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["heldout_source"].endswith(HELDOUT_FILE)


def test_eval_of_a_run_with_user_files_uses_those_rows(tmp_path, recorded):
    rows = [{"prompt": f"do bad thing {i}", "answer": f"bad answer {i}"} for i in range(12)]
    forget = tmp_path / "forget.jsonl"
    forget.write_text("".join(json.dumps(r) + "\n" for r in rows))
    trainer, run = _run(tmp_path, forget_file=str(forget), n_heldout=3, n_normal=4,
                        max_length=48)
    assert _eval(tmp_path, "--run", str(run)) == 0
    ev = recorded[-1]
    assert ev.forget_pairs == trainer.recipe.heldout_forget
    assert _prompts(ev.forget_pairs) <= {r["prompt"] for r in rows}
    assert not _prompts(ev.forget_pairs) & _prompts(trainer.recipe.forget)


def test_eval_without_run_never_overlaps_a_default_run(tmp_path, recorded):
    """The requested counts (64 likelihood pairs) must not grow the held-out split into rows a
    default run (data.n_heldout=16, same seed) trains on."""
    assert _eval(tmp_path, "--model", "some-model", "--recipe", "harmful") == 0
    ev = recorded[-1]
    run_data = load_training_data(DataSection())
    assert ev.forget_pairs and ev.normal_pairs
    assert not _prompts(ev.forget_pairs) & _prompts(run_data.forget)
    assert not _prompts(ev.normal_pairs) & _prompts(run_data.normal)
    assert not set(ev.forget_prompts) & _prompts(run_data.forget)


def test_eval_run_rejects_split_flags(tmp_path, recorded, capsys):
    _, run = _run(tmp_path, n_forget=4, n_normal=4, max_length=56)
    assert _eval(tmp_path, "--run", str(run), "--seed", "1") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --seed cannot be combined with a run") and "\n" not in err
    assert not recorded


def test_old_run_folder_is_split_again_from_its_config(tmp_path):
    trainer, run = _run(tmp_path, n_forget=4, n_normal=4, max_length=56, seed=5)
    (run / HELDOUT_FILE).unlink()
    data, info = read_heldout(run)
    assert data.heldout_forget == trainer.recipe.heldout_forget
    assert data.heldout_normal == trainer.recipe.heldout_normal
    assert info["max_length"] == 56


def test_heldout_file_keeps_a_chat_prompts_earlier_turns(tmp_path):
    from fastunlearn.data import Pair, RecipeData
    from fastunlearn.data_files import ChatPrompt
    from fastunlearn.eval.heldout import write_heldout

    chat = ChatPrompt((("user", "hi"), ("assistant", "hello"), ("user", "and then?")))
    data = RecipeData("mine", [], [], [Pair(chat, "an answer", False)], [Pair("q?", "a.")])
    write_heldout(tmp_path, data, DataSection())
    back, _ = read_heldout(tmp_path)
    [pair] = back.heldout_forget
    assert pair.prompt.turns == chat.turns and pair.complete is False
    assert back.heldout_normal[0].prompt == "q?"
