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


def close(a, b):
    """Equal up to float32 rounding: the encoder computes x·W_enc − b_dec·W_enc + b_enc, and the top-k
    decoder sums k rows, where sae-lens computes (x − b_dec)·W_enc and a dense product."""
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


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
    close(mine["mse"], out.losses["mse_loss"])
    close(mine["l1"], out.losses["l1_loss"])
    close(mine["features"], out.feature_acts)
    close(mine["reconstruction"], out.sae_out)
    mine["loss"].backward()
    out.loss.backward()
    for a, b in zip(gradients(ours), gradients(theirs)):
        close(a, b)


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
    close(mine["mse"], out.losses["mse_loss"])
    close(mine["aux"], out.losses["auxiliary_reconstruction_loss"])
    close(mine["features"], out.feature_acts)
    assert int((mine["features"] > 0).sum(-1).max()) <= k
    mine["loss"].backward()
    out.loss.backward()
    for a, b in zip(gradients(ours), gradients(theirs)):
        close(a, b)
    if n_dead:
        assert mine["aux"] > 0


def test_normalized_dead_feature_loss_is_sae_lens_over_the_error_variance():
    """Gao et al.'s form: with every dead pre-activation positive (ReLU a no-op) and more dead
    features than k_aux (sae-lens's scale 1), it is sae-lens's loss divided by Var(x − x̂)."""
    d, F, k = 16, 64, 4
    ours = SparseAutoencoder(SAEConfig(d_in=d, n_features=F, k=k, aux_coefficient=0.5, aux_normalized=True))
    theirs = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d, d_sae=F, k=k, aux_loss_coefficient=0.5,
                                                   rescale_acts_by_decoder_norm=True))
    copy_weights(ours, theirs)
    with torch.no_grad():
        for sae in (ours, theirs):
            sae.b_enc.add_(20.0)
    x = torch.randn(32, d)
    dead = torch.zeros(F, dtype=torch.bool)
    dead[:40] = True
    mine = ours.loss_terms(x, dead)
    out = theirs.training_forward_pass(step_input(x, dead))
    residual = x - mine["reconstruction"]
    variance = (residual - residual.mean(0)).pow(2).sum(-1).mean()
    close(mine["aux"] * variance, out.losses["auxiliary_reconstruction_loss"])
    close(mine["mse"], out.losses["mse_loss"])


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


# --------------------------------------------------------------------------- training on a model

from scribelm.data.prepare import prepare  # noqa: E402
from scribelm.inspect.sae_train import (  # noqa: E402
    SAETraining,
    activations,
    evaluate_sae,
    hooked,
    resample_dead_features,
    token_batches,
    top_contexts,
    train_sae,
)


@pytest.fixture(scope="module")
def lm():
    from tests.trained_tiny import trained_lm

    return trained_lm("llama")


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    from tests.trained_tiny import corpus

    root = tmp_path_factory.mktemp("sae-text")
    train, held_out = corpus()
    (root / "train.txt").write_text(train.replace("\n", "\n\n"), encoding="utf-8")
    (root / "held_out.txt").write_text(held_out.replace("\n", "\n\n"), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def trained_topk(lm, texts):
    """8× dictionary on layer 1's MLP hidden units, top-16: trained in a few seconds."""
    torch.manual_seed(0)
    settings = SAETraining(layer=1, site="mlp", k=16, steps=200, batch_tokens=512, resample_every=100, dead_window=50)
    return train_sae(lm, token_batches(lm, texts / "train.txt", batch_size=8, sequence_length=64), settings)


def held_out(lm, texts):
    return token_batches(lm, texts / "held_out.txt", batch_size=8, sequence_length=64, loop=False)


def test_topk_sae_reconstructs_mlp_activations_sparsely(lm, texts, trained_topk):
    sae, log = trained_topk
    assert sae.config.n_features == 8 * lm.config.d_mlp
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(sae.config.n_features))
    assert log[-1]["mse"] < 0.3 * log[0]["mse"]
    metrics = evaluate_sae(lm, sae, held_out(lm, texts), 1, "mlp")
    assert metrics["explained_variance"] >= 0.8
    assert metrics["l0"] <= 16
    assert metrics["dead_fraction"] < 0.1
    assert metrics["loss_clean"] <= metrics["loss_spliced"] < metrics["loss_zero_ablated"]
    assert metrics["loss_recovered"] > 0.5


