"""The top-level names the README's Python API section uses."""
import torch

import fastunlearn


def test_every_public_name_exists():
    for name in fastunlearn.__all__:
        assert hasattr(fastunlearn, name), name


def test_readme_loss_example_runs_from_the_top_level_import():
    from fastunlearn import StochasticRoundingAdamW, UnlearnLoss, unlearn_loss
    from fastunlearn.losses import IGNORE_INDEX, KIND_FORGET, KIND_MISMATCH, KIND_NORMAL

    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(8, 32, bias=False)
    hidden = torch.randn(6, 8, generator=g, requires_grad=True)
    labels = torch.tensor([3, 5, IGNORE_INDEX, 7, 1, 2])
    kind = torch.tensor([KIND_FORGET, KIND_FORGET, KIND_MISMATCH, KIND_MISMATCH, KIND_NORMAL,
                         KIND_NORMAL])
    ref_hidden = hidden.detach() + 0.1 * torch.randn(6, 8, generator=g)
    out = unlearn_loss(hidden, head.weight, labels, kind, ref_hidden=ref_hidden,
                       ref_weight=head.weight.detach(), eps_forget=0.5, eps_mismatch=1.0,
                       eps_normal=1.0, backend="auto")
    module_out = UnlearnLoss(eps_forget=0.5, eps_mismatch=1.0, eps_normal=1.0)(
        hidden, head.weight, labels, kind, ref_hidden=ref_hidden,
        ref_weight=head.weight.detach())
    torch.testing.assert_close(module_out.loss, out.loss)
    assert int(out.n_forget) == 2 and int(out.n_mismatch) == 1 and int(out.n_normal) == 2
    opt = StochasticRoundingAdamW(head.parameters(), lr=1e-2)
    out.loss.backward()
    before = head.weight.detach().clone()
    opt.step()
    assert not torch.equal(head.weight, before)
