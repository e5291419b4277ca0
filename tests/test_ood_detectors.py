"""Feature-space OOD detectors against independent references (scikit-learn, numpy)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.covariance import EmpiricalCovariance
from sklearn.neighbors import NearestNeighbors
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bayesify as bf
from bayesify.errors import InputError, NotFittedError, UnsupportedModelError
from bayesify.ood import (
    ASH,
    KNN,
    ODIN,
    CombinedScore,
    Mahalanobis,
    PredictiveScore,
    ReActEnergy,
    RelativeMahalanobis,
    ViM,
)

NUM_CLASSES, IN, HIDDEN = 4, 6, 12


def _net(dtype: torch.dtype, activation: type[nn.Module] = nn.Tanh, seed: int = 0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(IN, HIDDEN), activation(),
                         nn.Linear(HIDDEN, NUM_CLASSES)).to(dtype)


def _data(dtype: torch.dtype, n: int = 400, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    centers = 2 * torch.randn(NUM_CLASSES, IN, generator=g, dtype=torch.float64)
    y = torch.randint(NUM_CLASSES, (n,), generator=g)
    x = centers[y] + torch.randn(n, IN, generator=g, dtype=torch.float64)
    x_test = 1.5 * torch.randn(150, IN, generator=g, dtype=torch.float64)
    return x.to(dtype), y, x_test.to(dtype)


def _features(net: nn.Sequential, x: torch.Tensor) -> np.ndarray:
    """The head's input, computed without hooks, in float64 numpy."""
    with torch.no_grad():
        return net[1](net[0](x)).double().numpy()


