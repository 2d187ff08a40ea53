"""Trainer on a tiny random Llama: the loop, accumulation, reference handling."""
import copy
import random

import pytest
import torch

from fastunlearn.batching import UnlearnBatcher
from fastunlearn.config import RunConfig
from fastunlearn.data import Pair, RecipeData
from fastunlearn.inputs import tokenize_all
from fastunlearn.losses import unlearn_loss_ref
from fastunlearn.models import frozen_copy, head_of
from fastunlearn.step import LossWeights, ReferenceRunner, micro_batch_loss, valid_positions
from fastunlearn.trainer import Trainer
from tests.tiny_model import tiny_llama, tiny_tokenizer

FORGET = [Pair(f"how to do bad thing {i}?", f"step one: bad {i}. step two: worse.")
          for i in range(12)]
NORMAL = [Pair(f"what is {i} plus {i}?", f"{i} plus {i} is {2 * i}.") for i in range(12)]


def tiny_recipe():
    return RecipeData(name="tiny", forget=FORGET[:9], normal=NORMAL[:9],
                      heldout_forget=FORGET[9:], heldout_normal=NORMAL[9:], extra={},
                      sources=["test"])


def tiny_cfg(**train):
    cfg = RunConfig()
    cfg.data.max_length = 64
    cfg.data.max_prompt_length = 32
    cfg.train.steps = train.pop("steps", 20)
    cfg.train.lr = train.pop("lr", 3e-3)
    cfg.train.device = "cpu"
    cfg.eval.enabled = False
    cfg.save_model = False
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


def make_trainer(cfg, seed=0):
    tok = tiny_tokenizer()
    return Trainer(cfg, model=tiny_llama(128, seed=seed), tokenizer=tok, recipe=tiny_recipe(),
                   progress=False)


def heldout_forget_nll(trainer):
    rows = tokenize_all(trainer.tokenizer, trainer.recipe, trainer.cfg.data)[0]
    batch = UnlearnBatcher([rows, rows, rows], len(rows), trainer.tokenizer.pad_token_id, 0,
                           bucket=False).next()
    w = LossWeights(1.0, 0.0, 0.0)
    with torch.no_grad():
        out = micro_batch_loss(trainer.policy, trainer.ref_runner, batch, w,
                               device=torch.device("cpu"), compute_dtype=trainer.compute_dtype)
    return float(out.forget_nll)


def test_trainer_unlearns_and_keeps_reference_frozen():
    trainer = make_trainer(tiny_cfg(steps=20))
    trainer.setup()
    before_params = copy.deepcopy(trainer.policy.state_dict())
    ref_params = copy.deepcopy(trainer.reference.state_dict())
    nll_before = heldout_forget_nll(trainer)
    rows = [trainer.train_step() for _ in range(20)]
    nll_after = heldout_forget_nll(trainer)
    assert nll_after > nll_before + 0.5, (nll_before, nll_after)
    changed = [k for k, v in trainer.policy.state_dict().items()
               if not torch.equal(v, before_params[k])]
    assert changed, "no parameter changed"
    for k, v in trainer.reference.state_dict().items():
        assert torch.equal(v, ref_params[k]), f"reference parameter {k} changed"
    assert all(not p.requires_grad for p in trainer.reference.parameters())
    assert rows[-1]["normal_kl"] < 1.0
    assert rows[0]["normal_kl"] < 1e-6  # policy == reference at the first step
    assert 0 < rows[-1]["real_token_fraction"] <= 1


def test_concatenated_step_equals_separate_passes():
    """One trunk pass over [forget; mismatch; normal] == the terms computed row-set by row-set."""
    tok = tiny_tokenizer()
    model = tiny_llama(128, seed=1)
    model.config.use_cache = False
    ref = frozen_copy(model)
    with torch.no_grad():  # make the reference differ from the policy
        for p in ref.parameters():
            p.add_(0.01 * torch.randn_like(p))
    cfg = tiny_cfg()
    rows = tokenize_all(tok, tiny_recipe(), cfg.data)
    batch = UnlearnBatcher(rows, 3, tok.pad_token_id, 0).next()
    w = LossWeights(0.5, 1.0, 1.0)
    out = micro_batch_loss(model, ReferenceRunner(model, ref), batch, w,
                           device=torch.device("cpu"), compute_dtype=torch.float32,
                           backend="chunked")
    out.loss.backward()
    g_fused = model.model.layers[0].mlp.up_proj.weight.grad.clone()
    model.zero_grad()

    # Separate full forwards with materialised logits (the paper's way, minus its bugs).
    flat, labels, kinds = valid_positions(batch)
    hidden = model.model(input_ids=batch.input_ids,
                         attention_mask=batch.attention_mask).last_hidden_state
    ref_hidden = ref.model(input_ids=batch.input_ids,
                           attention_mask=batch.attention_mask).last_hidden_state
    h = hidden.reshape(-1, hidden.shape[-1])[flat]
    rh = ref_hidden.reshape(-1, hidden.shape[-1])[flat]
    expect = unlearn_loss_ref(h, head_of(model).weight, labels, kinds, rh, head_of(ref).weight,
                              eps_forget=0.5, eps_mismatch=1.0, eps_normal=1.0)
    expect.loss.backward()
    torch.testing.assert_close(out.loss, expect.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.normal_kl, expect.normal_kl, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g_fused, model.model.layers[0].mlp.up_proj.weight.grad,
                               rtol=1e-4, atol=1e-6)


