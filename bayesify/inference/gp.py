"""``"gp"``: a Gaussian-process head on a network's features (deep kernel learning).

The GP acts on the input of the network's final ``nn.Linear`` (its penultimate
features), or on the inputs themselves when ``model`` is ``None`` (a plain GP).
Features are scaled to the unit cube (from ``input_bounds`` or the training range)
and regression targets are standardized, as BoTorch's ``SingleTaskGP`` does.

* ``inference="exact"`` (regression, the default there): closed-form posterior;
  hyperparameters by L-BFGS-B on the marginal likelihood plus BoTorch's priors, from
  the prior modes and ``num_restarts − 1`` prior draws, keeping the best.
* ``inference="variational"`` (classification, the default there; large N): a
  whitened SVGP with ``num_inducing`` inducing points trained on minibatches by the
  ELBO with num_data = N; softmax likelihood for classes.

With ``freeze_backbone=False`` the network is trained jointly with the GP (full-batch
Adam for exact inference); use weight decay and few epochs, as the marginal
likelihood over many weights overfits (Wilson et al., 2016).
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any

import numpy as np
import torch
from scipy.optimize import minimize
from torch import nn
from tqdm.auto import tqdm

from bayesify._batching import make_train_batches
from bayesify._validation import (
    as_tensor,
    check_choice,
    check_positive_float,
    check_positive_int,
)
from bayesify.core import BayesianModel, preserve_training_flags, register_method
from bayesify.errors import BayesifyWarning, InputError, NotPSDError
from bayesify.inference._heads import find_head
from bayesify.layers.gp import (
    KERNELS,
    ExactGPHead,
    VariationalGPHead,
    gaussian_multitask_likelihood,
    gpytorch,
)
from bayesify.predictive import CategoricalPredictive, GaussianPredictive, Predictive

__all__ = ["GPModel"]

_INFERENCE = ("exact", "variational")
_DEFAULT_CLASS_SAMPLES = 64
_EXACT_LIMIT = 5000  # beyond this many points, suggest the sparse GP


def _unit_cube_affine(z: torch.Tensor, bounds: torch.Tensor | None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(lower [d], range [d]) mapping z to [0, 1]^d; constant columns get range 1."""
    lower, upper = (z.min(0).values, z.max(0).values) if bounds is None else bounds
    span = upper - lower
    return lower, torch.where(span > 1e-12, span, torch.ones_like(span))


def _standardizer(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean [D], std [D]) of targets y [N, D]; constant outputs get std 1."""
    mean = y.mean(0)
    std = y.std(0) if y.shape[0] > 1 else torch.ones_like(mean)
    return mean, torch.where(std > 1e-8, std, torch.ones_like(std))


def _lbfgsb(params: list[nn.Parameter], lower: list[float], objective: Any,
            max_iter: int) -> float:
    """Minimize ``objective()`` over ``params`` with SciPy's L-BFGS-B; returns the value."""
    sizes = [p.numel() for p in params]
    bounds = [(low, None) for p, low in zip(params, lower, strict=True)
              for _ in range(p.numel())]

    def assign(flat: np.ndarray) -> None:
        with torch.no_grad():
            for p, chunk in zip(params, np.split(flat, np.cumsum(sizes)[:-1]), strict=True):
                p.copy_(torch.from_numpy(chunk).reshape(p.shape))

    def fun(flat: np.ndarray) -> tuple[float, np.ndarray]:
        assign(flat)
        value = objective()
        grads = torch.autograd.grad(value, params)
        flat_grad = torch.cat([g.reshape(-1) for g in grads]).double().cpu().numpy()
        return float(value.detach()), flat_grad

    start = torch.cat([p.detach().reshape(-1) for p in params]).double().cpu().numpy()
    result = minimize(fun, start, jac=True, method="L-BFGS-B", bounds=bounds,
                      options={"maxiter": max_iter})
    assign(result.x)
    return float(result.fun)


