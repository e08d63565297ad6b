"""The structured LoHa/LoKr training forward (trainer/lora/lycoris_fast.py) gives what peft's own forward gives:
the same outputs and the same gradients, rank dropout included (the same random rows are dropped), on layers where
the LoHa delta is folded into the weight and on layers where it is applied as a rank-r*r pair."""

import copy

import pytest
import torch

peft = pytest.importorskip("peft")


class Layers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(96, 120)
        self.conv = torch.nn.Conv2d(48, 64, 3, padding=1)
        self.pointwise = torch.nn.Conv2d(48, 40, 1, stride=2)
        # narrow layers: a LoHa's rank-r*r pair costs more than the layer, so the delta is folded into the weight
        self.narrow_lin = torch.nn.Linear(24, 20)
        self.narrow_conv = torch.nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x, y):
        return (self.lin(x), self.conv(y), self.pointwise(y), self.narrow_lin(x[..., :24]),
                self.narrow_conv(y[:, :8]))


TARGETS = ["lin", "conv", "pointwise", "narrow_lin", "narrow_conv"]


CONFIGS = {
    "loha": lambda t: peft.LoHaConfig(r=4, alpha=2, target_modules=t, rank_dropout=0.3),
    "loha_rank1": lambda t: peft.LoHaConfig(r=1, alpha=1, target_modules=t),
    # module dropout: the folded forward skips the same modules as peft's (one draw per module and call)
    "loha_module_dropout": lambda t: peft.LoHaConfig(r=4, alpha=2, target_modules=t, rank_dropout=0.3,
                                                     module_dropout=0.5),
    "lokr": lambda t: peft.LoKrConfig(r=4, alpha=2, target_modules=t, rank_dropout=0.3, rank_dropout_scale=True),
    "lokr_decompose_both": lambda t: peft.LoKrConfig(r=2, alpha=2, target_modules=t, decompose_both=True,
                                                     decompose_factor=4),
}


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_structured_forward_equals_peft_forward(kind):
    from trainer.lora.lycoris_fast import _loha_fold_pays, install
    torch.manual_seed(0)
    ours = peft.inject_adapter_in_model(CONFIGS[kind](TARGETS), Layers(), "default")
    with torch.no_grad():  # peft zero-initialises one factor; random factors so that every gradient is non-zero
        for name, p in ours.named_parameters():
            if "hada_" in name or "lokr_" in name:
                p.normal_(0, 0.1)
    theirs = copy.deepcopy(ours)
    layers = [m for m in ours.modules() if hasattr(m, "rank_dropout")]
    assert [install(m, "default") for m in layers] == [True] * len(TARGETS)
    x, y = torch.randn(3, 7, 96), torch.randn(2, 48, 9, 9)
    if kind.startswith("loha") and kind != "loha_rank1":  # both LoHa paths are taken: folded and rank-r*r pair
        folds = {n: _loha_fold_pays(getattr(ours, n), "default", x[..., :24] if n == "narrow_lin" else
                                    (y[:, :8] if n == "narrow_conv" else (x if n == "lin" else y))) for n in TARGETS}
        assert folds == {"lin": False, "conv": False, "pointwise": True, "narrow_lin": True, "narrow_conv": True}
    for training in (False, True):
        ours.train(training)
        theirs.train(training)
        outs = []
        for model in (ours, theirs):
            torch.manual_seed(5)  # the same rank-dropout rows
            out = model(x, y)
            sum(o.square().sum() for o in out).backward()
            outs.append(out)
        for a, b in zip(*outs):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        grads = [{n: p.grad for n, p in m.named_parameters() if p.grad is not None} for m in (ours, theirs)]
        assert grads[0].keys() == grads[1].keys() and grads[0]
        for n in grads[0]:
            torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-5 * grads[1][n].abs().max().item())
        ours.zero_grad()
        theirs.zero_grad()


def test_tucker_convs_keep_peft_forward():
    from trainer.lora.lycoris_fast import install
    model = peft.inject_adapter_in_model(peft.LoHaConfig(r=2, alpha=2, target_modules=["conv"],
                                                         use_effective_conv2d=True), Layers(), "default")
    assert install(model.conv, "default") is False
    assert "_get_delta_activations" not in model.conv.__dict__
