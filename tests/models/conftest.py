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
