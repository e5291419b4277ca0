"""The ``"ivon"`` method: a network whose posterior lives in an :class:`IVON` optimizer.

Two ways in:

* ``bayesify(model, "ivon", task=...)`` then ``fit``: trains with IVON (``ess`` = the
  training-set size unless given), one weight sample per step by default;
* ``bayesify(model, "ivon", task=..., optimizer=opt)`` for a model already trained in
  the user's own loop with ``opt = bf.IVON(model.parameters(), ...)``: the posterior is
  read from the optimizer's state, nothing is retrained.

``predict`` averages the network over ``num_samples`` weight samples (softmax averaged
through log-mean-exp for classification, a Gaussian mixture for regression), with the
model in eval mode.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from bayesify._validation import check_positive_float, check_positive_int
from bayesify.core import BayesianModel, register_method
from bayesify.errors import InputError, NotFittedError
from bayesify.inference.deterministic import NetworkLikelihoodMixin
from bayesify.inference.ivon import IVON, _check_group
from bayesify.predictive import CategoricalPredictive, MixturePredictive, Predictive

__all__ = ["IVONModel"]


@register_method("ivon")
class IVONModel(NetworkLikelihoodMixin, BayesianModel):
    """A network trained by IVON; predictions average over its weight posterior.

    Args:
        model: a network outputting logits [N, C] (classification) or means [N, D]
            (regression; [N, 2D] with ``noise="heteroscedastic"``).
        task: ``"classification"`` or ``"regression"``.
        optimizer: an :class:`IVON` the model was already trained with (its state is
            the posterior); ``fit`` continues with it. ``None``: ``fit`` makes one.
        ess, hess_init, beta1, beta2, weight_decay, mc_samples, hess_approx,
            clip_radius, rescale_lr, sync, seed: options of the IVON that ``fit``
            makes (see :class:`IVON`); ``ess`` defaults to the training-set size.
        noise: regression noise: ``"homoscedastic"`` (learned), ``"heteroscedastic"``
            or a fixed standard deviation.
        num_outputs: D, when it cannot be read off the model's last layer.
        n_data: N, the training-set size (inferred by ``fit``).

    ``loss(x, y)`` is the mean negative log likelihood of a batch, the data term of
    IVON's objective (the prior enters through ``weight_decay``); in a custom loop call
    it inside ``optimizer.sampled_params(train=True)``.
    """

    default_num_samples = 64
    default_epochs = 30
    default_lr = 0.1
    default_batch_size = 64

    def __init__(
        self,
        model: nn.Module,
        task: str,
        *,
        optimizer: IVON | None = None,
        ess: float | None = None,
        hess_init: float = 1.0,
        beta1: float = 0.9,
        beta2: float = 0.99999,
        weight_decay: float = 1e-4,
        mc_samples: int = 1,
        hess_approx: str = "price",
        clip_radius: float = math.inf,
        rescale_lr: bool = True,
        sync: bool = False,
        seed: int | None = None,
        noise: Any = "homoscedastic",
        num_outputs: int | None = None,
        n_data: int | None = None,
    ):
        if model is None:
            raise InputError("`model` is None; the ivon method needs a network")
        super().__init__(model, task, n_data=n_data)
        self._init_likelihood(noise, num_outputs)
        if ess is not None:
            ess = check_positive_float(ess, "ess")
        self.options = dict(ess=ess, hess_init=hess_init, beta1=beta1, beta2=beta2,
                            weight_decay=weight_decay, mc_samples=mc_samples,
                            hess_approx=hess_approx, clip_radius=clip_radius,
                            rescale_lr=rescale_lr, sync=sync, seed=seed)
        _check_group({**self.options, "ess": ess or 1.0, "lr": 1.0, "params": []})
        check_positive_int(mc_samples, "mc_samples")
        self.optimizer: IVON | None = None
        if optimizer is not None:
            self._adopt(optimizer)
            trained = any("hess" in optimizer.state.get(p, ()) for p in optimizer.params)
            if trained and (task == "classification" or self.noise.kind == "fixed"):
                self._mark_fitted()

    def _adopt(self, optimizer: Any) -> None:
        """Take ``optimizer`` as the posterior after checking it covers the network."""
        if not isinstance(optimizer, IVON):
            raise InputError("`optimizer` must be a bayesify.IVON (the posterior lives in "
                             f"its state), got {type(optimizer).__name__}")
        held = {id(p) for p in optimizer.params}
        for name, p in self.model.named_parameters():
            if p.requires_grad and id(p) not in held:
                raise InputError(f"`optimizer` does not hold the model's parameter {name!r}; "
                                 "pass an IVON built over model.parameters()")
        self.optimizer = optimizer

    @classmethod
    def report_settings(cls, task: str) -> dict[str, dict[str, Any]]:
        # A short run from a pretrained network, β₂ low enough for h to adapt within a
        # few hundred steps. IVON starts as SGD with momentum, so the Gaussian NLL of
        # regression, whose gradients scale as 1/σ², needs a much smaller lr.
        lr = 0.05 if task == "classification" else 0.002
        return {"options": {"hess_init": 1.0, "beta2": 0.999, "seed": 0},
                "fit": {"epochs": 5 if task == "classification" else 10, "lr": lr,
                        "batch_size": 64}}

    # -------------------------------------------------------------------- training

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The prediction at the posterior mean."""
        return self._point(self.model(x))

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._nll(self.model(x), y)

    def fit(self, train: Any, *, lr: float | None = None, weight_decay: float | None = None,
            **kwargs: Any) -> IVONModel:
        """Train with IVON; see :meth:`BayesianModel.fit` for the arguments.

        ``lr`` and ``weight_decay`` (δ, the prior precision per datum) default to the
        method's; with an existing optimizer, a given ``lr`` replaces its groups' lr and
        training continues from its posterior.
        """
        if weight_decay is not None:
            self.options["weight_decay"] = check_positive_float(weight_decay, "weight_decay",
                                                                allow_zero=True)
        if lr is not None and self.optimizer is not None:
            lr = check_positive_float(lr, "lr")
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        return super().fit(train, lr=lr, weight_decay=self.options["weight_decay"], **kwargs)

    def on_fit_start(self, batches: Any) -> None:
        if not self.is_fitted:
            self._initialize_noise(batches)

    def configure_optimizer(self, lr: float, weight_decay: float) -> IVON:
        if self.optimizer is not None:
            held = {id(p) for p in self.optimizer.params}
            extra = [p for p in self.parameters() if p.requires_grad and id(p) not in held]
            if extra:   # the learned noise scale, when the user's IVON trained the network
                self.optimizer.add_param_group({"params": extra})
            return self.optimizer
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise InputError("the ivon method found no trainable parameters to fit")
        options = dict(self.options)
        options["ess"] = options["ess"] or float(self.n_data)
        options["weight_decay"] = weight_decay
        self.optimizer = IVON(params, lr=lr, **options)
        return self.optimizer

    def training_step(self, x: torch.Tensor, y: torch.Tensor,
                      optimizer: torch.optim.Optimizer) -> torch.Tensor:
        if not isinstance(optimizer, IVON):
            raise InputError("`optimizer` must be a bayesify.IVON for the ivon method, got "
                             f"{type(optimizer).__name__}")
        if optimizer is not self.optimizer:
            self._adopt(optimizer)

        def closure() -> torch.Tensor:
            optimizer.zero_grad(set_to_none=True)
            loss = self.loss(x, y)
            loss.backward()
            if self._grad_clip is not None:
                nn.utils.clip_grad_norm_(
                    [p for p in self.parameters() if p.grad is not None], self._grad_clip)
            return loss

        return optimizer.step(closure)

    # ------------------------------------------------------------------ prediction

    def _predict_batch(self, x: torch.Tensor, num_samples: int | None,
                       generator: torch.Generator | None) -> Predictive:
        if self.optimizer is None:
            raise NotFittedError("this IVONModel has no IVON posterior; call .fit(train) or "
                                 "wrap with optimizer=<the IVON it was trained with>")
        # Sampled weights go in through functional_call rather than being written into
        # the parameters, so the outputs stay differentiable in x (the BO bridge needs
        # gradients of the acquisition with respect to the inputs).
        names = {id(p): name for name, p in self.model.named_parameters()}
        outputs = []
        for _ in range(num_samples or self.default_num_samples):
            draw = self.optimizer.sample(generator)
            weights = {names[id(p)]: w for p, w in zip(self.optimizer.params, draw, strict=True)
                       if id(p) in names}
            outputs.append(functional_call(self.model, weights, (x,)))
        outputs = torch.stack(outputs)
        if self.task == "classification":
            return CategoricalPredictive.from_logits(sample_logits=outputs)
        self.noise.check_output(outputs[0])
        means, variances = self.noise.split(outputs)
        return MixturePredictive(self._squeeze(means), self._squeeze(variances))

    # ----------------------------------------------------------------- checkpoints

    def get_extra_state(self) -> dict[str, Any]:
        """The optimizer's state (the posterior) travels with the module's state_dict."""
        if self.optimizer is None:
            return {}
        return {"optimizer": self.optimizer.state_dict(), "options": dict(self.options)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if self.optimizer is None:
            self.options.update(state["options"])
            ess = self.options["ess"] or float(self.n_data or 1)
            options = {**self.options, "ess": ess}
            params = [p for p in self.parameters() if p.requires_grad]
            self.optimizer = IVON(params, lr=self.default_lr, **options)
        self.optimizer.load_state_dict(state["optimizer"])
