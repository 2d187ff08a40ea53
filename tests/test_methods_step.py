"""The unlearning methods inside the step and the trainer, against plain full-logit
specifications written here from the formulas (tiny Llama, CPU)."""
import math

import pytest
import torch
import torch.nn.functional as F

from fastunlearn.batching import UnlearnBatcher
from fastunlearn.config import ConfigError, validate
from fastunlearn.data import KIND_PREFERRED, REFUSAL_ANSWERS
from fastunlearn.inputs import tokenize_all
from fastunlearn.losses import IGNORE_INDEX
from fastunlearn.method_terms import MethodSettings, states_at_layer
from fastunlearn.models import frozen_copy
from fastunlearn.step import valid_rows
from fastunlearn.trainer import Trainer
from fastunlearn.unlearn_step import UnlearnStep, measuring, prepare
from tests.test_trainer import make_trainer, tiny_cfg, tiny_recipe
from tests.tiny_model import tiny_llama, tiny_tokenizer

CPU = torch.device("cpu")
SEQUENCE_METHODS = ("npo", "simnpo", "idk_dpo")
EPS = (0.7, 0.4, 1.3)


def _rows(method, max_length=64):
    cfg = tiny_cfg()
    cfg.data.max_length = max_length
    return tokenize_all(tiny_tokenizer(), tiny_recipe(), cfg.data, method)


def _batch(method, b=3, pack=False, separate=frozenset({2})):
    tok = tiny_tokenizer()
    return UnlearnBatcher(_rows(method), b, tok.pad_token_id, seed=1, pack=pack,
                          separate=separate).next()


