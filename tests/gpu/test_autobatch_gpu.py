"""make_training_probe on a real GPU: peak memory grows with batch, weights are restored afterwards."""
from __future__ import annotations

import pytest
import torch

from pillsnap.train.autobatch import auto_find_batch_size, make_eval_probe, make_training_probe

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_training_probe_measures_and_restores_state():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(16 * 32 * 32, 10)).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def make_batch(bs):
        return torch.randn(bs, 3, 32, 32, device="cuda"), torch.randint(0, 10, (bs,), device="cuda")

    probe = make_training_probe(model, optimizer, torch.nn.functional.cross_entropy, make_batch)
    small, large = probe(8, "bf16"), probe(256, "bf16")
    assert 0 < small < large
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert len(optimizer.state) == 0

    result = auto_find_batch_size(probe, 8, 64, 0.88)
    assert result.batch_size == 64 and result.memory_fraction is not None
    assert make_eval_probe(model, make_batch)(64, "fp32") > 0