def test_gradient_accumulation_is_exact():
    """Two micro-batches with token-count scaling == one batch holding both."""
    tok = tiny_tokenizer()
    model = tiny_llama(128, seed=2)
    ref = frozen_copy(model)
    cfg = tiny_cfg()
    rows = tokenize_all(tok, tiny_recipe(), cfg.data)
    batcher = UnlearnBatcher(rows, 2, tok.pad_token_id, 0, bucket=False)
    b1, b2 = batcher.next(), batcher.next()
    runner = ReferenceRunner(model, ref)
    cpu = torch.device("cpu")

    def counts(b):
        _, _, k = valid_positions(b)
        return torch.tensor([(k == i).sum() for i in range(3)])

    tot = counts(b1) + counts(b2)
    w = LossWeights(0.5 / tot[0].item(), 1.0 / tot[1].item(), 1.0 / tot[2].item())
    for b in (b1, b2):
        micro_batch_loss(model, runner, b, w, device=cpu, compute_dtype=torch.float32,
                         reduction="sum").loss.backward()
    g_acc = model.lm_head.weight.grad.clone()
    model.zero_grad()

    # One batch with all rows of both: forget rows, then mismatch, then normal (padded together).
    from fastunlearn.batching import collate_rows
    all_rows = []
    for k in range(3):
        for b in (b1, b2):
            for r in range(b.input_ids.shape[0]):
                if int(b.kind[r]) == k:
                    n = int(b.attention_mask[r].sum())
                    all_rows.append(_Row(b.input_ids[r, :n].tolist(), b.labels[r, :n].tolist(), k))
    big = collate_rows(all_rows, tok.pad_token_id)
    out = micro_batch_loss(model, runner, big, LossWeights(0.5, 1.0, 1.0), device=cpu,
                           compute_dtype=torch.float32)
    out.loss.backward()
    torch.testing.assert_close(g_acc, model.lm_head.weight.grad, rtol=1e-4, atol=1e-7)


class _Row:
    def __init__(self, input_ids, labels, kind):
        self.input_ids, self.labels, self.kind = input_ids, labels, kind


def test_stop_rule_stops_early(tmp_path):
    cfg = tiny_cfg(steps=50, stop_forget_nll=0.0, stop_extra_steps=2)
    trainer = make_trainer(cfg)
    trainer.cfg.eval.enabled = False
    pytest.importorskip("fastunlearn.report")
    summary = trainer.run(tmp_path / "run")
    assert summary["steps"] == 3
    assert "stopped 2 steps later" in summary["stopped_early"]


def test_packed_batch_equals_padded_batch():
    """Rows packed end to end (restarting positions) give the padded batch's loss and grads."""
    tok = tiny_tokenizer()
    model = tiny_llama(128, seed=5)
    ref = frozen_copy(model)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.01 * torch.randn_like(p))
    # Rows of very different lengths, so that several fit in one sequence.
    varied = RecipeData(name="varied",
                        forget=[Pair(f"bad {i}?", "no. " * (1 + 4 * i)) for i in range(3)],
                        normal=[Pair(f"q{i}?", "a" * (1 + 9 * i)) for i in range(3)],
                        heldout_forget=FORGET[:1], heldout_normal=NORMAL[:1], extra={},
                        sources=["test"])
    rows = tokenize_all(tok, varied, tiny_cfg().data)
    rows[1] = rows[1].rows([0, 1, 2], random.Random(0))
    picked = [rows[k][i] for k in range(3) for i in range(3)]
    from fastunlearn.batching import collate_rows, pack_rows
    padded = collate_rows(picked, tok.pad_token_id)
    packed = pack_rows(picked, tok.pad_token_id)
    assert packed.input_ids.shape[0] < padded.input_ids.shape[0]  # fewer sequences
    assert packed.real_tokens == padded.real_tokens  # no row dropped or duplicated
    assert packed.real_fraction > padded.real_fraction
    runner = ReferenceRunner(model, ref)
    w = LossWeights(0.5, 1.0, 1.0)
    results = []
    for batch in (padded, packed):
        model.zero_grad()
        out = micro_batch_loss(model, runner, batch, w, device=torch.device("cpu"),
                               compute_dtype=torch.float32, backend="chunked")
        out.loss.backward()
        results.append((out, model.model.layers[0].self_attn.q_proj.weight.grad.clone()))
    (a, ga), (b, gb) = results
    for name in ("n_forget", "n_mismatch", "n_normal"):
        assert int(getattr(a, name)) == int(getattr(b, name))
    torch.testing.assert_close(b.loss, a.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.normal_kl, a.normal_kl, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-6)


