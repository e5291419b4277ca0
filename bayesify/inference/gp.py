"""``"gp"``: a Gaussian-process head on a network's features (deep kernel learning).

The GP acts on the input of the network's final ``nn.Linear`` (its penultimate
features), or on the inputs themselves when ``model`` is ``None`` (a plain GP).
Features are scaled to the unit cube (from ``input_bounds`` or the training range)
and regression targets are standardized, as BoTorch's ``SingleTaskGP`` does.

* ``inference="exact"`` (regression default): closed-form posterior. On fixed features
  ``fit`` is closed form: L-BFGS-B on the marginal likelihood plus BoTorch's priors
  from ``num_restarts`` starts (:mod:`bayesify.inference._gp_fit`).
* ``inference="variational"`` (classification default; large N): a whitened SVGP with
  ``num_inducing`` inducing points, trained on minibatches by the ELBO.

With ``freeze_backbone=False`` the network trains jointly with the GP in the gradient
loop (full-batch Adam for exact inference); use weight decay and few epochs, as the
marginal likelihood over many weights overfits (Wilson et al., 2016). A frozen
backbone always runs in eval mode: BatchNorm statistics are used, never updated.

``posterior(x)`` is Gaussian over the latent functions: in the targets' units for
regression (joint over the points of a block for exact inference, as BoTorch's
acquisitions use), over the C logits for classification (Monte Carlo to probabilities).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from bayesify._batching import num_rows
from bayesify._validation import (
    check_choice,
    check_labels,
    check_positive_float,
    check_positive_int,
)
from bayesify.checkpoint import mark_dynamic
from bayesify.core import BayesianModel, preserve_training_flags, register_method
from bayesify.errors import CheckpointError, InputError, NotPSDError
from bayesify.fitting import CLOSED_FORM, FitStrategy, NonFiniteStep
from bayesify.inference._gp_fit import (
    check_input_bounds,
    first_rows,
    fit_exact_hyperparameters,
    standardizer,
    unit_cube_affine,
    whole_training_set,
)
from bayesify.inference._heads import find_head, run_to_head
from bayesify.layers.gp import (
    GPYTORCH_FACTORIZATION_ERRORS,
    KERNELS,
    ExactGPHead,
    VariationalGPHead,
    gpytorch,
    variational_gp,
)
from bayesify.likelihoods import CategoricalLikelihood, GaussianLikelihood, regression_targets
from bayesify.posterior import GaussianPosterior

__all__ = ["GPModel"]

_INFERENCE = ("exact", "variational")
_CLASS_SAMPLES = 64  # logit draws of the classification predictive
_SETUP_ROWS = 10_000  # rows that set the scaling and inducing points of the SVGP
_ALL_ROWS = 1 << 62
_INDUCING = "gp.variational_strategy.base_variational_strategy.inducing_points"


@register_method("gp")
class GPModel(BayesianModel):
    """A GP head on a network's penultimate features, or a plain GP (``model=None``).

    Args:
        model: the network (its final ``nn.Linear`` is bypassed), or ``None``.
        task: ``"regression"`` or ``"classification"``.
        inference: ``"exact"`` (regression only) or ``"variational"``; defaults to
            exact for regression, variational for classification.
        num_inducing: M, inducing points of the variational GP.
        freeze_backbone: keep the network fixed, in eval mode (train only the GP).
        kernel: ``"rbf"`` (BoTorch's default) or ``"matern"`` (Matérn 5/2).
        ard: one lengthscale per feature (default); ``False`` shares one, much faster
            to fit on wide network features.
        noise: ``None`` learns the noise; a float fixes the noise variance in
            standardized target units (exact inference).
        input_bounds: [2, d] lower/upper bounds of the features for the unit-cube
            scaling (the training range when ``None``).
        num_restarts: L-BFGS-B starts of the exact GP's hyperparameter fit (prior modes,
            then prior draws, screened on 256 rows for larger N; the best wins; up to 5
            when every start fails).
        num_classes: C for classification when the model cannot tell.
        head: name of the layer whose input are the features (default: the last Linear).
        n_data: N for the ELBO's scaling (the training-set size when ``None``).

    ``fit`` options: exact inference with a frozen backbone takes only ``seed`` and
    ``progress`` (a closed-form fit); otherwise the gradient loop's options apply,
    with 100 full-batch epochs for exact inference (``batch_size`` does not apply)
    and 50 minibatch epochs of 256 rows for the SVGP, AdamW at lr 0.01.
    """

    default_epochs = 50
    default_lr = 0.01
    default_batch_size = 256
    #: Full-batch Adam steps of an exact GP trained with its backbone.
    default_exact_epochs = 100
    supports_joint = True

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
        self.head_name: str | None = None
        linear = None
        if model is not None and not isinstance(model, nn.Identity):
            self.head_name, linear = find_head(model, head)
            if task == "classification" and self.num_classes is None:
                self.num_classes = linear.out_features
        self._input_bounds = check_input_bounds(input_bounds)
        #: The GP head and its GPyTorch likelihood (variational), built by ``fit``.
        self.gp: ExactGPHead | VariationalGPHead | None = None
        self.gp_likelihood: gpytorch.likelihoods.Likelihood | None = None
        factory = {"dtype": self.dtype, "device": self.device}
        for name in ("feature_lower", "feature_range", "y_mean", "y_std"):
            self.register_buffer(name, torch.zeros(0, **factory))
        mark_dynamic(self, "feature_lower", "feature_range", "y_mean", "y_std")
        self._fit_inputs: torch.Tensor | None = None  # exact GP in the gradient loop
        if task == "regression":
            self.likelihood = GaussianLikelihood(self._split_noise)
        else:
            self.likelihood = CategoricalLikelihood(num_samples=_CLASS_SAMPLES)
        if self.inference == "variational" and linear is not None:
            self._initial_svgp(linear)

    def _initial_svgp(self, linear: nn.Linear) -> None:
        """An SVGP on unscaled features, so users' own loops (``loss``, ``finish_fit``)
        have parameters to train; ``fit`` rebuilds it from the training data."""
        generator = torch.Generator().manual_seed(0)  # leaves the global RNG alone
        inducing = torch.rand(min(self.num_inducing, 64), linear.in_features,
                              generator=generator, dtype=torch.float64)
        latents = self.num_classes if self.task == "classification" else linear.out_features
        self.gp, self.gp_likelihood = variational_gp(
            inducing.to(dtype=self.dtype, device=self.device), latents,
            classification=self.task == "classification", kernel=self.kernel, ard=self.ard)
        if self.task == "regression":
            self.y_mean = torch.zeros(latents, dtype=self.dtype, device=self.device)
            self.y_std = torch.ones(latents, dtype=self.dtype, device=self.device)

    # ------------------------------------------------------------------ features

    def _backbone_params(self) -> list[nn.Parameter]:
        frozen = self.model is None or self.freeze_backbone
        return [] if frozen else [p for p in self.model.parameters() if p.requires_grad]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Unit-cube features [N, d] of inputs x [N, ...] (differentiable in x)."""
        if self.model is None:
            z = x
        elif self.head_name is None:
            z = self.call_network(x)
        else:
            frozen = not self._backbone_params()
            z = run_to_head(self.model, self.head_name, x, frozen=frozen,
                            output=self.output).features
        z = z.reshape(z.shape[0], -1)
        if self.feature_lower.numel():
            z = (z - self.feature_lower) / self.feature_range
        return z

    def _setup(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Set the scaling of features and targets from (a sample of) the training data
        x [n, ...], y [n] / [n, D] (labels for classification); returns the scaled
        features [n, d] and the (standardized) targets."""
        self.feature_lower = torch.zeros(0, dtype=self.dtype, device=self.device)
        with torch.no_grad(), preserve_training_flags(self):
            self.eval()
            z = self.features(x)
        self.feature_lower, self.feature_range = unit_cube_affine(z, self._input_bounds)
        z = (z - self.feature_lower) / self.feature_range
        if self.task == "regression":
            y = y[:, None] if y.dim() == 1 else y
            self.y_mean, self.y_std = standardizer(y)
            y = (y - self.y_mean) / self.y_std
        return z, y

    def _require_gp(self) -> None:
        if self.gp is None:
            raise InputError("the GP is built from the training data (its feature width "
                             "is unknown without a network head); call .fit(train) first")

    def _num_latents(self) -> int | None:
        """C for classification: the option, the head's width, or the fitted head's."""
        if self.num_classes is not None:
            return self.num_classes
        return None if self.gp is None else int(self.gp.num_latents)

    def _standardize(self, y: torch.Tensor) -> torch.Tensor:
        return (regression_targets(y, int(self.y_mean.shape[0])) - self.y_mean) / self.y_std

    # ------------------------------------------------------------------- fitting

    def fit_strategy(self) -> FitStrategy:
        """Closed form (L-BFGS-B) for an exact GP on fixed features, else the
        gradient loop."""
        if self.inference == "exact" and not self._backbone_params():
            return CLOSED_FORM
        return super().fit_strategy()

    def fit_defaults(self) -> dict[str, Any]:
        defaults = super().fit_defaults()
        if self.inference == "exact":
            defaults.update(epochs=self.default_exact_epochs, batch_size=None)
        return defaults

    def training_batches(self, train: Any, *, batch_size: int | None,
                         generator: torch.Generator | None, shuffle: bool = True) -> Any:
        """Minibatches for the SVGP; one batch of the whole training set for an exact
        GP, whose marginal likelihood couples all points."""
        if self.inference != "exact":
            return super().training_batches(train, batch_size=batch_size,
                                            generator=generator, shuffle=shuffle)
        return whole_training_set(super().training_batches(
            train, batch_size=_ALL_ROWS, generator=None, shuffle=False), batch_size)

    def _exact_head(self, dim: int, num_outputs: int) -> ExactGPHead:
        return ExactGPHead(dim, num_outputs, kernel=self.kernel, noise=self.fixed_noise,
                           ard=self.ard, dtype=self.dtype, device=self.device)

    def fit_full_batch(self, x: torch.Tensor, y: torch.Tensor, *, seed: int | None,
                       progress: bool | None) -> None:
        """The closed-form fit: L-BFGS-B on the exact GP's hyperparameters, then the
        training set becomes the GP's data (x [N, ...], y [N] or [N, D])."""
        z, y_std = self._setup(x, y)
        self.gp = self._exact_head(z.shape[1], y_std.shape[1])
        fit_exact_hyperparameters(self.gp, z, y_std, num_restarts=self.num_restarts,
                                  seed=seed, progress=progress)
        self.gp.set_train_data(z, y_std)

    def on_fit_start(self, batches: Any) -> None:
        """Build the GP head from the training data: the exact head on all of it, or
        the SVGP with inducing points drawn from the first rows."""
        if self.inference == "exact":
            x, y = batches.tensors
            z, y_std = self._setup(x, y)
            self.gp = self._exact_head(z.shape[1], y_std.shape[1])
            self.gp.set_train_data(z, y_std)
            self._fit_inputs = x
            return
        z, y = self._setup(*first_rows(batches, _SETUP_ROWS))
        generator = torch.Generator().manual_seed(int(torch.randint(1 << 30, ())))
        pick = torch.randperm(z.shape[0], generator=generator)[:self.num_inducing]
        if self.task == "classification":
            y = check_labels(y, "y", self.num_classes)
            num_latents = self.num_classes or max(int(y.max()) + 1, 2)
        else:
            num_latents = y.shape[1]
        self.gp, self.gp_likelihood = variational_gp(
            z[pick.to(z.device)], num_latents, classification=self.task == "classification",
            kernel=self.kernel, ard=self.ard)

    def configure_optimizer(self, lr: float, weight_decay: float) -> torch.optim.Optimizer:
        """AdamW: no weight decay on the GP (its priors are in the objective), the given
        decay on a trainable backbone."""
        self._require_gp()
        gp = [*self.gp.parameters()]
        if self.gp_likelihood is not None and self.inference == "variational":
            gp += [*self.gp_likelihood.parameters()]
        groups = [{"params": [p for p in gp if p.requires_grad], "weight_decay": 0.0}]
        backbone = self._backbone_params()
        if backbone:
            groups.append({"params": backbone, "weight_decay": weight_decay})
        return torch.optim.AdamW(groups, lr=lr)

    def training_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The loop's loss; a kernel matrix that cannot be factorized (NaN or overflowing
        hyperparameters after a too-large step) is reported as a diverged step."""
        try:
            if self.inference == "exact":  # jitter is routine while hyperparameters move
                return self.gp.objective(self.features(x), self._standardize(y), warn=False)
            return self.loss(x, y)
        except (NotPSDError, *GPYTORCH_FACTORIZATION_ERRORS) as exc:
            raise NonFiniteStep("loss (the GP's kernel matrix could not be factorized)",
                                float("nan")) from exc

    def training_step(self, x: torch.Tensor, y: torch.Tensor,
                      optimizer: torch.optim.Optimizer) -> torch.Tensor:
        loss = super().training_step(x, y, optimizer)
        if self.inference == "exact":
            self.gp.clamp_()  # lengthscale >= 0.025, noise >= 1e-4
        return loss

    def on_fit_end(self) -> None:
        """Exact GP trained with its backbone: its data become the final features."""
        if self.inference == "exact" and self._fit_inputs is not None:
            with torch.no_grad(), preserve_training_flags(self):
                self.eval()
                z = self.features(self._fit_inputs)
            self.gp.set_train_data(z, self.gp.train_targets)
            self._fit_inputs = None

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The negative marginal likelihood plus priors over N (exact) or the negative
        ELBO (variational) of a batch x [B, ...], y [B] / [B, D] (after ``fit`` has
        built the GP)."""
        self._require_gp()
        with torch.set_grad_enabled(torch.is_grad_enabled() and bool(self._backbone_params())):
            z = self.features(x)
        if self.inference == "exact":
            return self.gp.objective(z, self._standardize(y))
        if self.task == "classification":  # C from the option, the head, or the fit
            y = check_labels(y, "y", self._num_latents())
        else:
            y = self._standardize(y)
        elbo = gpytorch.mlls.VariationalELBO(self.gp_likelihood, self.gp,
                                             num_data=int(self.n_data or num_rows(x)))
        return -elbo(self.gp(z), y)

    # ----------------------------------------------------------------- posterior

    def _latent(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent mean and variance [n, L] at features z [n, d] (standardized units)."""
        if self.inference == "exact":
            return self.gp.posterior(z)
        dist = self.gp(z)
        return dist.mean, dist.variance

    def _split_noise(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The regression likelihood's split: means [..., N, D] and the noise variance
        in the targets' units, broadcast to them."""
        noise = self.gp.noise if self.inference == "exact" else self.gp_likelihood.task_noises
        return raw, (noise * self.y_std.pow(2)).to(raw.dtype).expand_as(raw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Latent mean: logits [N, C], or the regression mean [N] / [N, D]."""
        self._check_fitted("forward")
        mean, _ = self._latent(self.features(x))
        if self.task == "classification":
            return mean
        mean = mean * self.y_std + self.y_mean
        return mean[:, 0] if mean.shape[1] == 1 else mean

    def _posterior(self, x: torch.Tensor, num_samples: int | None,
                   generator: torch.Generator | None,
                   blocks: tuple[int, int] | None = None) -> GaussianPosterior:
        """Gaussian over the latent functions at x [N, ...] (mean [N, L], diagonal), or
        with ``blocks=(b, q)`` over b blocks of q points (mean [b, q, L]; exact
        regression: covariance joint within each block, [b, L, q, q])."""
        z = self.features(x)
        if self.inference == "exact" and blocks is not None:
            mean, cov = self.gp.posterior(z.reshape(*blocks, -1), joint=True)
            scale = self.y_std.pow(2)[:, None, None]
            return GaussianPosterior(mean * self.y_std + self.y_mean, cov * scale,
                                     kind="joint")
        mean, var = self._latent(z)
        if blocks is not None:
            mean, var = mean.reshape(*blocks, -1), var.reshape(*blocks, -1)
        if self.task == "regression":
            mean, var = mean * self.y_std + self.y_mean, var * self.y_std.pow(2)
        return GaussianPosterior(mean, var, kind="diagonal")

    # --------------------------------------------------------------- checkpoints

    def _modules_for_state(self, state_dict: dict[str, Any]) -> dict[str, nn.Module]:
        """The GP head (and likelihood) sized from a checkpoint's shapes."""
        if self.inference == "exact":
            lengthscale = state_dict.get("gp.log_lengthscale")
            inputs = state_dict.get("gp.train_inputs")
            if not (isinstance(lengthscale, torch.Tensor) and isinstance(inputs, torch.Tensor)
                    and inputs.dim() == 2):
                return {}
            return {"gp": self._exact_head(int(inputs.shape[1]), int(lengthscale.shape[0]))}
        inducing = state_dict.get(_INDUCING)
        if not isinstance(inducing, torch.Tensor) or inducing.dim() != 3:
            return {}
        num_latents = int(inducing.shape[0])
        if self.task == "classification" and self.num_classes not in (None, num_latents):
            raise CheckpointError(f"the checkpoint holds a GP over {num_latents} classes, "
                                  f"but this model has {self.num_classes}")
        head, likelihood = variational_gp(
            inducing[0].to(self.dtype), num_latents, kernel=self.kernel, ard=self.ard,
            classification=self.task == "classification")
        return {"gp": head, "gp_likelihood": likelihood}

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, inference={self.inference!r}, "
                f"kernel={self.kernel!r}, freeze_backbone={self.freeze_backbone}")
