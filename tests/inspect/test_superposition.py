"""Superposition: random directions in high dimensions are nearly orthogonal (and can
be pushed closer), and the toy model packs 5 sparse features into 2 dimensions as a
pentagon while keeping only the 2 most important when features are dense."""

from __future__ import annotations

import math

import matplotlib.image
import pytest
import torch

from scribelm.inspect.superposition import (
    SuperpositionError,
    ToyModelSettings,
    angle_range,
    plot_angle_histograms,
    plot_feature_directions,
    random_unit_vectors,
    spread_apart,
    train_toy_model,
)


def test_angle_range_is_every_pair_once():
    v = random_unit_vectors(300, 20, seed=3)
    got = angle_range(v, epsilon=10.0, chunk=64)  # several chunks
    cos = v.double() @ v.double().T
    pairs = cos[torch.triu(torch.ones(300, 300, dtype=torch.bool), diagonal=1)]
    angles = torch.rad2deg(torch.arccos(pairs.clamp(-1, 1)))
    assert got["pairs"] == 300 * 299 // 2
    assert got["min_angle"] == pytest.approx(angles.min().item(), abs=1e-3)
    assert got["max_angle"] == pytest.approx(angles.max().item(), abs=1e-3)
    assert got["mean_angle"] == pytest.approx(angles.mean().item(), abs=1e-4)
    assert got["std_angle"] == pytest.approx(angles.std(unbiased=False).item(), abs=1e-3)
    assert got["within_epsilon"] == pytest.approx((angles.sub(90).abs() < 10).double().mean().item())


def test_random_directions_are_nearly_orthogonal_and_spreading_tightens_them():
    v = random_unit_vectors(1000, 100)
    before = angle_range(v)
    # cos of two random unit vectors: mean 0, std 1/sqrt(d) -> about 5.7 degrees
    assert before["mean_angle"] == pytest.approx(90.0, abs=0.2)
    assert before["std_angle"] == pytest.approx(math.degrees(1 / math.sqrt(100)), rel=0.05)
    assert 15 < before["largest_deviation"] < 35
    after = angle_range(spread_apart(v, steps=60, rows_per_step=500))
    assert after["largest_deviation"] < before["largest_deviation"] - 5


def test_sparse_features_form_a_pentagon():
    result = train_toy_model(ToyModelSettings(sparsity=0.9, steps=1000, instances=4, batch_size=512))
    assert result["represented"] == 5
    assert result["gaps"] == pytest.approx([72.0] * 5, abs=6.0)
    assert result["W"].shape == (2, 5)


def test_dense_features_keep_only_the_most_important_orthogonal():
    result = train_toy_model(ToyModelSettings(sparsity=0.0, importance_decay=0.8, steps=800, instances=4, batch_size=512))
    norms = result["norms"]
    assert result["represented"] == 2
    assert min(norms[:2]) > 0.9 and max(norms[2:]) < 0.3  # features 0 and 1 matter most
    w0, w1 = result["W"][:, 0], result["W"][:, 1]
    assert abs(torch.dot(w0, w1) / (w0.norm() * w1.norm())) < 0.1


def test_plots_are_png_images(tmp_path):
    result = train_toy_model(ToyModelSettings(steps=50, instances=1, batch_size=64))
    plot_feature_directions(result, tmp_path / "toy.png", title="5 features in 2 dimensions")
    v = random_unit_vectors(200, 10)
    plot_angle_histograms(v, spread_apart(v, steps=5), tmp_path / "angles.png")
    for name in ("toy.png", "angles.png"):
        image = matplotlib.image.imread(tmp_path / name)
        assert image.ndim == 3 and image.shape[0] > 100 and image.std() > 0


def test_bad_settings_are_one_clear_error():
    with pytest.raises(SuperpositionError, match="d < n"):
        train_toy_model(ToyModelSettings(n_features=3, d_hidden=3))
    with pytest.raises(SuperpositionError, match="sparsity"):
        train_toy_model(ToyModelSettings(sparsity=1.0))
    with pytest.raises(SuperpositionError, match="at least 2 vectors"):
        random_unit_vectors(1, 10)