def test_onednn_linears_train_like_torch_linears():
    """train.cpu_linear=onednn swaps both models' linears and trains as torch's GEMMs do."""
    trainers = {}
    for mode in ("torch", "onednn"):
        t = make_trainer(tiny_cfg(steps=3, cpu_linear=mode))
        t.setup()
        swapped = [m for m in (t.policy, t.reference) for lin in m.modules()
                   if isinstance(lin, torch.nn.Linear) and "forward" in lin.__dict__]
        assert bool(swapped) == (mode == "onednn"), mode
        rows = [t.train_step() for _ in range(3)]
        trainers[mode] = (t, rows)
    (a, rows_a), (b, rows_b) = trainers["torch"], trainers["onednn"]
    for ra, rb in zip(rows_a, rows_b):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-4, abs=1e-5)
    for (name, p), q in zip(a.policy.named_parameters(), b.policy.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=name)


def test_lean_layers_train_like_stock_layers():
    """model.lean_layers=true swaps the policy's norms and MLPs and takes the same steps."""
    runs = {}
    for lean in (False, True):
        cfg = tiny_cfg(steps=3)
        cfg.model.lean_layers = lean
        t = make_trainer(cfg)
        t.setup()
        swapped = [m for m in t.policy.modules()
                   if type(m).__name__ == "LlamaRMSNorm" and "forward" in m.__dict__]
        assert bool(swapped) == lean
        runs[lean] = [t.train_step() for _ in range(3)]
    for a, b in zip(runs[False], runs[True]):
        for k in ("loss", "forget_nll", "mismatch_nll", "normal_kl"):
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (k, a[k], b[k])


def test_bf16_weights_train_with_stochastic_rounding_adamw():
    """bf16 weights pick StochasticRoundingAdamW (auto) and unlearn about as an fp32 run does;
    fp32 weights keep torch's AdamW."""
    from fastunlearn.optim import StochasticRoundingAdamW

    fp32 = make_trainer(tiny_cfg(steps=15))
    fp32.setup()
    assert fp32.optimizer_name == "adamw"
    assert isinstance(fp32.optimizer, torch.optim.AdamW)
    cfg = tiny_cfg(steps=15)  # precision auto: bf16, since the weights are
    bf16 = Trainer(cfg, model=tiny_llama(128, seed=0).to(torch.bfloat16),
                   tokenizer=tiny_tokenizer(), recipe=tiny_recipe(), progress=False)
    bf16.setup()
    assert bf16.optimizer_name == "adamw_sr"
    assert bf16.compute_dtype == torch.bfloat16 and fp32.compute_dtype == torch.float32
    assert isinstance(bf16.optimizer, StochasticRoundingAdamW)
    rise = {}
    for name, t in (("fp32", fp32), ("bf16", bf16)):
        before = heldout_forget_nll(t)
        for _ in range(15):
            t.train_step()
        rise[name] = heldout_forget_nll(t) - before
    assert rise["fp32"] > 0.25, rise  # gradient ascent on the forget rows (0.39 here)
    assert rise["bf16"] == pytest.approx(rise["fp32"], rel=0.3), rise
    state = bf16.optimizer.state[next(bf16.policy.parameters())]
    assert state["exp_avg"].dtype == torch.bfloat16


def test_run_saves_a_model_card_versions_and_save_dtype(tmp_path):
    """The saved model carries a card and fastunlearn.json with the run's metrics and versions;
    summary.json records the versions; model.save_dtype casts the files."""
    import json

    pytest.importorskip("fastunlearn.report")
    cfg = tiny_cfg(steps=2)
    cfg.save_model = True
    cfg.model.save_dtype = "bfloat16"
    summary = make_trainer(cfg).run(tmp_path / "run")
    model_dir = tmp_path / "run" / "model"
    assert summary["versions"]["torch"] == torch.__version__
    card = (model_dir / "README.md").read_text()
    info = json.loads((model_dir / "fastunlearn.json").read_text())
    assert "fastunlearn" in info["versions"] and info["config"]["train"]["steps"] == 2
    assert "eps_forget" in card or "0.5" in card
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}


def test_a_broken_state_is_never_checkpointed(tmp_path):
    """Non-finite weights raise before a checkpoint is written; the last good one stays."""
    from fastunlearn import checkpoint

    cfg = tiny_cfg(steps=4, save_every=1)
    cfg.train.checkpoint_dir = str(tmp_path / "ckpt")
    trainer = make_trainer(cfg)
    trainer.setup()
    trainer.train_step()
    good = trainer.save_checkpoint()
    trainer.train_step()
    with torch.no_grad():
        next(p for p in trainer.policy.parameters() if p.requires_grad).fill_(float("nan"))
    with pytest.raises(FloatingPointError):
        trainer.save_checkpoint()
    assert checkpoint.latest(tmp_path / "ckpt") == good
