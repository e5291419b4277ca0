"""Laplace approximations: ``bayesify(model, "laplace", task=...)`` on a trained network.

A post-hoc method: the wrapped network is **not trained** here. Train it first (with
``"deterministic"``, your own loop, or take a pretrained one), then ``fit`` computes the
curvature of the negative log likelihood at those weights (θ_MAP) and the posterior
N(θ_MAP, (H + P)⁻¹) over a subset of them, in one pass over the training data
(chunked, so large N fits in memory). Predictions are linearized (GLM): f(x*) ~
N(f(x*; θ_MAP), J* Σ J*ᵀ), joint over the points of a block for regression (BoTorch
gets a full covariance), and probit, Laplace bridge or MC for classification; or, with
``predictive="nn"``, the network evaluated at sampled weights.

For the probit link the posterior's variances are the diagonal of J Σ Jᵀ, the standard
multi-class probit softmax(μ_k / √(1 + π/8 · Σ_kk)) (MacKay; laplace-torch's too). A
centered variant, diag((I − 11ᵀ/C) J Σ Jᵀ (I − 11ᵀ/C)), which drops the variance of the
shift of all logits by one constant (the softmax ignores it; the prior alone sets it),
was measured against MC over the same Gaussian (10⁵–2·10⁵ logit draws, float64) on
digits (``benchmarks/laplace.py``'s MLP, prior precision by the marginal likelihood).
Mean KL(MC ‖ probit) on the clean test / corrupted / OOD inputs:

    ===========  =====================  =====================
    structure    standard (kept)        centered
    ===========  =====================  =====================
    LL kron      0.058 / 0.052 / 0.083  0.013 / 0.017 / 0.016
    LL full      0.027 / 0.015 / 0.017  0.089 / 0.066 / 0.058
    LL diag      0.015 / 0.008 / 0.004  0.028 / 0.014 / 0.006
    LL lowrank   0.027 / 0.015 / 0.017  0.090 / 0.067 / 0.058
    all kron     0.015 / 0.012 / 0.012  0.023 / 0.011 / 0.010
    ===========  =====================  =====================

The centered one is closer only for last-layer K-FAC, so the standard one is used for
every structure. Neither is exact: for two classes both understate the variance of the
logit difference that the sigmoid sees (the extra shift variance partly makes up for it
in the standard one). Use ``approximation="mc"`` when the predictive itself must be
accurate; the MC and bridge links get the full covariance over classes [N, C, C] (MC is
exactly invariant to the shift; the bridge removes it itself).

The network is used in eval mode throughout (BatchNorm uses and keeps its running
statistics; dropout is off), through hooks and ``torch.func``, so any ``nn.Module``
works, Sequential or not, with inputs that are tensors, mappings (HuggingFace batches)
or tuples, and outputs reduced to logits or means as :mod:`bayesify._network` says.
See Daxberger et al., "Laplace Redux", NeurIPS 2021.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bayesify._batching import num_rows
from bayesify._validation import check_choice, check_labels, check_positive_int
from bayesify.checkpoint import mark_dynamic
from bayesify.core import BayesianModel, preserve_training_flags, register_method
from bayesify.errors import InputError, NotFittedError, UnsupportedModelError
from bayesify.fitting import CLOSED_FORM, FitStrategy
from bayesify.inference._heads import find_head
from bayesify.inference._lora_noise import _active_adapters as active_adapters
from bayesify.inference._lora_noise import _is_lora_layer as is_lora_layer
from bayesify.inference.laplace_fit import fit_curvature
from bayesify.inference.laplace_likelihood import LaplaceCategoricalLikelihood
from bayesify.inference.laplace_predict import LaplacePredictionMixin
from bayesify.inference.laplace_tuning import LaplaceTuningMixin, positive_vector
from bayesify.layers.laplace_curvature import CURVATURES, as_outputs
from bayesify.layers.laplace_layout import (
    DEFAULT_MAX_MEMORY,
    ParameterLayout,
    parse_memory,
    resolve_subset,
)
from bayesify.layers.laplace_structures import STRUCTURES
from bayesify.likelihoods import GaussianLikelihood, regression_targets

__all__ = ["LaplaceModel", "lora_modules"]


def lora_modules(model: nn.Module) -> list[str]:
    """The module names of the A and B factors (``nn.Linear``) of every active LoRA
    adapter on a Linear layer (peft's layout: ``<layer>.lora_A.<adapter>``), or []."""
    names = []
    for name, module in model.named_modules():
        if not is_lora_layer(module):
            continue
        for adapter in active_adapters(module):
            if adapter in module.lora_A:
                names += [f"{name}.lora_A.{adapter}", f"{name}.lora_B.{adapter}"]
    return names


@register_method("laplace")
class LaplaceModel(LaplacePredictionMixin, LaplaceTuningMixin, BayesianModel):
    """Laplace approximation over a subset of a trained network's weights.

    Args:
        model: a trained network outputting logits [N, C] or means [N, D] (or [N]).
        task: ``"classification"`` or ``"regression"``.
        subset: ``"last_layer"`` (the head from ``head=``, else the last ``nn.Linear``;
            the default for a model without LoRA adapters), ``"lora"`` (the A and B
            factors of every active LoRA adapter, e.g. of a ``peft`` model; the default
            when the model has any: the base weights stay fixed, with K-FAC per factor),
            ``"all"`` (every weight with ``requires_grad``), a list of module names, or
            ``"subnetwork"`` (a full Laplace over the ``subnetwork_size`` weights with
            the largest variances under a diagonal one).
        hessian: ``"kron"`` (K-FAC; default), ``"full"`` (default for ``"subnetwork"``),
            ``"diag"`` or ``"lowrank"`` (top ``rank`` eigenpairs).
        curvature: ``"ggn"`` (generalized Gauss-Newton, default) or ``"ef"`` (empirical
            Fisher).
        approximation: classification link: ``"probit"`` (default), ``"bridge"`` or ``"mc"``.
        predictive: ``"glm"`` (linearized, default) or ``"nn"`` (sampled weights).
        prior_precision: P: a scalar, one value per layer (module), or one per weight.
        sigma_noise: regression noise std, a scalar or one per output; ``None`` starts
            at the residual RMS of the trained network.
        tune: ``"marglik"`` (default) tunes P (and σ) by the Laplace evidence after
            ``fit``; ``None`` keeps them.
        head: the head's module name for ``subset="last_layer"``.
        rank, subnetwork_size: for ``"lowrank"`` and ``"subnetwork"`` (default
            min(100, P) and min(1000, P)).
        max_memory: bytes (or ``"2GB"``) the curvature may take; larger is refused
            before allocating, naming a cheaper ``hessian`` or ``subset``.
        num_samples: logit draws (``"mc"``) or weight draws (``"nn"``).
        n_data: unused (the curvature sums over the training set itself).
    """

    supports_joint = True

    def __init__(self, model: nn.Module, task: str, *, subset: Any = None,
                 hessian: str | None = None, curvature: str = "ggn",
                 approximation: str = "probit", predictive: str = "glm",
                 prior_precision: Any = 1.0, sigma_noise: Any = None,
                 tune: str | None = "marglik", head: str | None = None,
                 rank: int | None = None, subnetwork_size: int | None = None,
                 max_memory: Any = DEFAULT_MAX_MEMORY, num_samples: int | None = None,
                 n_data: int | None = None):
        if model is None:
            raise InputError("`model` is None; the Laplace method needs a trained network")
        super().__init__(model, task, n_data=n_data)
        lora = lora_modules(model)
        if subset is None:
            subset = "lora" if lora else "last_layer"
        if subset == "lora" and not lora:
            raise UnsupportedModelError(
                "subset='lora' covers the LoRA adapters, and the model has none (peft's "
                "get_peft_model with a LoraConfig adds them); use subset='last_layer'")
        self.subset = subset if isinstance(subset, str) else list(subset) \
            if isinstance(subset, list | tuple) else subset
        self.head_name = None
        if head is not None and subset != "last_layer":
            raise InputError(f"`head` applies to subset='last_layer', got subset={subset!r}")
        if subset == "last_layer":
            self.head_name = find_head(model, head)[0]
        self.layout = ParameterLayout(model, resolve_subset(
            model, lora if subset == "lora" else self.subset, self.head_name))
        self.last_layer = subset == "last_layer"
        default = "full" if subset == "subnetwork" else "kron"
        self.hessian = check_choice(default if hessian is None else hessian, "hessian",
                                    tuple(STRUCTURES))
        if subset == "subnetwork" and self.hessian != "full":
            raise InputError("subset='subnetwork' builds a full Laplace over the chosen "
                             f"weights: hessian must be 'full', got {hessian!r}")
        self.curvature = check_choice(curvature, "curvature", CURVATURES)
        self.predictive = check_choice(predictive, "predictive", ("glm", "nn"))
        self.tune = check_choice(tune, "tune", ("marglik", None))
        self.max_memory = parse_memory(max_memory)
        p_all = self.layout.num_params
        self.subnetwork_size = min(1000, p_all) if subnetwork_size is None else \
            check_positive_int(subnetwork_size, "subnetwork_size")
        if subset == "subnetwork" and self.subnetwork_size > p_all:
            raise InputError(f"`subnetwork_size` is {self.subnetwork_size}, but the model has "
                             f"{p_all} trainable weights")
        self.rank = min(100, self.num_covered) if rank is None else \
            check_positive_int(rank, "rank")
        if self.rank > self.num_covered:
            raise InputError(f"`rank` must be <= the {self.num_covered} covered weights, "
                             f"got {self.rank}")
        self._initial_prior = positive_vector(prior_precision, "prior_precision")
        self._prior_layout(self._initial_prior, "prior_precision")
        if subset == "subnetwork" and self._initial_prior.numel() not in (1, self.num_groups):
            raise InputError("with subset='subnetwork', `prior_precision` must be a scalar or "
                             "one value per layer (the weights are chosen by fit)")
        if self.hessian == "kron" and self._prior_layout(self._initial_prior) == "parameter":
            raise InputError("hessian='kron' takes a scalar or per-layer `prior_precision`; "
                             "use hessian='diag' or 'full' for one per weight")
        self._user_sigma = None
        if sigma_noise is not None:
            if task != "regression":
                raise InputError("`sigma_noise` is the observation noise of regression; "
                                 "classification has none")
            self._user_sigma = positive_vector(sigma_noise, "sigma_noise")
        if task == "regression" and approximation != "probit":
            raise InputError("`approximation` is the classification link; a regressor's "
                             f"predictive is Gaussian, got approximation={approximation!r}")
        dtype, device = self.dtype, self.device
        self.structure = STRUCTURES[self.hessian](self.num_covered, self.layout.groups,
                                                  dtype, device)
        for name, kind in (("prior_precision", dtype), ("sigma_noise", dtype),
                           ("rss", dtype), ("subnet_index", torch.long)):
            self.register_buffer(name, torch.zeros(0, dtype=kind, device=device))
            mark_dynamic(self, name)
        self.prior_precision = self._initial_prior.to(dtype=dtype, device=device)
        self.register_buffer("loglik", torch.zeros((), dtype=dtype, device=device))
        self.register_buffer("num_fit", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("output_width", torch.zeros((), dtype=torch.long, device=device))
        if task == "classification":
            self.likelihood = LaplaceCategoricalLikelihood(approximation, num_samples or 100)
        else:
            self.likelihood = GaussianLikelihood(self._split)
        if self.predictive == "nn":
            self.default_num_samples = num_samples or 64

    # ------------------------------------------------------------------ sizes

    @property
    def head(self) -> nn.Linear | None:
        """The last layer (``subset="last_layer"``), a module of the wrapped network."""
        return None if self.head_name is None else self.model.get_submodule(self.head_name)

    @property
    def num_covered(self) -> int:
        """P, the weights the Gaussian covers."""
        return self.subnetwork_size if self.subset == "subnetwork" else self.layout.num_params

    @property
    def num_outputs(self) -> int | None:
        """K, the network's output width (known after fit, or from a last-layer head)."""
        if int(self.output_width) > 0:
            return int(self.output_width)
        return self.head.out_features if self.head is not None else None

    @property
    def num_groups(self) -> int:
        return self.layout.num_groups

    def _prior_layout(self, prior: torch.Tensor, name: str | None = None) -> str:
        n = prior.numel()
        if n == 1:
            return "scalar"
        if n == self.num_groups:
            return "layer"
        if n == self.num_covered:
            return "parameter"
        raise InputError(f"`{name or 'prior_precision'}` must be a scalar, one value per "
                         f"layer ({self.num_groups}: {self.layout.describe()}) or one per "
                         f"covered weight ({self.num_covered}); got {n} values")

    def _pieces(self) -> int:
        if self.task == "regression" and self.curvature == "ggn":
            return int(self.num_outputs)
        return 1

    # ------------------------------------------------------------------ network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = as_outputs(self.call_network(x), num_rows(x))
        if self.task == "regression" and f.shape[1] == 1:
            return f[:, 0]
        return f

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The negative log likelihood of a batch at the current weights (θ_MAP's
        objective without its prior; train the network before wrapping it)."""
        f = as_outputs(self.call_network(x), num_rows(x))
        if self.task == "classification":
            return F.cross_entropy(f, check_labels(y, "y", f.shape[1]))
        y = regression_targets(y, f.shape[1])
        sigma = self.sigma_noise if self.sigma_noise.numel() else torch.ones_like(f[0])
        return 0.5 * ((y - f).pow(2) / sigma.pow(2) + torch.log(
            2 * torch.pi * sigma.pow(2))).sum(-1).mean()

    def _features(self, x: torch.Tensor, check: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Outputs f [B, K] and head features φ̃ [B, D(+1)] from one forward pass."""
        box: dict[str, Any] = {"calls": 0}

        def hook(module, inputs, output):
            box.update(phi=inputs[0], out=output, calls=box["calls"] + 1)
        handle = self.head.register_forward_hook(hook)
        try:
            out = self.call_network(x)
        finally:
            handle.remove()
        name = repr(self.head_name)
        if box["calls"] != 1:
            raise UnsupportedModelError(
                f"subset='last_layer': the head {name} ran {box['calls']} times in one "
                "forward pass, not once; name another head with `head=` or pass "
                f"subset=[{name}] to use Jacobians")
        phi = box["phi"]
        if phi.dim() != 2:
            raise UnsupportedModelError(
                f"subset='last_layer' needs head inputs [N, D]; {name} gets "
                f"{list(phi.shape)}. Pass subset=[{name}] to use Jacobians instead")
        f = as_outputs(out, num_rows(x))
        if check and (f.numel() != box["out"].numel()
                      or not torch.equal(f.reshape(box["out"].shape), box["out"])):
            raise UnsupportedModelError(
                f"subset='last_layer' needs the head {name} to be the network's last "
                "operation, but its output is transformed afterwards; pass "
                f"subset=[{name}] (Jacobians) or name the right module with `head=`")
        if self.head.bias is not None:
            phi = torch.cat([phi, phi.new_ones(phi.shape[0], 1)], 1)
        return f, phi

    def _head_matrix(self) -> torch.Tensor:
        w = self.head.weight.detach()
        if self.head.bias is None:
            return w
        return torch.cat([w, self.head.bias.detach()[:, None]], 1)

    # ------------------------------------------------------------------ fitting

    def fit_strategy(self) -> FitStrategy:
        return CLOSED_FORM

    def fit_full_batch(self, x: torch.Tensor, y: torch.Tensor, *, seed: int | None,
                       progress: bool | None) -> None:
        """Accumulate the curvature over X [N, ...], y and tune the hyperparameters."""
        self._mark_fitted(False)
        self.prior_precision = self._initial_prior.to(dtype=self.dtype, device=self.device)
        with preserve_training_flags(self.model):
            self.model.eval()
            fit_curvature(self, x, y, seed=seed, progress=progress)
        if self.tune == "marglik":
            self._tune_marglik(None, True, 100)

    def on_fit_end(self) -> None:
        if not self.structure.ready:
            raise NotFittedError("the Laplace approximation is computed post hoc from data: "
                                 "train the network first, then call .fit(train) on this "
                                 "model (its training loop has nothing to do)")

    def _check_targets(self, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.task == "classification":
            if f.shape[1] < 2:
                raise UnsupportedModelError(f"a classifier needs at least 2 logits, the model "
                                            f"outputs {f.shape[1]}")
            return check_labels(y, "y", f.shape[1])
        return regression_targets(y, f.shape[1])

    def _set_stats(self, n: int, value: torch.Tensor, targets: torch.Tensor,
                   width: int) -> None:
        self.num_fit.fill_(n)
        self.output_width.fill_(width)
        if self.task == "classification":
            self.loglik.fill_(float(value))
            return
        self.rss = value.to(self.dtype)
        if self._user_sigma is not None:
            sigma = self._user_sigma
            if sigma.numel() not in (1, self.num_outputs):
                raise InputError(f"`sigma_noise` must be a scalar or one value per output "
                                 f"({self.num_outputs}), got {sigma.numel()} values")
            sigma = sigma.expand(self.num_outputs)
        else:
            spread = targets.double().std(0, correction=0) if n > 1 else \
                torch.ones(self.num_outputs, dtype=torch.float64)
            sigma = (value.double() / n).sqrt().maximum(1e-3 * spread.to(value.device))
            sigma = sigma.clamp_min(1e-6)
        self.sigma_noise = sigma.to(dtype=self.dtype, device=self.device).clone()

    def _noise_weights(self, sigma: torch.Tensor | None = None) -> torch.Tensor:
        """w = 1/σ² per output (regression GGN pieces), else [1]."""
        if self.task == "regression" and self.curvature == "ggn":
            sigma = self.sigma_noise if sigma is None else sigma
            return sigma.pow(-2)
        if self.task == "regression":  # EF: computed at the fit's noise
            sigma = self.sigma_noise
            return sigma.pow(-2)
        return torch.ones(1, dtype=self.dtype, device=self.device)

    def _structure_weights(self, sigma: torch.Tensor | None = None) -> torch.Tensor:
        if self.task == "regression" and self.curvature == "ggn":
            return self._noise_weights(sigma)
        return torch.ones(1, dtype=sigma.dtype if sigma is not None else self.dtype,
                          device=self.device)

    def _prior_vectors(self, prior: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The prior precision per covered weight [P] and per group [G] (or None)."""
        prior = self.prior_precision if prior is None else prior
        kind = self._prior_layout(prior)
        if kind == "parameter":
            return prior, None
        if kind == "scalar":  # an expanded view: the structures spot a scalar prior
            return prior.reshape(1).expand(self.num_covered), prior.reshape(1).expand(
                self.num_groups)
        groups = prior.expand(self.num_groups) if kind == "scalar" else prior
        vec = self.layout.expand(groups)
        if self.subset == "subnetwork":
            vec = vec[self.subnet_index]
        return vec, groups

    def _prior_for_selection(self) -> torch.Tensor:
        groups = self.prior_precision.expand(self.num_groups) \
            if self.prior_precision.numel() == 1 else self.prior_precision
        return self.layout.expand(groups)

    def _theta(self) -> torch.Tensor:
        theta = self.layout.vector()
        return theta[self.subnet_index] if self.subset == "subnetwork" else theta

    def _factor(self) -> Any:
        vec, groups = self._prior_vectors()
        return self.structure.factor(vec, groups, self._structure_weights())

    def _split(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return raw, self.sigma_noise.pow(2).to(raw.dtype).expand_as(raw)

    def extra_repr(self) -> str:
        return (f"task={self.task!r}, subset={self.subset!r}, hessian={self.hessian!r}, "
                f"curvature={self.curvature!r}, weights={self.num_covered}, "
                f"fitted={self.is_fitted}")
