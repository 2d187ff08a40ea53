"""Cached reference == live reference (tiny random Llama, fp32)."""
import pytest
import torch

from fastunlearn.batching import UnlearnBatcher
from fastunlearn.data import Row
from fastunlearn.inputs import tokenize_all
from fastunlearn.losses import KIND_NORMAL
from fastunlearn.models import frozen_copy
from fastunlearn.reference_cache import (
    ReferenceCache,
    build_reference_cache,
    load_or_build_cache,
    model_fingerprint,
    valid_columns,
)
from fastunlearn.step import LossWeights, ReferenceRunner, micro_batch_loss
from tests.test_trainer import make_trainer, tiny_cfg, tiny_recipe
from tests.tiny_model import tiny_llama, tiny_tokenizer

CPU = torch.device("cpu")


def _setup(seed=3):
    tok = tiny_tokenizer()
    model = tiny_llama(128, seed=seed)
    ref = frozen_copy(model)
    with torch.no_grad():  # a reference that differs from the policy: a non-trivial KL
        for p in ref.parameters():
            p.add_(0.02 * torch.randn_like(p))
    rows = tokenize_all(tok, tiny_recipe(), tiny_cfg().data)
    return tok, model, ref, rows


def _loss(model, runner, batch):
    model.zero_grad()
    out = micro_batch_loss(model, runner, batch, LossWeights(0.5, 1.0, 1.0), device=CPU,
                           compute_dtype=torch.float32, backend="chunked")
    out.loss.backward()
    return out, model.model.layers[1].self_attn.q_proj.weight.grad.clone()


@pytest.mark.parametrize("pack", [False, True])
def test_cached_loss_equals_live_loss(pack):
    tok, model, ref, rows = _setup()
    if pack:  # answer-only tails of the normal rows: two of them fit in one packed sequence
        rows[KIND_NORMAL] = [Row(r.input_ids[-28:], r.labels[-28:], r.kind)
                             for r in rows[KIND_NORMAL]]
    live = ReferenceRunner(model, ref)
    cache = build_reference_cache(live, rows[KIND_NORMAL], device=CPU,
                                  compute_dtype=torch.float32, pad_id=tok.pad_token_id,
                                  batch_rows=4)
    assert cache.hidden.dtype == torch.float32 and cache.n_rows == len(rows[KIND_NORMAL])
    cached = ReferenceRunner(model, None, cache=cache)
    batcher = UnlearnBatcher(rows, 3, tok.pad_token_id, 0, pack=pack)
    shared = 0  # packed normal sequences holding more than one row
    for _ in range(3):
        batch = batcher.next()
        if pack:
            shared += sum(len(m) > 1 for m, k in zip(batch.members, batch.kind) if k == 2)
        out_live, g_live = _loss(model, live, batch)
        out_cached, g_cached = _loss(model, cached, batch)
        assert float(out_live.normal_kl) > 1e-4  # the reference differs: the test can fail
        torch.testing.assert_close(out_cached.normal_kl, out_live.normal_kl, rtol=1e-6,
                                   atol=1e-6)
        torch.testing.assert_close(out_cached.loss, out_live.loss, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(g_cached, g_live, rtol=1e-5, atol=1e-7)
    assert shared or not pack, "no packed sequence held two normal rows: the test proves little"


def test_cache_layout_follows_valid_positions():
    tok, model, ref, rows = _setup()
    normal = rows[KIND_NORMAL]
    cache = build_reference_cache(ReferenceRunner(model, ref), normal, device=CPU,
                                  compute_dtype=torch.float32, pad_id=tok.pad_token_id)
    i = len(normal) - 1
    ids = torch.tensor([normal[i].input_ids])
    expect = ref.model(input_ids=ids).last_hidden_state[0, valid_columns(normal[i].labels)]
    got = cache.gather(torch.tensor([i]))
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-6)
    two = cache.gather(torch.tensor([i, 0]))
    assert two.shape[0] == got.shape[0] + len(valid_columns(normal[0].labels))
    with pytest.raises(ValueError, match="out of range"):
        cache.gather(torch.tensor([len(normal)]))


def test_bf16_storage_is_close():
    tok, model, ref, rows = _setup()
    live = ReferenceRunner(model, ref)
    cache = build_reference_cache(live, rows[KIND_NORMAL], device=CPU,
                                  compute_dtype=torch.float32, storage_dtype=torch.bfloat16,
                                  pad_id=tok.pad_token_id)
    assert cache.hidden.dtype == torch.bfloat16 and cache.head_weight.dtype == torch.bfloat16
    batch = UnlearnBatcher(rows, 3, tok.pad_token_id, 0).next()
    kl_live = float(_loss(model, live, batch)[0].normal_kl)
    kl_cached = float(_loss(model, ReferenceRunner(model, None, cache=cache), batch)[0].normal_kl)
    assert kl_cached != kl_live  # rounded, not bit-identical
    assert abs(kl_cached - kl_live) <= 0.05 * kl_live + 1e-4