def _close(actual: torch.Tensor, expected: np.ndarray) -> None:
    np.testing.assert_allclose(actual.double().numpy(), expected, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------
# Agreement with references
# --------------------------------------------------------------------------------------


def _sklearn_mahalanobis(train: np.ndarray, y: np.ndarray, test: np.ndarray):
    means = np.stack([train[y == c].mean(0) for c in range(NUM_CLASSES)])
    tied = EmpiricalCovariance().fit(train - means[y])
    per_class = np.stack([tied.mahalanobis(test - m) for m in means], axis=1)
    background = EmpiricalCovariance().fit(train).mahalanobis(test)
    return per_class.min(1), per_class.min(1) - background


def test_mahalanobis_and_relative_match_sklearn_empirical_covariance(dtype):
    net = _net(dtype)
    x, y, x_test = _data(dtype)
    plain, relative = _sklearn_mahalanobis(_features(net, x), y.numpy(), _features(net, x_test))
    md = Mahalanobis().fit(net, (x, y))
    scores = md.score(x_test)
    assert scores.shape == (150,) and scores.dtype == dtype
    _close(scores, plain)
    _close(RelativeMahalanobis().fit(net, (x, y)).score(x_test), relative)


@pytest.mark.parametrize("k", [1, 50])
def test_knn_matches_sklearn_nearest_neighbors(k, dtype):
    net = _net(dtype)
    x, _, x_test = _data(dtype)
    bank, test = _features(net, x), _features(net, x_test)
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    test /= np.linalg.norm(test, axis=1, keepdims=True)
    expected = NearestNeighbors(n_neighbors=k).fit(bank).kneighbors(test)[0][:, -1]
    det = KNN(k=k).fit(net, x) if k == 1 else KNN().fit(net, x)
    assert det.k == k
    _close(det.score(x_test), expected)


def test_vim_matches_the_reference_recipe(dtype):
    net = _net(dtype)
    x, _, x_test = _data(dtype)
    train, test = _features(net, x), _features(net, x_test)
    w = net[2].weight.detach().double().numpy()
    b = net[2].bias.detach().double().numpy()
    # The ViM authors' recipe: origin, EmpiricalCovariance(assume_centered), eig, alpha.
    u = -np.linalg.pinv(w) @ b
    values, vectors = np.linalg.eig(EmpiricalCovariance(assume_centered=True)
                                    .fit(train - u).covariance_)
    residual = np.ascontiguousarray(vectors[:, np.argsort(values * -1)[4:]].real)
    alpha = (train @ w.T + b).max(1).mean() / np.linalg.norm((train - u) @ residual,
                                                             axis=-1).mean()
    logits = test @ w.T + b
    energy = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
    expected = alpha * np.linalg.norm((test - u) @ residual, axis=-1) - energy
    _close(ViM(dim=4).fit(net, x).score(x_test), expected)
    assert ViM().fit(net, x).score(x_test).shape == (150,)  # default dim = d // 2


def _energy(logits: np.ndarray) -> np.ndarray:
    top = logits.max(1)
    return -(np.log(np.exp(logits - top[:, None]).sum(1)) + top)


def test_react_and_ash_match_numpy_recipes(dtype):
    net = _net(dtype, activation=nn.ReLU)
    x, _, x_test = _data(dtype)
    train, test = _features(net, x), _features(net, x_test)
    w = net[2].weight.detach().double().numpy()
    b = net[2].bias.detach().double().numpy()
    clip = np.percentile(train, 90)
    react = ReActEnergy().fit(net, x)
    assert react.clip_ == pytest.approx(clip, rel=1e-6)
    _close(react.score(x_test), _energy(np.minimum(test, clip) @ w.T + b))
    # ASH-S (the authors' ash_s on flat features): keep the top k, scale by exp(s1 / s2).
    n = test.shape[1]
    k = n - int(np.round(n * 65 / 100.0))
    shaped = np.zeros_like(test)
    for i, row in enumerate(test):
        top = np.argsort(-row, kind="stable")[:k]
        shaped[i, top] = row[top]
    scale = test.sum(1) / shaped.sum(1)
    expected = _energy((shaped * np.exp(scale)[:, None]) @ w.T + b)
    _close(ASH(percentile=65).fit(net, x).score(x_test), expected)
    assert ASH(variant="b").fit(net).score(x_test).shape == (150,)


def test_odin_matches_finite_difference_gradient_signs():
    dtype = torch.float64
    net = _net(dtype)
    _, _, x_test = _data(dtype)
    temperature, epsilon = 10.0, 0.05
    x = x_test[:20]

    def loss(inputs: torch.Tensor) -> torch.Tensor:  # per-row CE at the predicted class
        with torch.no_grad():
            logits = net(inputs) / temperature
            target = (net(x) / temperature).argmax(1)
            return torch.nn.functional.cross_entropy(logits, target, reduction="none")

    step = 1e-6
    grad = torch.stack([(loss(x + step * e) - loss(x - step * e)) / (2 * step)
                        for e in torch.eye(IN, dtype=dtype)], dim=1)
    with torch.no_grad():
        logits = net(x - epsilon * grad.sign()) / temperature
    expected = -torch.softmax(logits, -1).max(1).values
    det = ODIN(temperature=temperature, epsilon=epsilon).fit(net)
    torch.testing.assert_close(det.score(x), expected)
    assert all(p.grad is None for p in net.parameters())  # no gradient left behind
    plain = ODIN(temperature=temperature, epsilon=0).fit(net).score(x)
    with torch.no_grad():
        baseline = -torch.softmax(net(x) / temperature, -1).max(1).values
    torch.testing.assert_close(plain, baseline)


# --------------------------------------------------------------------------------------
# Inputs, models and options
# --------------------------------------------------------------------------------------


def test_bayesian_model_dataloader_and_unlabeled_inputs_agree(dtype):
    net = _net(dtype)
    x, y, x_test = _data(dtype)
    # Pseudo-labels: the net's predicted classes stand in when train has no y.
    pseudo = net(x).argmax(1).detach()
    expected = Mahalanobis().fit(net, (x, pseudo)).score(x_test)
    torch.testing.assert_close(Mahalanobis().fit(net, x).score(x_test), expected)
    loader = DataLoader(TensorDataset(x, y), batch_size=64)
    by_loader = Mahalanobis(batch_size=7).fit(net, loader)
    torch.testing.assert_close(by_loader.score(DataLoader(TensorDataset(x_test), batch_size=50)),
                               Mahalanobis().fit(net, (x, y)).score(x_test))
    bm = bf.bayesify(net, "deterministic", task="classification")
    for det in (Mahalanobis(), KNN(k=5), ReActEnergy(), ODIN(), PredictiveScore("energy")):
        torch.testing.assert_close(det.fit(bm, (x, y)).score(x_test),
                                   det.fit(net, (x, y)).score(x_test))


def test_layer_option_reads_a_named_module_output(dtype):
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, HIDDEN), nn.Tanh(),
                        nn.Linear(HIDDEN, NUM_CLASSES)).to(dtype)
    x, y, x_test = _data(dtype)
    head_input = Mahalanobis().fit(net, (x, y)).score(x_test)
    torch.testing.assert_close(Mahalanobis(layer="3").fit(net, (x, y)).score(x_test),
                               head_input)  # the last Tanh's output is the head's input
    with torch.no_grad():
        pre, pre_test = (net[:3](v).double().numpy() for v in (x, x_test))
    expected, _ = _sklearn_mahalanobis(pre, y.numpy(), pre_test)
    _close(Mahalanobis(layer="2").fit(net, (x, y)).score(x_test), expected)


def test_training_flags_are_restored_and_dropout_is_off_while_scoring():
    net = nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Dropout(0.5),
                        nn.Linear(HIDDEN, NUM_CLASSES)).double()
    x, y, x_test = _data(torch.float64)
    net.train()
    det = KNN(k=3).fit(net, (x, y))
    first, second = det.score(x_test), det.score(x_test)
    torch.testing.assert_close(first, second)  # dropout was off: repeatable
    ODIN().fit(net).score(x_test)
    assert all(m.training for m in net.modules())