@register_method("gp")
class GPModel(BayesianModel):
    """A GP head on a network's penultimate features, or a plain GP (``model=None``).

    Args:
        model: the network (its final ``nn.Linear`` is bypassed), or ``None``.
        task: ``"regression"`` or ``"classification"``.
        inference: ``"exact"`` (regression only) or ``"variational"``; defaults to
            exact for regression, variational for classification.
        num_inducing: M, inducing points of the variational GP.
        freeze_backbone: keep the network's weights fixed (train only the GP).
        kernel: ``"rbf"`` (BoTorch's default) or ``"matern"`` (Matérn 5/2).
        ard: one lengthscale per feature (default); ``False`` shares one, much faster
            to fit on wide network features.
        noise: ``None`` learns the noise; a float fixes the noise variance in
            standardized target units (exact inference).
        input_bounds: [2, d] lower/upper bounds of the features for the unit-cube
            scaling (the training range when ``None``).
        num_restarts: L-BFGS-B starts of the exact GP's hyperparameter fit: the prior
            modes, then prior draws; the best marginal likelihood wins (further draws,
            up to 5 starts, only when every start failed).
        num_classes: C for classification when the model cannot tell.
        head: name of the layer whose input are the features (default: the last Linear).
        n_data: N for the ELBO's scaling (the training-set size when ``None``).
    """

    default_epochs = 50
    default_lr = 0.01
    default_batch_size = 256

    def __init__(self, model: nn.Module | None, task: str, *, inference: str | None = None,
                 num_inducing: int = 128, freeze_backbone: bool = True, kernel: str = "rbf",
                 noise: float | None = None, input_bounds: Any = None, num_restarts: int = 3,
                 num_classes: int | None = None, head: str | None = None,
                 ard: bool = True, n_data: int | None = None):
        super().__init__(model, task, n_data=n_data)
        default = "exact" if task == "regression" else "variational"
        self.inference = check_choice(default if inference is None else inference,
                                      "inference", _INFERENCE)
        if self.inference == "exact" and task == "classification":
            raise InputError("`inference`='exact' supports regression only; use "
                             "inference='variational' for classification")
        self.num_inducing = check_positive_int(num_inducing, "num_inducing")
        self.freeze_backbone = bool(freeze_backbone)
        self.kernel = check_choice(kernel, "kernel", KERNELS)
        self.ard = bool(ard)
        self.fixed_noise = None if noise is None else check_positive_float(noise, "noise")
        self.num_restarts = check_positive_int(num_restarts, "num_restarts")
        self.num_classes = None if num_classes is None else check_positive_int(
            num_classes, "num_classes", minimum=2)
        self._head_module: nn.Linear | None = None
        if model is not None and not isinstance(model, nn.Identity):
            _, self._head_module = find_head(model, head)
            if task == "classification" and self.num_classes is None:
                self.num_classes = self._head_module.out_features
        self._input_bounds = None
        if input_bounds is not None:
            bounds = as_tensor(input_bounds, "input_bounds", dtype=torch.float64, ndim=2)
            if bounds.shape[0] != 2 or bool((bounds[1] <= bounds[0]).any()):
                raise InputError("`input_bounds` must be [2, d] with lower < upper, got "
                                 f"shape {list(bounds.shape)}")
            self._input_bounds = bounds
        self.gp: ExactGPHead | VariationalGPHead | None = None
        self.likelihood: gpytorch.likelihoods.Likelihood | None = None
        for name in ("feature_lower", "feature_range", "y_mean", "y_std"):
            self.register_buffer(name, torch.zeros(0))

    @classmethod
    def report_settings(cls, task: str) -> dict[str, dict[str, Any]]:
        # The report's features are 128 wide: one shared lengthscale fits in a fraction
        # of the time of 128 ARD ones, at the same accuracy there.
        if task == "regression":
            return {"options": {"inference": "exact", "ard": False, "num_restarts": 1},
                    "fit": {}}
        return {"options": {"inference": "variational", "num_inducing": 32, "ard": False},
                "fit": {"epochs": 8, "lr": 0.05, "batch_size": 256}}

    # ------------------------------------------------------------------ features

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Unit-cube features [N, d] of inputs x [N, ...] (differentiable in x)."""
        if self._head_module is None:
            z = x.reshape(x.shape[0], -1) if self.model is None else self.model(x)
            z = z.reshape(z.shape[0], -1)
        else:
            captured: list[torch.Tensor] = []
            hook = self._head_module.register_forward_hook(
                lambda module, inputs, output: captured.append(inputs[0]))
            try:
                self.model(x)
            finally:
                hook.remove()
            z = captured[-1].reshape(x.shape[0], -1)
        if self.feature_lower.numel():
            z = (z - self.feature_lower) / self.feature_range
        return z

    def _backbone_params(self) -> list[nn.Parameter]:
        if self.model is None or self.freeze_backbone:
            return []
        return [p for p in self.model.parameters() if p.requires_grad]

    def _setup(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scaling of features and targets from (a sample of) the training data."""
        self.feature_lower = torch.zeros(0, dtype=self.dtype, device=self.device)
        with torch.no_grad(), preserve_training_flags(self):
            self.eval()
            z = self.features(x)
        bounds = None if self._input_bounds is None else self._input_bounds.to(z)
        if bounds is not None and bounds.shape[1] != z.shape[1]:
            raise InputError(f"`input_bounds` has {bounds.shape[1]} columns but the features "
                             f"have {z.shape[1]}")
        self.feature_lower, self.feature_range = _unit_cube_affine(z, bounds)
        z = (z - self.feature_lower) / self.feature_range
        if self.task == "regression":
            y = y[:, None] if y.dim() == 1 else y
            self.y_mean, self.y_std = _standardizer(y)
            y = (y - self.y_mean) / self.y_std
        return z, y

    # ------------------------------------------------------------------- fitting

    def fit(self, train: Any, *, epochs: int | None = None, lr: float | None = None,
            batch_size: int | None = None, weight_decay: float = 0.0,
            optimizer: torch.optim.Optimizer | None = None, grad_clip: float | None = None,
            progress: bool = True, seed: int | None = None) -> GPModel:
        """Fit the GP (see the class docstring for what each inference does).

        For exact inference with a frozen backbone and no ``optimizer``, the
        hyperparameters are fit by L-BFGS-B and ``epochs``/``lr``/``batch_size`` are
        unused; otherwise ``epochs`` counts full-batch Adam steps (exact) or
        minibatch epochs (variational).
        """
        if self.inference == "variational":
            return super().fit(train, epochs=epochs, lr=lr, batch_size=batch_size,
                               weight_decay=weight_decay, optimizer=optimizer,
                               grad_clip=grad_clip, progress=progress, seed=seed)
        batches = make_train_batches(train, task=self.task, dtype=self.dtype,
                                     device=self.device, batch_size=1 << 62, shuffle=False)
        pairs = list(batches)
        if not pairs:
            raise InputError("`train` is empty; pass at least one training example")
        x = torch.cat([p[0] for p in pairs])
        y = torch.cat([p[1] for p in pairs])
        self.n_data = self.n_data or int(x.shape[0])
        if x.shape[0] > _EXACT_LIMIT:
            warnings.warn(f"an exact GP on {x.shape[0]} points costs O(N³) time and O(N²) "
                          "memory; inference='variational' scales to large N",
                          BayesifyWarning, stacklevel=2)
        z, y_std = self._setup(x, y)
        self.gp = ExactGPHead(z.shape[1], y_std.shape[1], kernel=self.kernel,
                              noise=self.fixed_noise, ard=self.ard).to(device=self.device,
                                                                       dtype=self.dtype)
        if optimizer is None and not self._backbone_params():
            self._fit_exact_lbfgs(z, y_std, seed)
        else:
            self._fit_exact_adam(x, y_std, epochs, lr, weight_decay, optimizer, grad_clip,
                                 progress)
            with torch.no_grad(), preserve_training_flags(self):
                self.eval()
                z = self.features(x)
        self.gp.set_train_data(z, y_std)
        self.eval()
        self._mark_fitted()
        return self

    def _fit_exact_lbfgs(self, z: torch.Tensor, y: torch.Tensor, seed: int | None) -> None:
        head = self.gp
        params = [p for p in (head.log_lengthscale, head.log_noise, head.mean)
                  if p.requires_grad]
        bounds = head.lower_bounds()
        lower = [bounds.get(name) for name, p in head.named_parameters() if p.requires_grad]
        generator = torch.Generator().manual_seed(0 if seed is None else int(seed))
        best: tuple[float, dict[str, torch.Tensor]] | None = None
        error: Exception | None = None
        # num_restarts starts; if all of them fail, up to 5 in total before giving up.
        for attempt in range(max(self.num_restarts, 5)):
            if attempt >= self.num_restarts and best is not None:
                break
            head.reset_parameters(None if attempt == 0 else generator)
            try:
                value = _lbfgsb(params, lower, lambda: head.objective(z, y, warn=False),
                                max_iter=500)
            except NotPSDError as exc:  # this start diverged; the others may not
                error = exc
                continue
            if math.isfinite(value) and (best is None or value < best[0]):
                best = (value, copy.deepcopy(head.state_dict()))
        if best is None:
            raise NotPSDError(f"every GP hyperparameter fit failed: {error}")
        head.load_state_dict(best[1])

    def _fit_exact_adam(self, x: torch.Tensor, y: torch.Tensor, epochs: int | None,
                        lr: float | None, weight_decay: float,
                        optimizer: torch.optim.Optimizer | None, grad_clip: float | None,
                        progress: bool) -> None:
        epochs = check_positive_int(epochs or 100, "epochs")
        lr = check_positive_float(lr or self.default_lr, "lr")
        if optimizer is None:
            optimizer = torch.optim.AdamW([
                {"params": list(self.gp.parameters()), "weight_decay": 0.0},
                {"params": self._backbone_params(), "weight_decay": weight_decay},
            ], lr=lr)
        self.history = []
        with preserve_training_flags(self):
            self.train()
            for _ in tqdm(range(epochs), desc="fit gp", disable=not progress, leave=False):
                optimizer.zero_grad(set_to_none=True)
                loss = self.gp.objective(self.features(x), y, warn=False)
                loss.backward()
                if grad_clip is not None:
                    nn.utils.clip_grad_norm_(self.parameters(), grad_clip)
                optimizer.step()
                self.gp.clamp_()
                self.history.append(float(loss.detach()))

    # variational: the base class's minibatch loop with these hooks
    def on_fit_start(self, batches: Any) -> None:
        xs, ys, rows = [], [], 0
        for x, y in batches:
            xs.append(x)
            ys.append(y)
            rows += x.shape[0]
            if rows >= 10_000:
                break
        z, y = self._setup(torch.cat(xs), torch.cat(ys))
        generator = torch.Generator().manual_seed(int(torch.randint(1 << 30, ())))
        pick = torch.randperm(z.shape[0], generator=generator)[:self.num_inducing]
        if self.task == "classification":
            num_latents = self.num_classes or int(y.max()) + 1
            self.num_classes = num_latents
            self.likelihood = gpytorch.likelihoods.SoftmaxLikelihood(
                num_classes=num_latents, mixing_weights=False)
        else:
            num_latents = y.shape[1]
            self.likelihood = gaussian_multitask_likelihood(num_latents)
        self.gp = VariationalGPHead(z[pick.to(z.device)], num_latents, kernel=self.kernel,
                                    outputscale=self.task == "classification", ard=self.ard)
        self.gp.to(device=self.device, dtype=self.dtype)
        self.likelihood.to(device=self.device, dtype=self.dtype)

    def configure_optimizer(self, lr: float, weight_decay: float) -> torch.optim.Optimizer:
        return torch.optim.AdamW([
            {"params": [*self.gp.parameters(), *self.likelihood.parameters()],
             "weight_decay": 0.0},
            {"params": self._backbone_params(), "weight_decay": weight_decay},
        ], lr=lr)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.gp is None:
            raise InputError("the GP is built from the training data; call .fit(train) first")
        if self._backbone_params():
            z = self.features(x)
        else:
            with torch.no_grad():
                z = self.features(x)
        if self.inference == "exact":
            y = (y[:, None] if y.dim() == 1 else y)
            return self.gp.objective(z, (y - self.y_mean) / self.y_std)
        if self.task == "regression":
            y = ((y[:, None] if y.dim() == 1 else y) - self.y_mean) / self.y_std
        elbo = gpytorch.mlls.VariationalELBO(self.likelihood, self.gp,
                                             num_data=int(self.n_data or x.shape[0]))
        return -elbo(self.gp(z), y)

    # ----------------------------------------------------------------- prediction

    def _latent(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent mean and variance [N, L] (standardized units for regression)."""
        if self.inference == "exact":
            return self.gp.posterior(z)
        dist = self.gp(z)
        return dist.mean, dist.variance

    def _noise(self) -> torch.Tensor:
        """Observation-noise variance per output [D], standardized units."""
        return self.gp.noise if self.inference == "exact" else self.likelihood.task_noises

    def _squeeze(self, t: torch.Tensor) -> torch.Tensor:
        return t[..., 0] if t.shape[-1] == 1 else t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_fitted("forward")
        mean, _ = self._latent(self.features(x))
        if self.task == "classification":
            return mean
        return self._squeeze(mean * self.y_std + self.y_mean)

    def _predict_batch(self, x: torch.Tensor, num_samples: int | None,
                       generator: torch.Generator | None) -> Predictive:
        mean, var = self._latent(self.features(x))
        if self.task == "classification":
            num_samples = num_samples or _DEFAULT_CLASS_SAMPLES
            eps = torch.randn((num_samples, *mean.shape), generator=generator,
                              dtype=mean.dtype, device=mean.device)
            return CategoricalPredictive.from_logits(sample_logits=mean + eps * var.sqrt())
        scale = self.y_std.pow(2)
        noise = (self._noise() * scale).expand_as(var)
        epistemic = var * scale
        return GaussianPredictive(self._squeeze(mean * self.y_std + self.y_mean),
                                  self._squeeze(epistemic + noise), self._squeeze(noise))

    def _joint_posterior(self, x: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Joint latent posterior over q points, differentiable in x, original units.

        Args:
            x: inputs [B, q, ...].

        Returns:
            ``(mean [B, q, D], covariance [B, D, q, q], noise variance [D])``; the
            covariance is full for exact inference and diagonal for the SVGP.
        """
        self._check_fitted("posterior")
        batch, q = x.shape[:2]
        z = self.features(x.reshape(batch * q, *x.shape[2:])).reshape(batch, q, -1)
        if self.inference == "exact":
            mean, cov = self.gp.posterior(z, joint=True)
        else:
            mean, var = self._latent(z.reshape(batch * q, -1))
            mean = mean.reshape(batch, q, -1)
            cov = torch.diag_embed(var.reshape(batch, q, -1).transpose(-1, -2))
        scale = self.y_std.pow(2)
        return (mean * self.y_std + self.y_mean, cov * scale[:, None, None],
                self._noise() * scale)

    def load(self, path: str) -> GPModel:
        """Load a checkpoint, rebuilding the GP head from its saved shapes."""
        state = torch.load(path, map_location=self.device, weights_only=True)["state_dict"]
        for name in ("feature_lower", "feature_range", "y_mean", "y_std"):
            setattr(self, name, torch.empty_like(state[name]))
        if self.inference == "exact":
            dim = state["gp.train_inputs"].shape[-1]
            self.gp = ExactGPHead(dim, state["gp.log_lengthscale"].shape[0], kernel=self.kernel,
                                  noise=self.fixed_noise, ard=self.ard)
            self.gp.to(device=self.device, dtype=self.dtype)
        else:
            inducing = state["gp.variational_strategy.base_variational_strategy.inducing_points"]
            num_latents = inducing.shape[0]
            if self.task == "classification":
                self.num_classes = num_latents
                self.likelihood = gpytorch.likelihoods.SoftmaxLikelihood(
                    num_classes=num_latents, mixing_weights=False)
            else:
                self.likelihood = gaussian_multitask_likelihood(num_latents)
            self.gp = VariationalGPHead(inducing[0], num_latents, kernel=self.kernel,
                                        outputscale=self.task == "classification",
                                        ard=self.ard)
            self.gp.to(device=self.device, dtype=self.dtype)
            self.likelihood.to(device=self.device, dtype=self.dtype)
        super().load(path)
        self.eval()
        return self