def test_splicing_the_activation_back_unchanged_changes_nothing(lm, texts):
    ids = next(iter(held_out(lm, texts)))
    clean = lm.model(ids)
    for site in ("mlp", "resid"):
        with hooked(lm.model, 1, site, lambda a: a.clone()):
            torch.testing.assert_close(lm.model(ids), clean)


def test_residual_activations_are_the_models_hidden_states(lm, texts):
    ids = next(iter(held_out(lm, texts)))
    last = lm.config.n_layers - 1
    resid = activations(lm.model, ids, last, "resid")  # (B, T, C)
    torch.testing.assert_close(lm.model.final_norm(resid), lm.model.hidden_states(ids))
    assert activations(lm.model, ids, 1, "mlp").shape == (*ids.shape, lm.config.d_mlp)


def test_top_contexts_are_the_strongest_activations(lm, texts, trained_topk):
    sae, _ = trained_topk
    windows = list(held_out(lm, texts))[:4]
    features = sae.encode(torch.cat([activations(lm.model, w, 1, "mlp") for w in windows]))  # (W, T, F)
    busiest = features.gt(0).sum((0, 1)).topk(2).indices.tolist()
    contexts = top_contexts(lm, sae, windows, 1, "mlp", busiest, n=3)
    for feature in busiest:
        got = [c["activation"] for c in contexts[feature]]
        want = features[..., feature].flatten().topk(3).values.tolist()
        assert got == pytest.approx(want, rel=1e-5)
        assert all(c["token"] for c in contexts[feature])


def test_relu_sae_trains_from_prepared_shards_and_resamples_dead_features(lm, texts, tmp_path):
    prepare([texts / "train.txt"], tmp_path / "shards", lm.tokenizer, val_fraction=0.05)
    settings = SAETraining(layer=0, site="resid", features=256, l1_coefficient=0.5, steps=60, batch_tokens=256,
                           resample_every=0)
    sae, log = train_sae(lm, token_batches(lm, tmp_path / "shards", batch_size=4, sequence_length=64), settings)
    assert "l1" in log[-1] and log[-1]["loss"] < log[0]["loss"]
    x = activations(lm.model, next(iter(held_out(lm, texts))), 0, "resid").flatten(0, 1) * sae.input_scale
    optimizer = torch.optim.Adam(sae.parameters())
    sae.loss_terms(x)["loss"].backward()
    optimizer.step()
    with torch.no_grad():
        sae.b_enc[:10] = -1e4  # ten features that can never fire
    dead = torch.zeros(256, dtype=torch.bool)
    dead[:10] = True
    assert not sae.loss_terms(x)["features"][:, :10].any()
    assert resample_dead_features(sae, optimizer, x, dead) == 10
    assert sae.loss_terms(x)["features"][:, :10].gt(0).any(0).all()  # each fires on the input it was given
    assert optimizer.state[sae.b_enc]["exp_avg"][:10].eq(0).all()
    torch.testing.assert_close(sae.W_dec[:10].norm(dim=-1), torch.ones(10))


def test_save_and_load_give_the_same_sae(tmp_path, trained_topk):
    sae, _ = trained_topk
    sae.save(tmp_path / "sae.safetensors")
    again = SparseAutoencoder.load(tmp_path / "sae.safetensors")
    x = torch.randn(5, sae.config.d_in)
    torch.testing.assert_close(again(x), sae(x))
    assert again.config == sae.config
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(SAEError, match="not a scribelm sparse autoencoder"):
        SparseAutoencoder.load(tmp_path / "bad.safetensors")


def test_a_layer_the_model_lacks_is_one_clear_error(lm, texts):
    with pytest.raises(SAEError, match="has 2 layers"):
        train_sae(lm, token_batches(lm, texts / "train.txt"), SAETraining(layer=2))
    with pytest.raises(SAEError, match="unknown activation site"):
        train_sae(lm, token_batches(lm, texts / "train.txt"), SAETraining(layer=0, site="attn"))