def _token_logprobs(model, batch):
    """(R, T-1) log p(label) of every position of an unpacked batch (0 where ignored)."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    labels = batch.labels[:, 1:]
    logp = torch.log_softmax(logits[:, :-1].double(), -1)
    picked = logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return torch.where(labels != IGNORE_INDEX, picked, 0.0), logits[:, :-1].double()


def _spec_loss(method: MethodSettings, policy, reference, batch, eps):
    """The method's loss from full logits: per-kind means, per-sequence means for npo, simnpo,
    idk_dpo (rows of an unpacked batch are sequences)."""
    eps_f, eps_m, eps_n = eps
    lp, logits = _token_logprobs(policy, batch)
    with torch.no_grad():
        lp_ref, ref_logits = _token_logprobs(reference, batch)
    valid = batch.labels[:, 1:] != IGNORE_INDEX
    kind = batch.kind
    s, s_ref, n_tok = lp.sum(1), lp_ref.sum(1), valid.sum(1).double()

    def token_mean(x, k):
        sel = (kind == k)[:, None] & valid
        return x[sel].sum() / sel.sum()

    mismatch = -token_mean(lp, 1)
    kl = (F.softmax(ref_logits, -1) * (F.log_softmax(ref_logits, -1)
                                       - F.log_softmax(logits, -1))).sum(-1)
    retain = -token_mean(lp, 2) if method.name == "graddiff" else token_mean(kl, 2)
    f = kind == 0
    beta = method.inverse_temperature if method.per_sequence else None
    if method.name in ("paper", "graddiff"):
        forget = token_mean(lp, 0)  # -NLL: the ascent
    elif method.name == "npo":
        forget = (-2 / beta * F.logsigmoid(-beta * (s[f] - s_ref[f]))).mean()
    elif method.name == "simnpo":
        forget = (-2 / beta * F.logsigmoid(-beta * s[f] / n_tok[f] - method.gamma)).mean()
    else:
        w = kind == KIND_PREFERRED
        margin = (s[w] - s_ref[w]) - (s[f] - s_ref[f])
        forget = (-2 / beta * F.logsigmoid(beta * margin)).mean()
    return eps_f * forget + eps_m * mismatch + eps_n * retain


# chunked with its own plan: a sequence method's term in one pass; with 4-row chunks the
# sequences do not fit, and it takes two passes (token_stats)
@pytest.mark.parametrize("name", ["graddiff", *SEQUENCE_METHODS])
@pytest.mark.parametrize("backend, chunk_rows", [("chunked", None), ("chunked", 4),
                                                 ("reference", None)])
def test_method_step_equals_its_full_logit_specification(name, backend, chunk_rows):
    method = MethodSettings(name, beta=0.5 if name != "simnpo" else 2.0, gamma=0.3)
    policy = tiny_llama(128, seed=0)
    reference = frozen_copy(tiny_llama(128, seed=1))  # differs from the policy
    batch = _batch(name)
    mode = "none" if name == "graddiff" else "copy"
    step = UnlearnStep(policy, reference if mode == "copy" else None, mode=mode,
                       backend=backend, method=method, chunk_rows=chunk_rows)
    out = step(prepare(batch, CPU, policy, method=name), EPS, reduction="mean")
    got = torch.autograd.grad(out.loss, list(policy.parameters()))
    want_loss = _spec_loss(method, policy, reference, batch, EPS)
    want = torch.autograd.grad(want_loss, list(policy.parameters()))
    assert torch.allclose(out.loss.double(), want_loss, rtol=1e-5), (out.loss, want_loss)
    for g, w in zip(got, want):  # fp32 model, fp64 specification
        assert torch.allclose(g.double(), w.double(), rtol=1e-3, atol=1e-5)


def test_packed_sequence_method_equals_padded():
    method = MethodSettings("idk_dpo", beta=0.5)
    policy = tiny_llama(128, seed=0)
    reference = frozen_copy(tiny_llama(128, seed=1))
    step = UnlearnStep(policy, reference, backend="chunked", method=method)
    separate = frozenset({0, 2, KIND_PREFERRED})
    losses = []
    for pack in (False, True):
        batch = _batch("idk_dpo", pack=pack, separate=separate)
        losses.append(step(prepare(batch, CPU, policy, method="idk_dpo"), EPS, "mean").loss)
    assert torch.allclose(losses[0], losses[1], rtol=1e-5), losses


@pytest.mark.parametrize("pack", [False, True])
@pytest.mark.parametrize("name", ["npo", "idk_dpo"])
def test_cached_reference_step_equals_the_live_reference_step(name, pack):
    """The cache keeps the reference's per-token log-probabilities of the forget (and preferred)
    rows: the step reads them instead of running the reference, with the same loss and
    gradients, row indices followed through padding and packing."""
    from fastunlearn.method_terms import reference_kinds
    from fastunlearn.reference_cache import load_or_build_cache
    from fastunlearn.step import ReferenceRunner

    method = MethodSettings(name, beta=0.5)
    policy = tiny_llama(128, seed=0)
    reference = frozen_copy(tiny_llama(128, seed=1))
    rows = _rows(name)
    kinds = [k for k in reference_kinds(name) if k != 2]
    cache = load_or_build_cache(ReferenceRunner(policy, reference), rows[2], None, device=CPU,
                                compute_dtype=torch.float32, pad_id=1, batch_rows=3,
                                logprob_rows={k: rows[k] for k in kinds})
    head = cache.head(CPU)
    live = UnlearnStep(policy, reference, backend="chunked", method=method)
    cached = UnlearnStep(policy, mode="cached", ref_head=head.weight, ref_bias=head.bias,
                         backend="chunked", method=method)
    batcher = UnlearnBatcher(rows, 3, tiny_tokenizer().pad_token_id, seed=2, pack=pack,
                             separate=frozenset(reference_kinds(name)) | {2})
    for _ in range(3):
        batch = batcher.next()
        outs = [step(prepare(batch, CPU, policy, cache if step is cached else None, name), EPS,
                     "mean") for step in (live, cached)]
        assert outs[1].forget_term != 0
        grads = [torch.autograd.grad(o.loss, list(policy.parameters())) for o in outs]
        torch.testing.assert_close(outs[1].loss, outs[0].loss, rtol=1e-5, atol=1e-6)
        for g_cached, g_live in zip(*grads[::-1]):
            torch.testing.assert_close(g_cached, g_live, rtol=1e-4, atol=1e-6)


def test_a_cache_without_forget_logprobs_is_refused_for_npo():
    from fastunlearn.reference_cache import load_or_build_cache
    from fastunlearn.step import ReferenceRunner

    policy = tiny_llama(128, seed=0)
    rows = _rows("npo")
    cache = load_or_build_cache(ReferenceRunner(policy, frozen_copy(policy)), rows[2], None,
                                device=CPU, compute_dtype=torch.float32, pad_id=1)
    with pytest.raises(ValueError, match="no log-probabilities of kind-0 rows"):
        prepare(_batch("npo"), CPU, policy, cache, "npo")


def test_preferred_rows_follow_their_forget_rows():
    tok = tiny_tokenizer()
    for pack in (False, True):
        batch = _batch("idk_dpo", b=4, pack=pack, separate=frozenset({0, 2, KIND_PREFERRED}))
        inputs = prepare(batch, CPU, tiny_llama(128), method="idk_dpo")
        assert inputs.n_sequences == 4
        rows = valid_rows(batch)
        flat_ids = batch.input_ids.reshape(-1)
        for j in range(4):
            texts = []
            for kind in (0, KIND_PREFERRED):
                sel = (inputs.sequence == j) & (inputs.kinds == kind)
                row = int(rows[sel][0])
                # the row's tokens: every position whose token_row (or batch row) is this row
                if batch.token_row is not None:
                    ids = flat_ids[batch.token_row.reshape(-1) == row]
                else:
                    ids = batch.input_ids[row][batch.attention_mask[row] == 1]
                texts.append(tok.decode(ids))
            prompt_forget = texts[0].split("assistant")[0]
            assert texts[1].startswith(prompt_forget), texts
            answer = texts[1].split("assistant\n")[-1]  # a refusal, maybe cut at max_length
            assert any(r.startswith(answer[:20]) for r in REFUSAL_ANSWERS), answer


def test_reference_pass_covers_the_rows_a_method_needs_and_no_others():
    batch = _batch("npo", b=3, pack=True, separate=frozenset({0, 2}))
    inputs = prepare(batch, CPU, tiny_llama(128), method="npo")
    kinds = inputs.kinds[inputs.ref_sel]
    assert set(kinds.tolist()) == {0, 2}
    assert int((inputs.kinds != 1).sum()) == inputs.ref_sel.numel()
    # packed: forget rows have sequences of their own, so the pass runs no mismatch token
    seq_kinds = batch.token_kind[inputs.ref_batch_rows]
    assert not (seq_kinds == 1).any()
    # and its positions are the policy's own positions in those rows
    flat_in_pass = inputs.ref_batch_rows[inputs.ref_pos // batch.input_ids.shape[1]]
    assert torch.equal(flat_in_pass, inputs.flat[inputs.ref_sel] // batch.input_ids.shape[1])


def test_rmu_step_equals_its_specification_and_stops_at_its_layer():
    layers, layer = 4, 1
    policy = tiny_llama(128, seed=0, layers=layers)
    reference = frozen_copy(tiny_llama(128, seed=1, layers=layers))
    method = MethodSettings("rmu", rmu_layer=layer, rmu_steer=3.0, seed=5)
    step = UnlearnStep(policy, reference, method=method)
    batch = _batch("rmu")
    out = step(prepare(batch, CPU, policy, method="rmu"), EPS, reduction="mean")
    out.loss.backward()
    # layers after the RMU layer never ran: no gradient reached them, nor the head
    for i, block in enumerate(policy.model.layers):
        has_grad = any(p.grad is not None for p in block.parameters())
        assert has_grad == (i <= layer), i
    assert policy.model.norm.weight.grad is None

    def states(model):
        hs = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                   output_hidden_states=True).hidden_states[layer + 1]
        return hs[:, :-1]

    valid = batch.labels[:, 1:] != IGNORE_INDEX
    a, a_ref = states(policy), states(reference).detach()
    g = torch.Generator().manual_seed(5)
    u = torch.rand(a.shape[-1], generator=g, dtype=torch.float64)
    target = (3.0 * u / u.norm()).float()
    f = (batch.kind == 0)[:, None] & valid
    n = (batch.kind == 2)[:, None] & valid
    forget = ((a[f] - target) ** 2).mean(-1).mean()
    retain = ((a[n] - a_ref[n]) ** 2).mean(-1).mean()
    want = EPS[0] * forget + EPS[2] * retain
    assert torch.allclose(out.loss, want, rtol=1e-5), (out.loss, want)
    full = states_at_layer(policy, layer, {"input_ids": batch.input_ids,
                                           "attention_mask": batch.attention_mask})
    assert torch.allclose(full[:, :-1], a)


def _heldout_forget_nll(trainer):
    rows = tokenize_all(trainer.tokenizer, trainer.recipe, trainer.cfg.data)[0]
    batch = UnlearnBatcher([rows, None, rows], len(rows), trainer.tokenizer.pad_token_id, 0,
                           bucket=False).next()
    with torch.no_grad(), measuring(trainer.unlearn_step):
        out = trainer.unlearn_step(prepare(batch, CPU, trainer.policy), (1.0, 0.0, 0.0),
                                   reduction="mean")
    return float(out.forget_nll)


@pytest.fixture(scope="module")
def fitted_weights():
    """A tiny Llama that has learned the training rows (forget answers included), so that
    unlearning has something to undo: a random model's forget NLL is already near log V."""
    from fastunlearn.batching import collate_rows

    model = tiny_llama(128, seed=0).train()
    rows = _rows("paper")
    batch = collate_rows(rows[0] + rows[2], tiny_tokenizer().pad_token_id)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(50):
        loss = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                     labels=batch.labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model.state_dict()


