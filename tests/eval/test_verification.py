"""LFW-protocol verification metric: k-fold accuracy, TAR@FAR, flips, xnorm, model evaluation."""

import math

import cv2
import numpy as np
import pytest
import torch

from partial_fc.data.binfile import load_bin, write_bin
from partial_fc.errors import InputError
from partial_fc.eval import (
    DEFAULT_THRESHOLDS,
    compute_embeddings,
    evaluate,
    evaluate_model,
    kfold_accuracy,
    kfold_splits,
    pair_distances,
    tar_at_far,
)


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _separable(n_pairs, dim=32, seed=0):
    """Same pairs: nearly identical embeddings; different pairs: independent random ones (distance ~2)."""
    rng = np.random.default_rng(seed)
    issame = rng.random(n_pairs) < 0.5
    a = _unit(rng.standard_normal((n_pairs, dim)))
    other = _unit(rng.standard_normal((n_pairs, dim)))
    b = np.where(issame[:, None], a + 0.01 * rng.standard_normal((n_pairs, dim)), other)
    emb = np.empty((2 * n_pairs, dim))
    emb[0::2], emb[1::2] = a, b
    return emb * rng.uniform(5, 20, size=(2 * n_pairs, 1)), issame


def _reference_roc(dist, issame, thresholds, n_folds=10):
    """Plain-loop restatement of insightface's calculate_roc (KFold(shuffle=False), argmax, dist < t)."""
    n = len(dist)
    sizes = [n // n_folds + (1 if f < n % n_folds else 0) for f in range(n_folds)]
    starts = np.cumsum([0] + sizes)
    accs, best, tprs, fprs = [], [], [], []

    def acc(t, idx):
        pred = dist[idx] < t
        return np.mean(pred == issame[idx])

    def rate(t, idx, positive):
        sel = idx[issame[idx] == positive]
        return 0.0 if len(sel) == 0 else np.mean(dist[sel] < t)

    for f in range(n_folds):
        test = np.arange(starts[f], starts[f + 1])
        train = np.setdiff1d(np.arange(n), test)
        train_acc = [acc(t, train) for t in thresholds]
        j = int(np.argmax(train_acc))
        best.append(thresholds[j])
        accs.append(acc(thresholds[j], test))
        tprs.append([rate(t, test, True) for t in thresholds])
        fprs.append([rate(t, test, False) for t in thresholds])
    return np.array(accs), np.array(best), np.mean(tprs, 0), np.mean(fprs, 0)


def test_perfectly_separable_pairs():
    emb, issame = _separable(300)
    res = evaluate(emb, issame)
    assert res.accuracy == 1.0 and res.accuracy_std == 0.0
    assert np.all(res.fold_accuracies == 1.0) and res.fold_accuracies.shape == (10,)
    assert res.num_pairs == 300
    for far in (1e-3, 1e-4):
        assert res.tar_at_far[far].tar == 1.0 and res.tar_at_far[far].achieved_far == 0.0
    assert 0 < res.threshold < 1.0 and np.all(res.best_thresholds < 1.0)
    assert res.xnorm == pytest.approx(np.linalg.norm(emb, axis=1).mean())
    assert "accuracy 1.00000" in res.summary()


def test_random_embeddings_give_chance_accuracy():
    rng = np.random.default_rng(1)
    emb = rng.standard_normal((2 * 3000, 64))
    issame = rng.random(3000) < 0.5
    res = evaluate(emb, issame)
    assert abs(res.accuracy - 0.5) < 0.04
    assert res.tar_at_far[1e-3].tar < 0.02


def test_matches_loop_reference_with_ties_and_uneven_folds():
    rng = np.random.default_rng(2)
    n = 137  # not a multiple of 10: folds of 14 and 13 pairs
    issame = rng.random(n) < 0.4
    dist = np.where(issame, rng.normal(1.0, 0.35, n), rng.normal(1.6, 0.35, n)).clip(0, 4)
    dist[::3] = DEFAULT_THRESHOLDS[rng.integers(0, 400, size=len(dist[::3]))]  # exactly on thresholds
    got = kfold_accuracy(dist, issame)
    want_acc, want_best, want_tpr, want_fpr = _reference_roc(dist, issame, DEFAULT_THRESHOLDS)
    np.testing.assert_array_equal(got.accuracies, want_acc)
    np.testing.assert_array_equal(got.best_thresholds, want_best)
    overall = [np.mean((dist < t) == issame) for t in DEFAULT_THRESHOLDS]
    assert got.threshold == DEFAULT_THRESHOLDS[int(np.argmax(overall))]
    # insightface's fold-averaged ROC
    np.testing.assert_allclose(got.tpr, want_tpr, rtol=0, atol=1e-12)
    np.testing.assert_allclose(got.fpr, want_fpr, rtol=0, atol=1e-12)
    # one fold without negatives: its fpr counts as 0, like insightface
    issame2 = issame.copy()
    issame2[:14] = True
    got2 = kfold_accuracy(dist, issame2)
    ref2 = _reference_roc(dist, issame2, DEFAULT_THRESHOLDS)
    np.testing.assert_array_equal(got2.accuracies, ref2[0])
    np.testing.assert_allclose(got2.fpr, ref2[3], rtol=0, atol=1e-12)


def test_fold_layout_is_kfold_without_shuffle():
    splits = kfold_splits(23, 10)
    tests = [t.tolist() for _, t in splits]
    assert [len(t) for t in tests] == [3, 3, 3, 2, 2, 2, 2, 2, 2, 2]
    assert sum(tests, []) == list(range(23))  # contiguous, in order
    for train, test in splits:
        assert sorted(train.tolist() + test.tolist()) == list(range(23))
    with pytest.raises(InputError):
        kfold_splits(9, 10)
    with pytest.raises(InputError):
        kfold_splits(10, 1)


def test_hand_made_fold_case():
    """10 pairs, one per fold; pair 3 is a same pair with an outlier distance.

    Every fold picks the smallest threshold above the positives (0.51); the fold holding the outlier scores 0,
    the other nine score 1: mean 0.9, std 0.3.
    """
    dist = np.array([0.5, 0.5, 0.5, 3.0, 0.5, 1.5, 1.5, 1.5, 1.5, 1.5])
    issame = [True] * 5 + [False] * 5
    res = kfold_accuracy(dist, issame)
    np.testing.assert_array_equal(res.accuracies, [1, 1, 1, 0, 1, 1, 1, 1, 1, 1])
    np.testing.assert_allclose(res.best_thresholds, 0.51)
    assert res.threshold == pytest.approx(0.51)
    # the same through evaluate(): embeddings with those squared distances
    emb = np.zeros((20, 2))
    emb[0::2] = [1.0, 0.0]
    angles = np.arccos(1 - dist / 2)  # |u - v|^2 = 2 - 2 cos(angle)
    emb[1::2] = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    full = evaluate(3 * emb, issame)
    assert full.accuracy == pytest.approx(0.9) and full.accuracy_std == pytest.approx(0.3)
    assert full.xnorm == pytest.approx(3.0)


def test_tar_at_far_hand_made():
    neg = np.array([1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7, 1.8, 1.9])
    pos = np.array([0.5, 0.95, 1.05, 1.15, 2.5])
    dist = np.concatenate([pos, neg])
    issame = np.array([True] * 5 + [False] * 10)
    cases = {  # far: (tar, threshold, achieved far)
        0.1: (0.6, 1.1, 0.1),  # one false accept allowed: threshold at the 2nd smallest negative
        0.25: (0.8, 1.2, 0.2),
        0.05: (0.4, 1.0, 0.0),  # far * M < 1: no false accept, threshold at the closest negative
        1e-4: (0.4, 1.0, 0.0),
        1.0: (1.0, math.inf, 1.0),
    }
    for far, (tar, thr, achieved) in cases.items():
        got = tar_at_far(dist, issame, far)
        assert (got.tar, got.threshold, got.achieved_far) == pytest.approx((tar, thr, achieved)), far
        assert got.achieved_far <= far
    # ties at the threshold are not accepted (dist < threshold), so the achieved FAR can be below the target
    got = tar_at_far([0.9, 1.0, 1.0, 1.0, 1.2], [True, True, False, False, False], 0.34)
    assert (got.tar, got.threshold, got.achieved_far) == (0.5, 1.0, 0.0)
    assert math.isnan(tar_at_far([0.1, 0.2], [True, True], 0.1).tar)
    with pytest.raises(InputError):
        tar_at_far(dist, issame, 0.0)


def test_flip_embeddings_are_added_before_normalizing():
    emb, issame = _separable(200, seed=3)
    rng = np.random.default_rng(4)
    noise = rng.standard_normal(emb.shape) * 50
    # alone, the noisy embeddings are random; noise + flip is the separable set
    res_plain = evaluate(noise, issame)
    res_flip = evaluate(noise, issame, emb - noise)
    assert res_flip.accuracy == 1.0 and res_plain.accuracy < 0.75
    xnorm = np.concatenate([np.linalg.norm(noise, axis=1), np.linalg.norm(emb - noise, axis=1)]).mean()
    assert res_flip.xnorm == pytest.approx(xnorm)
    dist, _ = pair_distances(torch.from_numpy(noise).float(), torch.from_numpy(emb - noise).float())
    assert dist.shape == (200,) and np.all((dist >= 0) & (dist <= 4 + 1e-9))


def test_input_errors():
    emb, issame = _separable(20)
    with pytest.raises(InputError, match="even number"):
        evaluate(emb[:-1], issame)
    with pytest.raises(InputError, match="20 pairs"):
        evaluate(emb, issame[:-1])
    bad = emb.copy()
    bad[7, 3] = np.nan
    with pytest.raises(InputError, match="row 7"):
        evaluate(bad, issame)
    with pytest.raises(InputError, match="flip_embeddings has shape"):
        evaluate(emb, issame, emb[:, :3])
    with pytest.raises(InputError, match="bools"):
        evaluate(emb, np.full(20, 0.5))
    with pytest.raises(InputError, match="ascending"):
        kfold_accuracy(np.ones(20), issame, thresholds=[1.0, 0.5])
    assert evaluate(emb, issame.astype(int)).accuracy == 1.0  # 0/1 flags are fine


class _MeanColour(torch.nn.Module):
    """Embeds an image as its per-channel means; records calls (inputs, training flag) to check the plumbing."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.calls = []

    def forward(self, x):
        self.calls.append((x.shape[0], self.training, x[:, 0, 0, -1].clone()))
        return x.mean(dim=(2, 3)) * self.scale


def test_compute_embeddings_batches_flips_and_restores_mode():
    images = torch.randn(10, 3, 6, 8)
    model = _MeanColour()
    model.train()
    emb, flip = compute_embeddings(model, images, batch_size=4)
    assert [c[0] for c in model.calls] == [4, 4, 4, 4, 2, 2]  # original then flipped, per batch
    assert not any(c[1] for c in model.calls) and model.training  # eval during, train restored after
    torch.testing.assert_close(emb, images.mean(dim=(2, 3)))
    # the flipped batch's top-right pixel is the original's top-left: flipped along W
    torch.testing.assert_close(model.calls[1][2], images[:4, 0, 0, 0])
    torch.testing.assert_close(flip, images.flip(3).mean(dim=(2, 3)))
    emb2, none = compute_embeddings(lambda x: x[:, :, 0, 0], images, flip=False, batch_size=3)
    assert none is None and torch.equal(emb2, images[:, :, 0, 0])
    with pytest.raises(InputError, match=r"\[B, D\]"):
        compute_embeddings(lambda x: x, images)
    with pytest.raises(InputError, match="batch_size"):
        compute_embeddings(model, images, batch_size=0)


def test_end_to_end_from_bin_file(tmp_path):
    """Write a .bin of coloured pairs, load it, evaluate a colour 'model': same pairs share their colour."""
    rng = np.random.default_rng(5)
    colours = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [0, 255, 255], [255, 0, 255]])
    images, issame = [], []
    for i in range(40):
        same = bool(i % 2)
        c1 = int(rng.integers(len(colours)))
        c2 = c1 if same else int((c1 + rng.integers(1, len(colours))) % len(colours))
        for c in (c1, c2):
            rgb = np.clip(colours[c] + rng.integers(-5, 6, size=(40, 40, 3)), 0, 255).astype(np.uint8)
            ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
            images.append(buf.tobytes())
        issame.append(same)
    path = tmp_path / "colours.bin"
    write_bin(path, images, issame)
    tensor, flags = load_bin(path, (32, 32))
    res = evaluate_model(_MeanColour(), tensor, flags, batch_size=16)
    assert res.accuracy == 1.0 and res.num_pairs == 40
    assert res.tar_at_far[1e-3].tar == 1.0
