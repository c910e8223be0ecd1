"""EDM preconditioning: unit-variance network inputs and targets across sigma."""

import torch

from edmkit.loss import EDMLoss, edm_loss_weight
from edmkit.precond import edm_precond, network_target


def test_unit_variance_input_and_target_over_sigma():
    sigma_data = 0.5
    g = torch.Generator().manual_seed(0)
    y = torch.randn(20_000, generator=g) * sigma_data  # data with std sigma_data
    for sigma in torch.logspace(torch.log10(torch.tensor(0.002)), torch.log10(torch.tensor(80.0)), 12):
        n = torch.randn(20_000, generator=g) * sigma
        x = y + n
        _, _, c_in, _ = edm_precond(sigma, sigma_data=sigma_data)
        assert abs((c_in * x).std().item() - 1) < 0.03, sigma
        target = network_target(y, x, sigma, sigma_data=sigma_data)
        assert abs(target.std().item() - 1) < 0.03, sigma


def test_loss_weight_gives_unit_loss_for_zero_output():
    # With F = 0 the weighted loss lambda(sigma) * c_out^2 * E[target^2] equals 1 (EDM Sec. 5).
    sigma = torch.tensor([0.01, 0.5, 10.0])
    _, c_out, _, _ = edm_precond(sigma, sigma_data=0.5)
    assert torch.allclose(edm_loss_weight(sigma, sigma_data=0.5) * c_out**2, torch.ones(3), rtol=1e-5)


def test_stratified_sigma_has_lower_variance_of_batch_mean_weight():
    loss_iid = EDMLoss(stratified=False)
    loss_ld = EDMLoss(stratified=True)
    g = torch.Generator().manual_seed(1)
    means_iid = torch.stack([loss_iid.sample_sigma(32, generator=g).log().mean() for _ in range(300)])
    means_ld = torch.stack([loss_ld.sample_sigma(32, generator=g).log().mean() for _ in range(300)])
    assert means_ld.var() < 0.2 * means_iid.var()
