"""Helpers shared by the per-model test files."""
import pytest
import torch
import torch.nn.functional as F


@pytest.fixture
def fit_losses():
    """`fit_losses(model, x, y, steps, lr)`: AdamW steps on one fixed batch; returns the losses,
    so a test can assert that a (demo) model's whole path trains."""
    def run(model, x, y, steps: int = 20, lr: float = 2e-3) -> list[float]:
        opt = torch.optim.AdamW(model.parameters(), lr=lr)
        losses = []
        for _ in range(steps):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses
    return run


@pytest.fixture
def assert_checkpointing_exact():
    """`assert_checkpointing_exact(model, x)`: gradients with set_grad_checkpointing(True) equal the plain ones."""
    def run(model, x):
        model(x).sum().backward()
        plain = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        model.set_grad_checkpointing(True)
        model(x).sum().backward()
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad, plain[n], msg=n)
    return run
