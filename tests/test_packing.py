"""Packed rows never see each other: explicit block-diagonal mask, and the setup probe."""
import math
import random
import warnings

import pytest
import torch

from fastunlearn.batching import collate_rows, pack_rows
from fastunlearn.data import Pair, RecipeData
from fastunlearn.inputs import tokenize_all
from fastunlearn.models import frozen_copy, trunk_of
from fastunlearn.packing import probe_packing, sliding_window_limit
from fastunlearn.step import LossWeights, ReferenceRunner, micro_batch_loss, trunk_inputs
from fastunlearn.trainer import Trainer
from tests.test_trainer import tiny_cfg, tiny_recipe
from tests.tiny_model import tiny_bloom, tiny_llama, tiny_opt, tiny_tokenizer

CPU = torch.device("cpu")
VARIED = RecipeData(name="varied",
                    forget=[Pair(f"bad {i}?", "no. " * (1 + 4 * i)) for i in range(3)],
                    normal=[Pair(f"q{i}?", "a" * (1 + 9 * i)) for i in range(3)],
                    heldout_forget=[Pair("x?", "y")], heldout_normal=[Pair("x?", "y")],
                    extra={}, sources=["test"])


def _llama_eager():
    model = tiny_llama(128, seed=5)
    model.config._attn_implementation = "eager"
    return model


MODELS = {
    "llama-sdpa": lambda: tiny_llama(128, seed=5),
    "llama-eager": _llama_eager,
    "opt-sdpa": lambda: tiny_opt(seed=5, attn="sdpa"),
    "opt-eager": lambda: tiny_opt(seed=5, attn="eager"),
}


def _picked_rows(tok):
    rows = tokenize_all(tok, VARIED, tiny_cfg().data)
    rows[1] = rows[1].rows([0, 1, 2], random.Random(0))
    return [rows[k][i] for k in range(3) for i in range(3)]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_packed_rows_equal_rows_alone(name):
    """Every packed row's hidden states equal the row run alone; loss and gradients equal the
    padded batch's (OPT ignored restarting position ids: rows attended to each other)."""
    tok = tiny_tokenizer()
    model = MODELS[name]()
    picked = _picked_rows(tok)
    packed = pack_rows(picked, tok.pad_token_id)
    assert any(len(m) > 1 for m in packed.members)  # rows do share sequences
    trunk = trunk_of(model)
    with torch.no_grad():
        hidden = trunk(**trunk_inputs(model, packed, CPU)).last_hidden_state
        for s in range(packed.input_ids.shape[0]):  # each row where its positions restart
            starts = (packed.position_ids[s] == 0).nonzero().squeeze(1).tolist()
            for a, b in zip(starts, starts[1:] + [packed.input_ids.shape[1]]):
                if packed.attention_mask[s, a]:  # not the padding tail
                    alone = trunk(input_ids=packed.input_ids[s:s + 1, a:b]).last_hidden_state
                    torch.testing.assert_close(hidden[s, a:b], alone[0], rtol=1e-5, atol=1e-5)

    ref = frozen_copy(model)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.01 * torch.randn_like(p))
    runner = ReferenceRunner(model, ref)
    results = []
    for batch in (collate_rows(picked, tok.pad_token_id), packed):
        model.zero_grad()
        out = micro_batch_loss(model, runner, batch, LossWeights(0.5, 1.0, 1.0), device=CPU,
                               compute_dtype=torch.float32, backend="chunked")
        out.loss.backward()
        grad = next(p for p in model.parameters() if p.grad is not None and p.dim() == 2)
        results.append((out, grad.grad.clone()))
    (a, ga), (b, gb) = results
    torch.testing.assert_close(b.loss, a.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.normal_kl, a.normal_kl, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-6)


def _trainer(model, **train):
    return Trainer(tiny_cfg(packing=True, **train), model=model, tokenizer=tiny_tokenizer(),
                   recipe=tiny_recipe(), progress=False)


def test_probe_turns_packing_off_for_a_model_that_cannot_keep_rows_apart():
    """BLOOM builds ALiBi and its mask from a 2-D attention mask: it cannot take the packed
    mask, so setup trains it unpacked, with a warning."""
    trainer = _trainer(tiny_bloom(seed=1))
    with pytest.warns(UserWarning, match="packing off"):
        trainer.setup()
    assert not trainer.packing and not trainer.batcher.pack
    assert "BloomForCausalLM" in trainer.packing_off_reason
    assert math.isfinite(trainer.train_step()["loss"])


@pytest.mark.parametrize("name", ["llama-sdpa", "opt-eager"])
def test_probe_keeps_packing_on_for_models_that_keep_rows_apart(name):
    trainer = _trainer(MODELS[name]())
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        trainer.setup()
    assert trainer.packing and trainer.batcher.pack


def test_probe_detects_rows_that_see_each_other(monkeypatch):
    """Forced case: packed inputs without the mask (restarting position ids only), which OPT
    does not turn into a block mask. The probe must see the difference."""
    import fastunlearn.packing as packing

    def no_mask(model, ids, pos):
        return {"input_ids": ids, "position_ids": pos, "use_cache": False}

    rows = [list(range(10, 22)), list(range(30, 39)), list(range(50, 57))]
    model = tiny_opt(seed=2)
    assert probe_packing(model, rows, 1) is None
    monkeypatch.setattr(packing, "packed_inputs", no_mask)
    why = probe_packing(model, rows, 1)
    assert why is not None and "differ" in why


def test_probe_runs_in_eval_mode():
    """With dropout on, a train-mode probe would see differences that are not there."""
    model = tiny_opt(seed=3, dropout=0.5).train()
    rows = [list(range(10, 22)), list(range(30, 39)), list(range(50, 57))]
    assert probe_packing(model, rows, 1) is None
    assert model.training  # mode restored


def test_sliding_window_shorter_than_a_row_turns_packing_off():
    """The explicit mask is full causal inside a row: a model whose layers look back less than
    a row is not packed (the short probe rows could not show the difference)."""
    model = tiny_llama(128, seed=6)
    model.config.sliding_window = 16  # rows are up to 64 tokens (tiny_cfg)
    model.config.layer_types = ["sliding_attention", "full_attention"]
    trainer = _trainer(model)
    with pytest.warns(UserWarning, match="sliding-window attention"):
        trainer.setup()
    assert not trainer.batcher.pack
    assert sliding_window_limit(model, 16) is None
    model.config.layer_types = ["full_attention", "full_attention"]
    assert sliding_window_limit(model, 64) is None