def test_save_load_and_key(tmp_path):
    tok, model, ref, rows = _setup()
    normal = rows[KIND_NORMAL]
    runner = ReferenceRunner(model, ref)
    kw = dict(device=CPU, compute_dtype=torch.float32, pad_id=tok.pad_token_id)
    c1 = load_or_build_cache(runner, normal, tmp_path, **kw)
    files = list(tmp_path.glob("refcache-*.pt"))
    assert len(files) == 1 and c1.path == files[0]
    c2 = load_or_build_cache(runner, normal, tmp_path, **kw)  # reused, not rebuilt
    assert c2.key == c1.key and c2.path == c1.path
    torch.testing.assert_close(c2.hidden, c1.hidden, rtol=0, atol=0)
    torch.testing.assert_close(c2.head_weight, c1.head_weight, rtol=0, atol=0)
    again = ReferenceCache.load(files[0])
    assert again.n_rows == len(normal)
    # other rows or other weights: another key, another file
    load_or_build_cache(runner, normal[:-1], tmp_path, **kw)
    assert len(list(tmp_path.glob("refcache-*.pt"))) == 2
    fp = model_fingerprint(ref)
    with torch.no_grad():
        ref.model.layers[0].mlp.up_proj.weight[0, 0] += 1.0
    assert model_fingerprint(ref) != fp


def test_logprob_rows_are_saved_loaded_and_keyed(tmp_path):
    tok, model, ref, rows = _setup()
    runner = ReferenceRunner(model, ref)
    kw = dict(device=CPU, compute_dtype=torch.float32, pad_id=tok.pad_token_id)
    plain = load_or_build_cache(runner, rows[KIND_NORMAL], tmp_path, **kw)
    forget = rows[0]
    c1 = load_or_build_cache(runner, rows[KIND_NORMAL], tmp_path, logprob_rows={0: forget}, **kw)
    assert c1.key != plain.key and not plain.logprobs
    again = ReferenceCache.load(c1.path)
    values, offsets = again.logprobs[0]
    torch.testing.assert_close(values, c1.logprobs[0][0], rtol=0, atol=0)
    assert offsets.numel() == len(forget) + 1 and (values < 0).all()
    # each row's values are the reference's own log-probabilities of its labels
    i = 1
    got = again.gather_logprobs(0, torch.tensor([i]))
    with torch.no_grad():
        ids = torch.tensor([forget[i].input_ids])
        logp = torch.log_softmax(ref(input_ids=ids).logits[0, :-1].double(), -1)
    cols = valid_columns(forget[i].labels)
    labels = torch.tensor(forget[i].labels)[cols + 1]
    torch.testing.assert_close(got.double(), logp[cols, labels], rtol=1e-5, atol=1e-5)
    # other forget rows: another key
    other = load_or_build_cache(runner, rows[KIND_NORMAL], tmp_path,
                                logprob_rows={0: forget[:-1]}, **kw)
    assert other.key != c1.key


def test_cache_mismatch_is_an_error():
    tok, model, ref, rows = _setup()
    normal = rows[KIND_NORMAL]
    wrong = [normal[0]] * len(normal)  # every row replaced by row 0: valid counts differ
    assert len({len(valid_columns(r.labels)) for r in normal}) > 1
    cache = build_reference_cache(ReferenceRunner(model, ref), wrong, device=CPU,
                                  compute_dtype=torch.float32, pad_id=tok.pad_token_id)
    runner = ReferenceRunner(model, None, cache=cache)
    batcher = UnlearnBatcher(rows, len(normal), tok.pad_token_id, 0, bucket=False)
    with pytest.raises(ValueError, match="reference cache does not match"):
        micro_batch_loss(model, runner, batcher.next(), LossWeights(0.5, 1.0, 1.0), device=CPU,
                         compute_dtype=torch.float32)


@pytest.mark.parametrize("packing, method", [(False, "paper"), (True, "paper"),
                                             (True, "npo"), (False, "idk_dpo")])
def test_trainer_cached_reference_matches_copy(tmp_path, packing, method):
    """Same seed, same data: a cached-reference run takes the same steps as a copy run (npo and
    idk_dpo read the reference's log-probabilities of the forget / preferred rows from it)."""
    runs = {}
    for mode in ("copy", "cached"):
        cfg = tiny_cfg(steps=3, packing=packing)
        cfg.loss.method = method
        cfg.model.reference = mode
        cfg.model.reference_cache_dir = str(tmp_path / "cache")
        trainer = make_trainer(cfg)
        trainer.setup()
        if mode == "cached":
            assert trainer.reference is None and trainer.ref_cache is not None
            assert list((tmp_path / "cache").glob("refcache-*.pt"))
        runs[mode] = [trainer.train_step() for _ in range(3)]
    assert runs["cached"][0]["normal_kl"] < 1e-6  # policy == reference at step 1
    assert runs["copy"][-1]["normal_kl"] > 1e-6
    for a, b in zip(runs["copy"], runs["cached"]):
        keys = ("loss", "forget_nll", "mismatch_nll", "normal_kl") + \
            (("forget_term",) if method != "paper" else ())
        for k in keys:
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), (k, a[k], b[k])


@pytest.mark.parametrize("overrides, message", [
    (["model.reference=bogus"], "model.reference must be"),
    (["model.reference=adapters"], "needs model.lora=true"),
    (["model.lora=true", "model.reference=copy"], "copy with model.reference_name"),
])
def test_reference_config_errors(overrides, message):
    from fastunlearn.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message):
        load_config("default", overrides)
    cfg = load_config("default", ["model.reference=cached"])
    assert cfg.model.reference == "cached" and cfg.train.packing