@pytest.mark.parametrize("name", ["graddiff", *SEQUENCE_METHODS, "rmu"])
def test_every_method_raises_the_forget_nll(name, fitted_weights):
    cfg = tiny_cfg(steps=15, lr=3e-3)
    cfg.loss.method = name
    if name == "rmu":
        cfg.loss.eps_mismatch = 0.0
        cfg.loss.rmu_steer = 5.0
    cfg.loss.eps_forget = 1.0
    validate(cfg)
    model = tiny_llama(128)
    model.load_state_dict(fitted_weights)
    trainer = Trainer(cfg, model=model, tokenizer=tiny_tokenizer(), recipe=tiny_recipe(),
                      progress=False)
    trainer.setup()
    before = _heldout_forget_nll(trainer)
    rows = [trainer.train_step() for _ in range(15)]
    after = _heldout_forget_nll(trainer)
    assert after > before + 1.0, (name, before, after)
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["forget_term"]) for r in rows)
    if name == "rmu":
        assert rows[0]["forget_nll"] is None and rows[0]["mismatch_nll"] == 0.0
        # its retain term is a distance between hidden states, never reported as a KL
        assert rows[0]["normal_kl"] is None and rows[0]["normal_distance"] >= 0
    if name == "graddiff":
        assert trainer.reference is None  # holds normal rows by their NLL: no reference
        assert rows[0]["normal_kl"] is None and rows[0]["normal_nll"] > 0


