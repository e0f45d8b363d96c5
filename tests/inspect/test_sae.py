"""Sparse autoencoders: the training math is sae-lens's (same weights and batch ->
the same loss terms and gradients), and an SAE trained on a small trained model's
MLP activations reconstructs them, sparsely, with few dead features."""

from __future__ import annotations

import pytest
import torch
from sae_lens.saes.sae import TrainStepInput
from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

from scribelm.inspect.sae import SAEConfig, SAEError, SparseAutoencoder


def copy_weights(ours: SparseAutoencoder, theirs) -> None:
    """The same random weights in both (not unit decoder rows, so the norm weighting shows)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            value = torch.randn_like(getattr(ours, name)) * (0.3 if name.startswith("b") else 1.0)
            getattr(ours, name).copy_(value)
            getattr(theirs, name).copy_(value)


def step_input(x, dead=None, l1=None):
    return TrainStepInput(sae_in=x, coefficients={} if l1 is None else {"l1": l1}, dead_neuron_mask=dead,
                          n_training_steps=0, is_logging_step=False)


def gradients(module, names=("W_enc", "b_enc", "W_dec", "b_dec")):
    return [getattr(module, n).grad.clone() for n in names]


def test_relu_l1_loss_terms_and_gradients_equal_sae_lens():
    d, F, l1 = 16, 64, 0.7
    ours = SparseAutoencoder(SAEConfig(d_in=d, n_features=F, l1_coefficient=l1))
    theirs = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=d, d_sae=F, l1_coefficient=l1))
    copy_weights(ours, theirs)
    x = torch.randn(32, d) * 2
    mine = ours.loss_terms(x)
    out = theirs.training_forward_pass(step_input(x, l1=l1))
    torch.testing.assert_close(mine["mse"], out.losses["mse_loss"])
    torch.testing.assert_close(mine["l1"], out.losses["l1_loss"])
    torch.testing.assert_close(mine["features"], out.feature_acts)
    torch.testing.assert_close(mine["reconstruction"], out.sae_out)
    mine["loss"].backward()
    out.loss.backward()
    for a, b in zip(gradients(ours), gradients(theirs)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("n_dead", [0, 3, 40])
def test_topk_loss_terms_and_gradients_equal_sae_lens(n_dead):
    d, F, k = 16, 64, 4
    ours = SparseAutoencoder(SAEConfig(d_in=d, n_features=F, k=k, aux_coefficient=0.5))
    theirs = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d, d_sae=F, k=k, aux_loss_coefficient=0.5,
                                                   rescale_acts_by_decoder_norm=True))
    copy_weights(ours, theirs)
    x = torch.randn(32, d)
    dead = torch.zeros(F, dtype=torch.bool)
    dead[torch.randperm(F, generator=torch.Generator().manual_seed(n_dead))[:n_dead]] = True
    mine = ours.loss_terms(x, dead)
    out = theirs.training_forward_pass(step_input(x, dead))
    torch.testing.assert_close(mine["mse"], out.losses["mse_loss"])
    torch.testing.assert_close(mine["aux"], out.losses["auxiliary_reconstruction_loss"])
    torch.testing.assert_close(mine["features"], out.feature_acts)
    assert int((mine["features"] > 0).sum(-1).max()) <= k
    mine["loss"].backward()
    out.loss.backward()
    for a, b in zip(gradients(ours), gradients(theirs)):
        torch.testing.assert_close(a, b)
    if n_dead:
        assert mine["aux"] > 0


def test_normalizing_the_decoder_keeps_topk_features_and_reconstruction():
    sae = SparseAutoencoder(SAEConfig(d_in=8, n_features=32, k=3))
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(32, 1) * 3 + 0.1)
        sae.b_enc.normal_()
    x = torch.randn(10, 8)
    before = sae.loss_terms(x)
    sae.normalize_decoder()
    after = sae.loss_terms(x)
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(32))
    torch.testing.assert_close(before["reconstruction"], after["reconstruction"])


def test_bad_settings_are_one_clear_error():
    with pytest.raises(SAEError, match="k must be"):
        SAEConfig(d_in=8, n_features=16, k=17)
    with pytest.raises(SAEError, match="positive"):
        SAEConfig(d_in=0, n_features=16)
