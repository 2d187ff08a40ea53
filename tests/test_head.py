"""The fused loss's head is the model's head: logit scale, bias and soft-cap, checked at setup."""
import pytest
import torch
import torch.nn.functional as F

from fastunlearn.batching import collate_rows
from fastunlearn.inputs import tokenize_all
from fastunlearn.models import ModelError, check_head, frozen_copy, head_of
from fastunlearn.step import LossWeights, ReferenceRunner, micro_batch_loss
from fastunlearn.trainer import Trainer
from tests.test_trainer import tiny_cfg, tiny_recipe
from tests.tiny_model import tiny_granite, tiny_llama, tiny_tokenizer

CPU = torch.device("cpu")


def tiny_cohere(seed=0, logit_scale=0.0625):
    from transformers import CohereConfig, CohereForCausalLM

    cfg = CohereConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, logit_scale=logit_scale,
                       pad_token_id=1, bos_token_id=2, eos_token_id=5)
    torch.manual_seed(seed)
    return CohereForCausalLM(cfg).eval()


MODELS = {"granite": (tiny_granite, 1 / 8.0), "cohere": (tiny_cohere, 0.0625)}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_fused_nll_equals_the_models_own_nll(name):
    """Training NLL from trunk + head == cross-entropy of model(x).logits (Granite divides its
    logits by ``logits_scaling``, Cohere multiplies them by ``logit_scale``)."""
    build, scale = MODELS[name]
    model = build(seed=1)
    assert head_of(model).logit_scale == pytest.approx(scale)
    check_head(model, list(range(10, 30)))
    tok = tiny_tokenizer()
    rows = tokenize_all(tok, tiny_recipe(), tiny_cfg().data)
    batch = collate_rows(rows[0][:3], tok.pad_token_id)
    out = micro_batch_loss(model, ReferenceRunner(model, frozen_copy(model)), batch,
                           LossWeights(1.0, 0.0, 0.0), device=CPU, compute_dtype=torch.float32,
                           backend="chunked")
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    own = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                          batch.labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.forget_nll.float(), own, rtol=1e-5, atol=1e-5)


class _ShiftedLogits(torch.nn.Module):
    """A model whose logits are not h W^T (a bias added outside the lm_head)."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.config = model, model.config
        self.model, self.base_model_prefix = model.model, "model"  # the trunk, for trunk_of

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()

    def forward(self, **kw):
        out = self.inner(**kw)
        out.logits = out.logits + torch.linspace(0, 3, out.logits.shape[-1])
        return out


def test_a_head_that_cannot_be_described_is_refused():
    model = tiny_llama(128, seed=2)
    check_head(model, list(range(10, 30)))  # the plain model passes
    with pytest.raises(ModelError, match="logits are not"):
        check_head(_ShiftedLogits(model), list(range(10, 30)))


def test_setup_refuses_a_model_whose_logits_the_fused_loss_cannot_compute():
    model = tiny_granite(seed=3)
    model.config.logits_scaling = 1.0  # the config no longer says what forward does
    object.__setattr__(model, "forward", _scaled_forward(model, 8.0))
    trainer = Trainer(tiny_cfg(), model=model, tokenizer=tiny_tokenizer(), recipe=tiny_recipe(),
                      progress=False)
    with pytest.raises(ModelError, match="logits are not"):
        trainer.setup()


def _scaled_forward(model, divide):
    forward = type(model).forward

    def scaled(*args, **kw):
        out = forward(model, *args, **kw)
        out.logits = out.logits / divide
        return out
    return scaled