@pytest.mark.parametrize("name", ["npo", "idk_dpo"])
def test_sequence_methods_start_at_two_log_two_over_beta(name):
    cfg = tiny_cfg(steps=1)
    cfg.loss.method, cfg.loss.beta = name, 0.25
    trainer = make_trainer(cfg)
    trainer.setup()
    row = trainer.train_step()  # the policy equals the reference at the first step
    assert row["forget_term"] == pytest.approx(2 * math.log(2) / 0.25, rel=1e-5)


def test_a_zero_mismatch_weight_draws_no_mismatch_rows():
    cfg = tiny_cfg(steps=1)
    cfg.loss.eps_mismatch = 0.0
    trainer = make_trainer(cfg)
    trainer.setup()
    batch = trainer.batcher.next()
    assert not (batch.kind == 1).any()
    assert trainer.train_step()["mismatch_nll"] == 0.0


@pytest.mark.parametrize("change, message", [
    ({"method": "dpo"}, "loss.method must be one of"),
    ({"method": "rmu"}, "set loss.eps_mismatch=0"),
    ({"method": "npo", "beta": -1.0}, "loss.beta must be > 0"),
    ({"method": "rmu", "eps_mismatch": 0.0, "rmu_steer": 0.0}, "loss.rmu_steer must be > 0"),
    ({"method": "rmu", "eps_mismatch": 0.0, "reference": "cached"}, "holds only the last"),
    ({"method": "graddiff", "reference_name": "x"}, "graddiff uses no reference model"),
])
def test_bad_method_settings_are_refused_in_one_line(change, message):
    cfg = tiny_cfg()
    for k, v in change.items():
        setattr(cfg.model if k.startswith("reference") else cfg.loss, k, v)
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


def test_rmu_refuses_the_cached_reference():
    policy = tiny_llama(128)
    with pytest.raises(ValueError, match="cached reference holds"):
        UnlearnStep(policy, mode="cached", ref_head=policy.lm_head.weight,
                    method=MethodSettings("rmu"))


def test_rmu_layer_outside_the_model_is_refused():
    with pytest.raises(ValueError, match="outside the model's 2 decoder layers"):
        UnlearnStep(tiny_llama(128), frozen_copy(tiny_llama(128)),
                    method=MethodSettings("rmu", rmu_layer=2))
