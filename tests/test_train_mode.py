"""SkipModuleWalks: during training, model.train() walks the submodules only when the mode changes, and
model.zero_grad() clears the trainable parameters' gradients without walking the model."""

import torch

from align.trainers.base import SkipModuleWalks


class Counting(torch.nn.Linear):
    calls = 0

    def train(self, mode=True):
        Counting.calls += 1
        return super().train(mode)


def test_train_walks_only_on_a_mode_change_and_is_removed_at_the_end():
    model = torch.nn.Sequential(Counting(2, 2), torch.nn.Sequential(Counting(2, 2), torch.nn.Dropout(0.5)))
    callback = SkipModuleWalks()
    callback.on_train_begin(None, None, None, model=model)
    Counting.calls = 0
    model.train()
    model.train()
    assert Counting.calls == 2 and model[1][1].training  # one walk over both counting children
    model.eval()  # eval() goes through it: everything switches
    assert Counting.calls == 4 and not model[1][1].training and not model[0].training
    model.train()
    assert Counting.calls == 6 and model[1][1].training
    callback.on_train_end(None, None, None, model=model)
    assert "train" not in vars(model) and "zero_grad" not in vars(model)
    model.train()
    assert Counting.calls == 8  # the plain method again


def test_zero_grad_clears_the_trainable_gradients():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    model[0].requires_grad_(False)
    callback = SkipModuleWalks()
    callback.on_train_begin(None, None, None, model=model)
    model(torch.ones(1, 2)).sum().backward()
    assert model[1].weight.grad is not None and model[0].weight.grad is None
    model.zero_grad(set_to_none=False)
    assert torch.count_nonzero(model[1].weight.grad) == 0
    model.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    callback.on_train_end(None, None, None, model=model)
