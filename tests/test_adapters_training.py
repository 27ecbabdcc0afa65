"""Tests of CLAP, TaskRes and CLIP-Adapter on tiny synthetic features (CPU, 1 thread).

Data: C=10 classes, D=32, K=16 shots (N=160), 100 val, 1,000 test features; zero-shot test
accuracy 0.465 at seed 0. Every method runs its full default (published) schedule in
`test_beats_zeroshot` (300 / 200 / 200 epochs: under half a second each at this size);
the other tests use a few epochs.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from synthetic_features import make_data
from torch.nn import functional as F

from clip_utils.methods import clap, clip_adapter, taskres
from clip_utils.model.feature_fit import accuracy, dassl_lr, zeroshot_logits

C, D, K, N_VAL, N_TEST = 10, 32, 16, 100, 1000
METHODS = {"clap": clap, "taskres": taskres, "clip_adapter": clip_adapter}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def split16():
    return make_data(C, D, K, N_VAL, N_TEST, seed=0)


@pytest.fixture(scope="module")
def split_views():
    return make_data(C, D, 4, N_VAL, 50, seed=3, n_views=3)


def test_synthetic_zeroshot_is_informative_but_imperfect(split16):
    data, test_x, test_y = split16
    acc = accuracy(zeroshot_logits(test_x, data), test_y)
    assert 0.4 <= acc <= 0.7


@pytest.mark.parametrize("name", list(METHODS))
def test_beats_zeroshot(split16, name):
    """Full published schedule (module defaults), K=16: a clear margin over zero-shot on test."""
    data, test_x, test_y = split16
    zs = accuracy(zeroshot_logits(test_x, data), test_y)
    fitted = METHODS[name].fit(data, seed=0)
    with torch.no_grad():
        acc = accuracy(fitted.module(test_x), test_y)
    assert acc >= zs + 0.10, (name, acc, zs)
    assert len(fitted.curves) == {"clap": 300, "taskres": 200, "clip_adapter": 200}[name]


def test_taskres_zero_residual_is_zeroshot(split16):
    data, test_x, _ = split16
    head = taskres.TaskResHead(C, D, alpha=0.5, logit_scale=data.logit_scale)
    head.base_text.copy_(data.text)
    zs = zeroshot_logits(test_x, data)
    with torch.no_grad():
        out = head(test_x)
    assert out.dtype == torch.float32 and out.shape == (N_TEST, C)
    torch.testing.assert_close(out, zs, rtol=0, atol=1e-4)  # float32 rounding of a renormalisation
    assert torch.equal(out.argmax(-1), zs.argmax(-1))
    fitted = taskres.fit(data, epochs=0)  # X = 0 untouched
    assert torch.count_nonzero(fitted.module.residual) == 0
    with torch.no_grad():
        torch.testing.assert_close(fitted.module(test_x), zs, rtol=0, atol=1e-4)


def test_clip_adapter_ratio_zero_is_zeroshot(split16):
    data, test_x, _ = split16
    fitted = clip_adapter.fit(data, ratio=0.0, epochs=3)  # the adapter trains but is blended out
    zs = zeroshot_logits(test_x, data)
    with torch.no_grad():
        out = fitted.module(test_x)
    torch.testing.assert_close(out, zs, rtol=0, atol=1e-4)
    assert torch.equal(out.argmax(-1), zs.argmax(-1))


def test_clap_epoch0_is_zeroshot(split16):
    data, test_x, _ = split16
    fitted = clap.fit(data, epochs=0)
    zs = zeroshot_logits(test_x, data)
    with torch.no_grad():
        out = fitted.module(test_x)
    assert fitted.curves == []
    assert torch.equal(out.argmax(-1), zs.argmax(-1))
    torch.testing.assert_close(out, zs, rtol=0, atol=1e-4)
    assert fitted.info["val_acc"] == fitted.info["zs_val_acc"]


def test_clap_multipliers_are_zeroshot_true_class_confidence(split16):
    data, _, _ = split16
    fitted = clap.fit(data, epochs=0)
    probs = zeroshot_logits(data.support, data).softmax(-1)
    expected = torch.stack([probs[data.support_labels == c, c].mean() for c in range(C)])
    torch.testing.assert_close(fitted.module.multipliers, expected)
    assert clap.fit(data, epochs=0, constraint="none").module.multipliers.abs().sum() == 0


def test_clap_penalty_keeps_prototypes_nearer_the_text(split16):
    data, _, _ = split16
    dist = {}
    for constraint in ("l2", "none"):
        probe = clap.fit(data, epochs=30, constraint=constraint).module
        dist[constraint] = (probe.prototypes - data.text).norm().item()
    assert 0 < dist["l2"] < dist["none"]


def test_clap_penalty_formula():
    probe = clap.CLAPProbe(3, 4)
    with torch.no_grad():
        probe.prototypes.copy_(torch.eye(3, 4))
        probe.base_text.zero_()
        probe.multipliers.copy_(torch.tensor([0.5, 1.0, 0.0]))
    assert probe.penalty().item() == pytest.approx((0.5 + 1.0 + 0.0) / 3)


@pytest.mark.parametrize("name", list(METHODS))
def test_rebuild_round_trip(split16, name):
    data, test_x, _ = split16
    fitted = METHODS[name].fit(data, epochs=5, seed=0)
    config = json.loads(json.dumps(fitted.config))  # JSON-able
    rebuilt = type(fitted.module)(**config)
    rebuilt.load_state_dict(fitted.module.state_dict())  # strict: every tensor a param/buffer
    with torch.no_grad():
        assert torch.equal(rebuilt(test_x), fitted.module(test_x))
    json.dumps(fitted.info)
    json.dumps(fitted.curves)


@pytest.mark.parametrize("name", list(METHODS))
def test_deterministic(split_views, name):
    data, test_x, _ = split_views
    outs = []
    for _ in range(2):
        fitted = METHODS[name].fit(data, epochs=4, seed=7)
        with torch.no_grad():
            outs.append(fitted.module(test_x))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("name", list(METHODS))
def test_curves_and_last_epoch_selection(split16, name):
    data, _, _ = split16
    epochs = 6
    fitted = METHODS[name].fit(data, epochs=epochs)
    assert [c["epoch"] for c in fitted.curves] == list(range(1, epochs + 1))
    for c in fitted.curves:
        assert set(c) == {"epoch", "train_loss", "val_loss", "val_acc", "seconds"}
        assert all(math.isfinite(v) for v in c.values())
    seconds = [c["seconds"] for c in fitted.curves]
    assert seconds == sorted(seconds)
    assert fitted.info["best_epoch"] == epochs  # the last epoch, as published
    assert fitted.info["val_acc"] == fitted.curves[-1]["val_acc"]
    with torch.no_grad():
        val = fitted.module(data.val)
    assert F.cross_entropy(val, data.val_labels).item() == pytest.approx(
        fitted.curves[-1]["val_loss"], rel=1e-5
    )


@pytest.mark.parametrize("name", ["taskres", "clip_adapter"])
def test_select_on_val(split16, name):
    data, _, _ = split16
    fitted = METHODS[name].fit(data, epochs=40, select="val")
    accs = [c["val_acc"] for c in fitted.curves]
    best = fitted.info["best_epoch"]
    if best > 0:
        assert accs[best - 1] == max(accs) and accs.index(max(accs)) == best - 1
    with torch.no_grad():
        assert accuracy(fitted.module(data.val), data.val_labels) == pytest.approx(fitted.info["val_acc"])


def test_views_are_the_training_pool(split_views):
    data, _, _ = split_views
    fitted = clap.fit(data, epochs=2)
    assert fitted.info["trained_on_views"] and fitted.info["n_train"] == 3 * data.support.shape[0]
    assert not clap.fit(data, epochs=2, use_views=False).info["trained_on_views"]
    for mod in (taskres, clip_adapter):
        assert mod.fit(data, epochs=2).info["trained_on_views"]


def test_dassl_schedule():
    """Constant warm-up epoch at 1e-5, then cosine from the base lr over `epochs` epochs."""
    lrs = [dassl_lr(e, 0.1, 300, 1, 1e-5) for e in range(300)]
    assert lrs[0] == 1e-5 and lrs[1] == pytest.approx(0.1)
    assert lrs[151] == pytest.approx(0.05)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))
    assert lrs[-1] == pytest.approx(0.05 * (1 - math.cos(math.pi * 2 / 300)))  # epoch 299


def test_clip_adapter_lr_scaling(split16):
    data, _, _ = split16
    assert clip_adapter.fit(data, epochs=1).info["lr"] == pytest.approx(2e-3 * 160 / 32)  # N=160 < 256
    assert clip_adapter.fit(data, epochs=1, batch_size=32).info["lr"] == pytest.approx(2e-3)
    assert clip_adapter.fit(data, epochs=1, lr=0.05).info["lr"] == 0.05


def test_clip_adapter_hand_written_gradients_match_autograd(split16):
    data, _, _ = split16
    head = clip_adapter.fit(data, epochs=3, seed=1).module  # trained: some ReLUs inactive
    x, y = data.support[:50], data.support_labels[:50]
    loss = F.cross_entropy(head(x), y)
    head.zero_grad()
    loss.backward()
    ours, dw1, dw2 = clip_adapter.adapter_grads(head, x, F.one_hot(y, C).float())
    torch.testing.assert_close(ours, loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dw1, head.fc1.weight.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(dw2, head.fc2.weight.grad, rtol=1e-4, atol=1e-6)


def test_clip_adapter_update_matches_torch_sgd(split16):
    """Two epochs of the hand-written SGD == torch.optim.SGD with autograd on the same batches."""
    data, _, _ = split16
    kw = dict(epochs=2, batch_size=64, lr=0.05, warmup_epochs=0)
    fitted = clip_adapter.fit(data, seed=5, **kw)
    # Replay: same init and shuffles as `fit` (same generator calls, same order).
    gen = torch.Generator().manual_seed(5)
    ref = clip_adapter.CLIPAdapterHead(C, D, 0.2, data.logit_scale)
    with torch.no_grad():
        ref.text.copy_(data.text)
        for lin in (ref.fc1, ref.fc2):
            bound = 1.0 / math.sqrt(lin.in_features)
            lin.weight.copy_(torch.rand(lin.weight.shape, generator=gen) * (2 * bound) - bound)
    opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    n = data.support.shape[0]
    for epoch in range(2):
        for group in opt.param_groups:
            group["lr"] = dassl_lr(epoch, 0.05, 2, 0, 1e-5)
        perm = torch.randperm(n, generator=gen)
        x, y = data.support[perm], data.support_labels[perm]
        for b in range(n // 64):
            loss = F.cross_entropy(ref(x[b * 64 : (b + 1) * 64]), y[b * 64 : (b + 1) * 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
    for a, b in zip(fitted.module.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