def test_predictive_score_and_combined_score(dtype):
    net = _net(dtype)
    x, y, x_test = _data(dtype)
    msp = PredictiveScore("max_prob").fit(net)
    with torch.no_grad():
        expected = 1 - torch.softmax(net(x_test), -1).max(1).values
    torch.testing.assert_close(msp.score(x_test), expected)
    parts = [PredictiveScore("entropy"), Mahalanobis()]
    combo = CombinedScore(*parts, weights=[1.0, 2.0]).fit(net, (x, y), reference=x[:200])
    z = []
    for part in parts:
        ref = part.score(x[:200]).double()
        z.append((part.score(x_test).double() - ref.mean()) / ref.std())
    torch.testing.assert_close(combo.score(x_test), z[0] + 2 * z[1])
    assert combo.components(x_test).shape == (150, 2)


# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------


def test_score_before_fit_raises_not_fitted():
    for det in (Mahalanobis(), KNN(), ViM(), ODIN(), ReActEnergy(), ASH(), PredictiveScore()):
        with pytest.raises(NotFittedError, match=r"call `.fit\(model, train\)`"):
            det.score(torch.zeros(3, IN))
    with pytest.raises(NotFittedError, match=r"call `.fit\(model, train\)`"):
        CombinedScore(KNN(), ViM()).score(torch.zeros(3, IN))


def test_bad_input_names_the_argument():
    net = _net(torch.float32)
    x, y, _ = _data(torch.float32, n=40)
    with pytest.raises(InputError, match="`model` must be a torch.nn.Module"):
        Mahalanobis().fit(object(), x)
    with pytest.raises(InputError, match="`layer`='missing' names no submodule"):
        Mahalanobis(layer="missing").fit(net, x)
    with pytest.raises(UnsupportedModelError, match="`head`='0.weight'"):
        Mahalanobis(head="0.weight").fit(net, x)
    with pytest.raises(UnsupportedModelError, match="no nn.Linear.*or pass `layer=`"):
        KNN().fit(nn.Sequential(nn.Tanh()), x)
    with pytest.raises(InputError, match="`k` must be at most the number of training"):
        KNN(k=41).fit(net, x)
    with pytest.raises(InputError, match="`k` must be an int >= 1"):
        KNN(k=0)
    with pytest.raises(InputError, match="`dim` must be between 1 and"):
        ViM(dim=HIDDEN).fit(net, x)
    with pytest.raises(InputError, match="`percentile` must lie in"):
        ReActEnergy(percentile=100)
    with pytest.raises(InputError, match="`variant` must be one of"):
        ASH(variant="x")
    with pytest.raises(InputError, match="`train` is None"):
        KNN().fit(net, None)
    with pytest.raises(InputError, match="`train` as a tuple must be"):
        KNN().fit(net, (x, y, y))
    with pytest.raises(InputError, match="same number of rows"):
        Mahalanobis().fit(net, (x, y[:-1]))
    with pytest.raises(InputError, match="`train \\(X\\)` contains 6 NaN"):
        Mahalanobis().fit(net, (torch.where(torch.arange(40)[:, None] == 3, torch.nan, x), y))
    with pytest.raises(InputError, match="`detectors`: pass at least two"):
        CombinedScore(KNN())
    with pytest.raises(InputError, match="`weights` must hold one weight per detector"):
        CombinedScore(KNN(), ViM(), weights=[1.0])
    with pytest.raises(InputError, match="`temperature` must be > 0"):
        ODIN(temperature=0)
    with pytest.raises(InputError, match="ODIN perturbs the inputs"):
        ODIN().fit(nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 2))).score(
            torch.zeros(2, dtype=torch.long))
    regression = nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, 1),
                               nn.Flatten(0))
    with pytest.raises(UnsupportedModelError, match="energy score needs logits"):
        ReActEnergy().fit(regression, x)


def test_detectors_follow_the_device(device):
    net = _net(torch.float32, activation=nn.ReLU).to(device)
    x, y, x_test = (t.to(device) for t in _data(torch.float32))
    reference = Mahalanobis().fit(net.cpu(), (x.cpu(), y.cpu())).score(x_test.cpu())
    net.to(device)
    for det in (Mahalanobis(), RelativeMahalanobis(), KNN(), ViM(), ODIN(), ReActEnergy(), ASH(),
                PredictiveScore("entropy")):
        scores = det.fit(net, (x, y)).score(x_test)
        assert scores.device.type == device.type and scores.shape == (150,)
        assert bool(torch.isfinite(scores).all())
    torch.testing.assert_close(Mahalanobis().fit(net, (x, y)).score(x_test).cpu(), reference,
                               rtol=1e-4, atol=1e-4)
    combo = CombinedScore(PredictiveScore("energy"), KNN(k=5)).fit(net, (x, y))
    assert combo.score(x_test).device.type == device.type
