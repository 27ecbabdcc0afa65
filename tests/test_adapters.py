"""Tests of Tip-Adapter, Tip-Adapter-F, GDA and LP++ on tiny synthetic features (CPU, 1 thread)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from synthetic_features import make_data
from torch.nn.functional import one_hot

from clip_utils.methods import gda, lp_pp, tip_adapter, tip_adapter_f
from clip_utils.model import cache_model
from clip_utils.model.feature_fit import accuracy, zeroshot_logits

torch.set_num_threads(1)

C, D, K, N_VAL, N_TEST = 10, 32, 16, 200, 500
METHODS = {
    "tip_adapter": tip_adapter,
    "tip_adapter_f": tip_adapter_f,
    "gda": gda,
    "lp_pp": lp_pp,
}


@pytest.fixture(scope="module")
def split16():
    return make_data(C, D, K, N_VAL, N_TEST, seed=0)


@pytest.fixture(scope="module")
def fitted16(split16):
    data, _, _ = split16
    return {name: m.fit(data, seed=0) for name, m in METHODS.items()}


def test_synthetic_zeroshot_is_informative_but_imperfect(split16):
    data, test, test_labels = split16
    acc = accuracy(zeroshot_logits(test, data), test_labels)
    assert 0.3 < acc < 0.75


# ---------------------------------------------------------------- formulas, written out again


def test_tip_adapter_fixed_matches_formula(split16):
    data, test, _ = split16
    alpha, beta = 2.5, 5.5
    fitted = tip_adapter.fit(data, alpha=alpha, beta=beta)
    assert (
        fitted.info["alpha"] == alpha
        and fitted.info["beta"] == beta
        and fitted.info["searched"] == []
    )
    values = one_hot(data.support_labels, C).float()
    want = (
        data.logit_scale * test @ data.text.t()
        + alpha * torch.exp(-beta * (1 - test @ data.support.t())) @ values
    )
    got = fitted.module(test)
    assert got.dtype == torch.float32 and got.shape == (N_TEST, C)
    torch.testing.assert_close(got, want)
    assert torch.equal(got.argmax(1), want.argmax(1))


def test_tip_adapter_keys_average_views():
    data, test, _ = make_data(C, D, 2, N_VAL, 50, seed=1, n_views=3)
    fitted = tip_adapter.fit(data, alpha=1.0, beta=3.0)
    keys = data.views.mean(0)
    keys = keys / keys.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(fitted.module.keys.detach(), keys)
    want = (
        data.logit_scale * test @ data.text.t()
        + torch.exp(-3.0 * (1 - test @ keys.t())) @ data.one_hot()
    )
    torch.testing.assert_close(fitted.module(test), want)


def test_tip_adapter_search_table_equals_brute_force(split16):
    data, _, _ = split16
    betas, alphas = (
        cache_model.DEFAULT_BETA_GRID[::7],
        cache_model.DEFAULT_ALPHA_GRID[::3],
    )
    zs = zeroshot_logits(data.val, data)
    affinity = data.val @ data.support.t()
    table = cache_model.search_table(
        zs, affinity, data.support_labels, data.val_labels, C, betas, alphas
    )
    values = data.one_hot()
    for i, beta in enumerate(betas):
        cache = torch.exp(-beta * (1 - affinity)) @ values
        for j, alpha in enumerate(alphas):
            assert int(table[i, j]) == int(
                ((zs + alpha * cache).argmax(1) == data.val_labels).sum()
            )


def test_tip_adapter_search_is_first_best_on_val(split16, fitted16):
    data, _, _ = split16
    fitted = fitted16["tip_adapter"]
    assert fitted.info["searched"] == ["beta", "alpha"]
    values = data.one_hot()
    affinity = data.val @ data.support.t()
    zs = zeroshot_logits(data.val, data)
    best, best_point = -1, None
    for beta in cache_model.DEFAULT_BETA_GRID:
        cache = torch.exp(-beta * (1 - affinity)) @ values
        for alpha in cache_model.DEFAULT_ALPHA_GRID:
            hits = int(((zs + alpha * cache).argmax(1) == data.val_labels).sum())
            if hits > best:
                best, best_point = hits, (beta, alpha)
    assert (fitted.info["beta"], fitted.info["alpha"]) == best_point
    assert fitted.info["val_acc"] == pytest.approx(best / N_VAL)


def _published_gda(data, alpha, feats, labels):
    """`main_few_shots.py` `run`, written out again (float64, pinv)."""
    feats = feats.double()
    mus = torch.stack([feats[labels == k].mean(0) for k in range(C)])
    centred = torch.cat([feats[labels == k] - mus[k] for k in range(C)])
    cov = centred.t().cov()
    cov_inv = centred.shape[1] * torch.linalg.pinv(
        (centred.shape[0] - 1) * cov + cov.trace() * torch.eye(D, dtype=torch.float64)
    )
    w = mus @ cov_inv
    b = math.log(1.0 / C) - torch.einsum("nd,dc,nc->n", mus, cov_inv, mus) / 2
    return lambda x: (
        data.logit_scale * x.double() @ data.text.double().t()
        + alpha * (x.double() @ w.t() + b)
    ).float()


@pytest.mark.parametrize("n_views", [0, 3])
def test_gda_fixed_matches_published_formula(n_views):
    data, test, _ = make_data(C, D, K, N_VAL, N_TEST, seed=0, n_views=n_views)
    alpha = 10.0
    fitted = gda.fit(data, alpha=alpha)
    if n_views:
        feats, labels = data.views.reshape(-1, D), data.support_labels.repeat(n_views)
    else:
        feats, labels = data.support, data.support_labels
    want = _published_gda(data, alpha, feats, labels)(test)
    got = fitted.module(test)
    assert got.dtype == torch.float32 and got.shape == (N_TEST, C)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)
    assert torch.equal(got.argmax(1), want.argmax(1))
    assert fitted.info["used_views"] == bool(n_views)


def test_gda_search_uses_published_grid_first_best(fitted16):
    fitted = fitted16["gda"]
    accs = fitted.info["alpha_val_acc"]
    assert list(map(float, accs)) == gda.DEFAULT_ALPHA_GRID
    best = max(accs.values())
    assert fitted.info["alpha"] == next(float(a) for a, v in accs.items() if v == best)


def test_gda_one_shot_without_views_is_zeroshot():
    data, test, _ = make_data(C, D, 1, N_VAL, N_TEST, seed=2)
    for alpha in (None, 100.0):
        fitted = gda.fit(data, alpha=alpha)
        assert "zero-shot" in fitted.info["note"]
        assert torch.equal(
            fitted.module(test).argmax(1), zeroshot_logits(test, data).argmax(1)
        )
    with_views = gda.fit(make_data(C, D, 1, N_VAL, N_TEST, seed=2, n_views=4)[0])
    assert "note" not in with_views.info


# ---------------------------------------------------------------- LP++ follows the published loop


def test_lp_pp_follows_published_updates(split16):
    data, _, _ = split16
    epochs = 25
    fitted = lp_pp.fit(data, epochs=epochs, seed=3)
    # the same start: nn.Linear's default bias init, drawn from the seeded generator as `fit` does
    b0 = (
        torch.rand(C, generator=torch.Generator().manual_seed(3)) * 2 - 1
    ) / math.sqrt(D)
    losses, val_accs = _published_lp_pp(data, epochs, b0)
    assert len(fitted.curves) == epochs
    torch.testing.assert_close(
        [c["train_loss"] for c in fitted.curves], losses, rtol=1e-4, atol=1e-5
    )
    assert [c["val_acc"] for c in fitted.curves] == pytest.approx(val_accs)
    best = max(val_accs)
    assert fitted.info["best_epoch"] == max(
        i + 1 for i, v in enumerate(val_accs) if v == best
    )  # last best
    assert fitted.info["val_acc"] == pytest.approx(best)


def _published_lp_pp(data, epochs, b0):
    """`linear_probe_p2.py` `forward`, written out again with autograd and torch.optim.SGD."""
    feats, labels, text = data.support, data.support_labels, data.text.t()
    n = feats.shape[0]
    classifier = torch.nn.Linear(D, C, bias=True)
    classifier.weight.data = one_hot(labels, C).float().t() @ feats
    classifier.bias.data = b0.clone()
    ftt = feats @ text
    lr_w = 4 * n / float(torch.linalg.eigvalsh((feats.t() @ feats).double())[-1])
    lr_alpha = n / (4 * float(ftt.pow(2).sum(0).max()))
    own = torch.stack([ftt[labels == k, k].mean() for k in range(C)])
    alpha_vec = (250.0 * own.mean() * torch.ones(1, C)).requires_grad_(True)
    optimizer = torch.optim.SGD(classifier.parameters(), lr_w, momentum=0.9)
    losses, val_accs = [], []
    for epoch in range(epochs):
        logits = classifier(feats) + torch.ones(n, 1) @ alpha_vec * ftt
        loss = torch.nn.functional.cross_entropy(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if (epoch + 1) % 10 == 0:
            alpha_vec.data -= (
                lr_alpha * alpha_vec.grad.data
            )  # grad never zeroed: accumulated
        losses.append(loss.item())
        with torch.no_grad():
            val_logits = classifier(data.val) + alpha_vec * (data.val @ text)
        val_accs.append(accuracy(val_logits, data.val_labels))
    return losses, val_accs


# ---------------------------------------------------------------- behaviour


@pytest.mark.parametrize("name", list(METHODS))
def test_beats_zeroshot_on_test_at_16_shots(name, split16, fitted16):
    data, test, test_labels = split16
    zs = accuracy(zeroshot_logits(test, data), test_labels)
    acc = accuracy(fitted16[name].module(test), test_labels)
    assert acc > zs + 0.1, (name, acc, zs)


def test_tip_adapter_f_not_below_tip_adapter_on_val(fitted16):
    tip, tip_f = fitted16["tip_adapter"], fitted16["tip_adapter_f"]
    assert tip_f.info["val_acc"] >= tip.info["val_acc"]


@pytest.mark.parametrize("name", ["tip_adapter_f", "lp_pp"])
def test_trained_curves(name, fitted16):
    fitted = fitted16[name]
    epochs = fitted.info["epochs"]
    assert [c["epoch"] for c in fitted.curves] == list(range(1, epochs + 1))
    for c in fitted.curves:
        assert set(c) == {"epoch", "train_loss", "val_loss", "val_acc", "seconds"}
    assert fitted.curves[-1]["train_loss"] < fitted.curves[0]["train_loss"]
    assert 1 <= fitted.info["best_epoch"] <= epochs
    assert fitted.curves[fitted.info["best_epoch"] - 1]["val_acc"] == max(
        c["val_acc"] for c in fitted.curves
    )


def test_tip_adapter_f_keys_move_and_views_are_used():
    data, _, _ = make_data(C, D, 4, N_VAL, 50, seed=4, n_views=3, logit_scale=10.0)
    fitted = tip_adapter_f.fit(data, epochs=3, seed=1)
    keys0, _ = cache_model.cache_keys(data)
    assert not torch.allclose(fitted.module.keys.detach(), keys0)
    assert "view" in fitted.info["train_features"]
    again = tip_adapter_f.fit(data, epochs=3, seed=1)
    assert torch.equal(again.module.keys, fitted.module.keys)


@pytest.mark.parametrize("name", list(METHODS))
def test_rebuild_round_trip(name, split16, fitted16):
    _, test, _ = split16
    fitted = fitted16[name]
    json.dumps(fitted.config)
    json.dumps(fitted.info)
    json.dumps(fitted.curves)
    rebuilt = type(fitted.module)(**fitted.config)
    rebuilt.load_state_dict(fitted.module.state_dict())
    rebuilt.eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(test), fitted.module(test), rtol=0, atol=0)
