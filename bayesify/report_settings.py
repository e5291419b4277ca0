"""How ``bayesify report`` runs each method on its pretrained MLPs: one table, kept
beside the report (the way BO keeps its surrogate table), never in the method classes.

Each entry maps ``(method, task)`` to ``{"options": {...}, "fit": {...}}``: keyword
options for ``bayesify(...)`` and for ``fit(...)`` (``"fit": None`` skips fitting). A
pair that is missing leaves the method out of that task's table. The settings suit the
small embedded data sets (digits, gap, diabetes) and say why where it is not obvious.
"""

from __future__ import annotations

from typing import Any

__all__ = ["REPORT_SETTINGS", "report_settings"]

Settings = dict[str, dict[str, Any] | None]

REPORT_SETTINGS: dict[tuple[str, str], Settings] = {
    ("deterministic", "classification"): {"options": {}, "fit": {}},
    ("deterministic", "regression"): {"options": {}, "fit": {}},
    # The MLP is pretrained without dropout: insert it before the last two Linear layers
    # and fine-tune briefly so the weights adapt to it (on digits this lowers ECE and
    # raises OOD AUROC over the deterministic net; p = 0.2 did not).
    ("mc_dropout", "classification"): {
        "options": {"p": 0.1, "layers": 2},
        "fit": {"epochs": 10, "lr": 1e-3, "weight_decay": 1e-4}},
    ("mc_dropout", "regression"): {
        "options": {"p": 0.1, "layers": 2},
        "fit": {"epochs": 100, "lr": 1e-3, "weight_decay": 1e-4}},
    ("vbll", "classification"): {"options": {"covariance": "dense"},
                                 "fit": {"epochs": 30, "lr": 1e-3}},
    ("vbll", "regression"): {"options": {"covariance": "dense"},
                             "fit": {"epochs": 30, "lr": 1e-3}},
    # A short run from the pretrained network, β₂ low enough for h to adapt within a few
    # hundred steps. IVON starts as SGD with momentum, so the Gaussian NLL of
    # regression, whose gradients scale as 1/σ², needs a much smaller lr.
    ("ivon", "classification"): {
        "options": {"hess_init": 1.0, "beta2": 0.999, "seed": 0},
        "fit": {"epochs": 5, "lr": 0.05, "batch_size": 64}},
    ("ivon", "regression"): {
        "options": {"hess_init": 1.0, "beta2": 0.999, "seed": 0},
        "fit": {"epochs": 10, "lr": 0.002, "batch_size": 64}},
    # The pretrained MLP keeps its largest weights; the tiny regression MLP (32 units)
    # needs a denser subspace than 10% to keep its output layer useful.
    ("ssvi", "classification"): {
        "options": {"initial_mask": "magnitude", "update_interval": 10, "init_std": 1e-2,
                    "temperature": 1.0},
        "fit": {"epochs": 15, "lr": 0.05, "batch_size": 128}},
    ("ssvi", "regression"): {
        "options": {"initial_mask": "magnitude", "density": 0.3, "update_interval": 10,
                    "init_std": 0.05, "temperature": 1.0, "sgd_momentum": None},
        "fit": {"epochs": 150, "lr": 0.01, "batch_size": 512}},
    ("vi", "classification"): {"options": {"init_std": 1e-2},
                               "fit": {"epochs": 10, "lr": 1e-2, "batch_size": 128}},
    ("vi", "regression"): {"options": {"init_std": 0.05},
                           "fit": {"epochs": 150, "lr": 0.03, "batch_size": 512}},
    # About 7 s of CPU for the d->32->32->1 regression MLP (1.2k-1.4k weights, a few
    # hundred points): depth 5 caps each draw at 32 leapfrog steps. The digits MLP
    # (26k weights) is too large for NUTS, so hmc has no classification entry.
    ("hmc", "regression"): {
        "options": {"num_samples": 100, "warmup": 100, "max_tree_depth": 5}, "fit": {}},
    # The features are 128 wide: one shared lengthscale fits in a fraction of the time
    # of 128 ARD ones, at the same accuracy there.
    ("gp", "regression"): {
        "options": {"inference": "exact", "ard": False, "num_restarts": 1}, "fit": {}},
    ("gp", "classification"): {
        "options": {"inference": "variational", "num_inducing": 32, "ard": False},
        "fit": {"epochs": 8, "lr": 0.05, "batch_size": 256}},
    # Post hoc on the pretrained MLP: last-layer K-FAC, probit, prior (and the
    # regression noise) by marginal likelihood.
    ("laplace", "classification"): {"options": {}, "fit": {}},
    ("laplace", "regression"): {"options": {}, "fit": {}},
    # A cap MLP on the frozen regressor's outputs (tfb needs LoRA adapters, which the
    # report's MLPs do not have).
    ("bayescap", "regression"): {"options": {}, "fit": {"epochs": 50, "lr": 1e-3}},
    # Five networks trained like the deterministic row (reinitialize="all": a deep
    # ensemble). 150 epochs overfit diabetes (NLL 1.35); 30 match the deterministic row.
    ("ensemble", "classification"): {"options": {"members": 5, "reinitialize": "all"},
                                     "fit": {"epochs": 30, "lr": 3e-3}},
    ("ensemble", "regression"): {"options": {"members": 5, "reinitialize": "all"},
                                 "fit": {"epochs": 30, "lr": 3e-3}},
    # SWAG from the pretrained MLP: SGD (momentum 0.9), 20 epochs, one snapshot per
    # epoch; the Gaussian NLL's 1/σ² gradients need a small lr for regression.
    ("swag", "classification"): {"options": {}, "fit": {"epochs": 20, "lr": 0.05}},
    ("swag", "regression"): {"options": {}, "fit": {"epochs": 20, "lr": 0.002}},
}


def report_settings(method: str, task: str) -> Settings | None:
    """The report's settings for ``method`` on ``task``, or ``None`` to leave it out."""
    return REPORT_SETTINGS.get((method, task))
