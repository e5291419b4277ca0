"""The ``"ivon"`` method: a network whose posterior lives in an :class:`~bayesify.IVON`.

Three ways in, all ending in the same posterior (the optimizer's state):

* ``bayesify(model, "ivon", task=...).fit(train)``: trains with IVON (``ess`` = the
  training-set size unless given), one weight sample per step by default;
* your own loop: ``opt = bm.configure_optimizer(lr, weight_decay)``, then per batch
  ``with opt.sampled_params(train=True): opt.zero_grad(); bm.loss(x, y).backward()``
  and ``opt.step()``; the model predicts as soon as the optimizer has Hessian state
  (``bm.finish_fit()`` checks and marks it);
* ``bayesify(model, "ivon", task=..., optimizer=opt)`` for a network already trained
  with ``opt = bf.IVON(model.parameters(), ...)``: nothing is retrained.

``posterior(x)`` holds the network's outputs under S weight samples [S, N, K], drawn
through ``functional_call`` (the parameters are not touched and the outputs stay
differentiable in x) with the model in eval mode. BatchNorm: training updates the
running statistics with sampled weights, as the user's own IVON loop does; prediction
uses them and never updates them.

Recipes: ``recipe="scratch"`` (the default: ``fit`` lr 0.1, ``hess_init`` 1) suits a
network trained from its initialization; ``recipe="finetune"`` (lr 0.003, ``hess_init``
= 1/(ess·10⁻⁶), an initial posterior std of at most 1e-3) suits a pretrained one, which
the from-scratch values can wreck (a pretrained BERT fine-tuned with them predicts the
majority class). Options given explicitly override the recipe. With the from-scratch
defaults, ``fit`` compares, on its first batch, the loss of the model as given with
that of the initial posterior's draws and of the means after 8 steps, and warns (once)
when either more than doubled, pointing at ``recipe="finetune"``. The
paper's recipes (Shen et al. 2024, trained from scratch, with an lr schedule):

* CIFAR-10/100 ResNets: ``bayesify(net, "ivon", task="classification", hess_init=0.5,
  ess=5e4, weight_decay=2e-4).fit(train, lr=0.2, batch_size=50)``;
* ImageNet ResNet-50: ``hess_init=0.05`` (ess = N = 1.28e6), ``fit(lr=2.5)``;
* GPT-2 pretraining: ``hess_init=1e-3, ess=1e10, clip_radius=1e-3``, lr 150 to 300
  (with the rescaled lr α = lr·(h₀ + δ), the step starts as SGD's with lr).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from bayesify._validation import check_choice, check_positive_float, check_positive_int
from bayesify.core import BayesianModel, preserve_training_flags, register_method
from bayesify.errors import CheckpointError, InputError, NotFittedError
from bayesify.fitting import check_finite_loss, gradient_norm
from bayesify.inference._ivon_recipes import RECIPES, StartWatch, recipe_hess_init
from bayesify.inference._sampled import sampled_posterior
from bayesify.inference.deterministic import NetworkLikelihoodMixin
from bayesify.optim.ivon import IVON
from bayesify.optim.ivon_checks import check_group, check_state_dict
from bayesify.posterior import SampledPosterior

__all__ = ["IVONModel"]

_OPTIONS = ("ess", "hess_init", "beta1", "beta2", "weight_decay", "mc_samples",
            "hess_approx", "clip_radius", "rescale_lr", "sync", "seed")


def _check_options(options: Mapping[str, Any]) -> None:
    """Validate the IVON options of the method (raises InputError)."""
    if options.get("ess") is not None:
        check_positive_float(options["ess"], "ess")
    hess_init = 1.0 if options.get("hess_init") is None else options["hess_init"]
    check_group({**options, "ess": options.get("ess") or 1.0, "hess_init": hess_init,
                 "lr": 1.0, "params": []})
    check_positive_int(options["mc_samples"], "mc_samples")
    if options["seed"] is not None:
        check_positive_int(options["seed"], "seed", minimum=0)


@register_method("ivon")
class IVONModel(NetworkLikelihoodMixin, BayesianModel):
    """A network trained by IVON; predictions average over its weight posterior.

    Args:
        model: a network outputting logits [N, C] (classification) or means [N, D]
            (regression; [N, 2D] with ``noise="heteroscedastic"``).
        task: ``"classification"`` or ``"regression"``.
        optimizer: an :class:`~bayesify.IVON` over the model's parameters that the
            model was trained with (its state is the posterior); ``fit`` continues with
            it. ``None``: ``fit`` (or :meth:`configure_optimizer`) makes one.
        recipe: ``"scratch"`` (default) or ``"finetune"`` for a pretrained network:
            ``fit``'s default lr and ``hess_init`` (see the module docstring).
        ess, hess_init, beta1, beta2, weight_decay, mc_samples, hess_approx,
            clip_radius, rescale_lr, sync, seed: options of the IVON that ``fit``
            makes (see :class:`~bayesify.IVON`); ``ess`` defaults to the training-set
            size, ``hess_init`` to the recipe's and ``weight_decay`` is the default of
            ``fit(weight_decay=)``.
        noise_param, beta: how heteroscedastic outputs give the variance, and the
            beta-NLL weight (see :class:`~bayesify.likelihoods.GaussianNoise`).
        noise: regression noise: ``"homoscedastic"`` (learned), ``"heteroscedastic"``
            or a fixed standard deviation.
        num_outputs: D, when it cannot be read off the model's last layer.
        n_data: N, the training-set size (inferred by ``fit``; needed for your own loop
            unless ``ess`` is given).

    ``loss(x, y)`` is the mean negative log likelihood of a batch, the data term of
    IVON's objective (the prior enters through ``weight_decay``); in your own loop call
    it inside ``optimizer.sampled_params(train=True)``. ``fit(lr=, weight_decay=)``
    with an existing optimizer replaces its groups' values only when given.
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
        recipe: str = "scratch",
        ess: float | None = None,
        hess_init: float | None = None,
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
        noise_param: str | None = None,
        beta: float = 0.0,
        n_data: int | None = None,
    ):
        if model is None:
            raise InputError("`model` is None; the ivon method needs a network")
        super().__init__(model, task, n_data=n_data)
        self.options: dict[str, Any] = dict(
            ess=ess, hess_init=hess_init, beta1=beta1, beta2=beta2,
            weight_decay=weight_decay, mc_samples=mc_samples, hess_approx=hess_approx,
            clip_radius=clip_radius, rescale_lr=rescale_lr, sync=sync, seed=seed)
        _check_options(self.options)
        #: ``"scratch"`` or ``"finetune"``: where ``fit``'s lr and ``hess_init`` come from.
        self.recipe = check_choice(recipe, "recipe", tuple(RECIPES))
        self._watch: StartWatch | None = None
        self._init_likelihood(noise, num_outputs, noise_param=noise_param, beta=beta)
        self._optimizer: IVON | None = None
        self._revoked = False
        if optimizer is not None:
            self.optimizer = optimizer
        if self.is_fitted:
            self._mark_fitted()

    # ------------------------------------------------------------ the posterior

    @property
    def optimizer(self) -> IVON | None:
        """The IVON whose state is the posterior (``None`` before training)."""
        return self._optimizer

    @optimizer.setter
    def optimizer(self, optimizer: IVON) -> None:
        if not isinstance(optimizer, IVON):
            raise InputError("`optimizer` must be a bayesify.IVON (the posterior lives in "
                             f"its state), got {type(optimizer).__name__}")
        held = {id(p) for p in optimizer.params}
        for name, p in self.model.named_parameters():
            if p.requires_grad and id(p) not in held:
                raise InputError(f"`optimizer` does not hold the model's parameter {name!r}; "
                                 "pass an IVON built over model.parameters()")
        own = {id(p) for p in self.parameters()}
        foreign = sum(id(p) not in own for p in optimizer.params)
        if foreign:
            raise InputError(f"`optimizer` holds {foreign} parameter(s) that are not the "
                             "model's; pass an IVON built over model.parameters()")
        self._optimizer = optimizer

    def _missing_from_optimizer(self) -> list[str]:
        held = {id(p) for p in self._optimizer.params} if self._optimizer else set()
        return [n for n, p in self.named_parameters() if p.requires_grad and id(p) not in held]

    @property
    def is_fitted(self) -> bool:
        """Whether a posterior exists: after ``fit``/``finish_fit``/``load``, or as soon as
        an IVON holding every trainable parameter has Hessian state (your own loop)."""
        if super().is_fitted:
            return True
        return (not self._revoked and self._optimizer is not None
                and self._optimizer.has_posterior and not self._missing_from_optimizer())

    def _mark_fitted(self, value: bool = True) -> None:
        super()._mark_fitted(value)
        self._revoked = not value   # a diverged fit: the optimizer state is no posterior

    def _posterior(self, x: torch.Tensor, num_samples: int | None,
                   generator: torch.Generator | None) -> SampledPosterior:
        """Network outputs under S weight draws from the IVON posterior, [S, N, K]."""
        if self._optimizer is None:
            raise NotFittedError("this IVONModel has no IVON posterior; call .fit(train) or "
                                 "wrap with optimizer=<the IVON it was trained with>")
        names = {id(p): name for name, p in self.model.named_parameters()}
        outputs = []
        with preserve_training_flags(self.model):
            self.model.eval()
            for _ in range(num_samples or self.default_num_samples):
                draw = self._optimizer.sample(generator)
                weights = {names[id(p)]: w for p, w in zip(self._optimizer.params, draw,
                                                           strict=True) if id(p) in names}
                outputs.append(self.call_network(x, params=weights))
        return sampled_posterior(self, torch.stack(outputs))

    # -------------------------------------------------------------------- training

    def forward(self, x: Any) -> torch.Tensor:
        """The prediction at the posterior mean: logits [N, C] or the mean [N]/[N, D]."""
        return self._point(self.call_network(x))

    def loss(self, x: Any, y: torch.Tensor) -> torch.Tensor:
        """Mean negative log likelihood of the batch (a scalar)."""
        return self._nll(self.call_network(x), y)

    def fit_defaults(self) -> dict[str, Any]:
        """With an optimizer, its first group's lr and weight decay (kept unless given)."""
        defaults = super().fit_defaults()
        if self._optimizer is None:
            defaults["lr"] = RECIPES[self.recipe]["lr"]
            defaults["weight_decay"] = self.options["weight_decay"]
        else:
            group = self._optimizer.param_groups[0]
            defaults["lr"], defaults["weight_decay"] = group["lr"], group["weight_decay"]
        return defaults

    def on_fit_start(self, batches: Any) -> None:
        if not self.is_fitted:
            with preserve_training_flags(self.model):
                self.model.eval()
                self._initialize_noise(batches)

    def configure_optimizer(self, lr: float, weight_decay: float) -> IVON:
        """The IVON that holds the posterior, made over all trainable parameters.

        With an existing optimizer: parameters it lacks (the learned noise scale) join
        as a new group, and ``lr``/``weight_decay`` replace its groups' values when
        they differ from :meth:`fit_defaults`. Usable in your own loop (then ``ess``
        or ``n_data`` must be known).

        Returns:
            The optimizer, also kept as ``self.optimizer``.
        """
        lr = check_positive_float(lr, "lr", allow_zero=self._optimizer is not None)
        weight_decay = check_positive_float(weight_decay, "weight_decay", allow_zero=True)
        if self._optimizer is not None:
            current = self.fit_defaults()
            for key, value in (("lr", lr), ("weight_decay", weight_decay)):
                if value != current[key]:
                    for group in self._optimizer.param_groups:
                        group[key] = value
            missing = set(self._missing_from_optimizer())
            extra = [p for n, p in self.named_parameters() if n in missing]
            if extra:
                self._optimizer.add_param_group({"params": extra})
            return self._optimizer
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise InputError("the ivon method found no trainable parameters to fit")
        ess = self.options["ess"] or self.n_data
        if ess is None:
            raise InputError("IVON needs the training-set size: pass n_data=N (or ess=) to "
                             "bayesify(...), or train with .fit(train)")
        self.options["weight_decay"] = weight_decay
        defaults = self.options["hess_init"] is None and self.recipe == "scratch"
        if self.options["hess_init"] is None:
            self.options["hess_init"] = recipe_hess_init(self.recipe, float(ess))
        options = {**self.options, "ess": float(ess)}
        self._optimizer = IVON(params, lr=lr, **options)
        self._revoked = False
        # From-scratch defaults on a model that may be pretrained: watch the first steps.
        self._watch = StartWatch(ess=float(ess), hess_init=options["hess_init"],
                                 weight_decay=weight_decay, lr=lr) \
            if defaults and lr == RECIPES["scratch"]["lr"] else None
        return self._optimizer

    def training_step(self, x: torch.Tensor, y: torch.Tensor,
                      optimizer: torch.optim.Optimizer) -> torch.Tensor:
        """One IVON step: ``mc_samples`` sampled forward/backward passes, then the update.

        The divergence guard runs in every sample (a non-finite loss or gradient norm
        raises before anything is kept; IVON then discards the step's samples).
        """
        if not isinstance(optimizer, IVON):
            raise InputError("`optimizer` must be a bayesify.IVON for the ivon method, got "
                             f"{type(optimizer).__name__}")
        if optimizer is not self._optimizer:
            self.optimizer = optimizer
            self.configure_optimizer(*[self.fit_defaults()[k] for k in ("lr", "weight_decay")])

        def closure() -> torch.Tensor:
            optimizer.zero_grad(set_to_none=True)
            loss = self.training_loss(x, y)
            check_finite_loss(loss)
            loss.backward()
            gradient_norm(self.parameters(), self._grad_clip)
            return loss

        watch = self._watch
        if watch is not None and watch.steps == 0 and watch.batch is None:
            watch.start(self.training_loss, self.model, optimizer, x, y)
        loss = optimizer.step(closure)
        if watch is not None:
            watch.step(self.training_loss, self.model)
        return loss

    def on_fit_end(self) -> None:
        """Check that an IVON holds the posterior of every trainable parameter."""
        if self._optimizer is None:
            raise NotFittedError(
                "no IVON holds this model's posterior: train with opt = "
                "bm.configure_optimizer(lr, weight_decay) in your own loop, or wrap with "
                "bayesify(net, 'ivon', optimizer=opt) for a network trained with bf.IVON")
        missing = self._missing_from_optimizer()
        if missing:
            raise NotFittedError(
                f"the IVON does not hold {', '.join(map(repr, missing))}, so they were not "
                "trained; make the optimizer with bm.configure_optimizer(lr, weight_decay), "
                "or call .fit(train) to continue with this one")
        self._revoked = False

    # ----------------------------------------------------------------- checkpoints

    def get_extra_state(self) -> dict[str, Any]:
        """The optimizer's state (the posterior), with its options and which parameter
        each of its entries is, so ``load`` can rebuild it."""
        if self._optimizer is None:
            return {}
        names = {id(p): n for n, p in self.named_parameters()}
        options = dict(self.options)
        if options["hess_init"] is None:   # wrapped a user's IVON: its own h₀
            options["hess_init"] = self._optimizer.param_groups[0]["hess_init"]
        return {"optimizer": self._optimizer.state_dict(), "options": options,
                "param_names": [names[id(p)] for p in self._optimizer.params]}

    def _optimizer_for_state(self, extra: Mapping[str, Any]) -> IVON:
        """The IVON a saved state loads into: the current one when its parameters are
        the same, in the same groups, else a new one (not attached)."""
        params = dict(self.named_parameters())
        names, groups, start = extra["param_names"], [], 0
        for group in extra["optimizer"]["param_groups"]:
            groups.append([params[n] for n in names[start:start + len(group["params"])]])
            start += len(group["params"])
        current = self._optimizer
        if current is not None and [g["params"] for g in current.param_groups] == groups:
            return current
        options = {**extra["options"], "ess": extra["options"]["ess"] or 1.0}
        return IVON([{"params": g} for g in groups], lr=self.default_lr, **options)

    def _check_extra_state(self, state_dict: dict[str, Any]) -> None:
        """Check the saved IVON state against this model before anything is loaded."""
        extra = state_dict.get("_extra_state")
        if not isinstance(extra, Mapping) or not {"optimizer", "options",
                                                  "param_names"} <= set(extra):
            raise CheckpointError("the checkpoint holds no IVON posterior (its extra state "
                                  "lacks 'optimizer', 'options' or 'param_names'); it was "
                                  "not written by the ivon method's save")
        try:
            options, names = extra["options"], extra["param_names"]
            if not isinstance(options, Mapping) or sorted(options) != sorted(_OPTIONS):
                raise InputError(f"its options are {sorted(options)}, expected "
                                 f"{sorted(_OPTIONS)}")
            _check_options(options)
            own = dict(self.named_parameters())
            unknown = [n for n in names if n not in own]
            if unknown:
                raise InputError(f"it holds parameters {unknown[:5]} that this model lacks")
            groups = extra["optimizer"].get("param_groups")
            if not isinstance(groups, list) or sum(len(g.get("params", ())) for g in groups
                                                   ) != len(names):
                raise InputError("its param groups do not list its parameters")
            check_state_dict(extra["optimizer"], self._optimizer_for_state(extra).param_groups)
        except (InputError, AttributeError, TypeError, KeyError) as exc:
            raise CheckpointError(f"the checkpoint's IVON state does not fit this model: "
                                  f"{exc}") from None

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if not state:
            return
        optimizer = self._optimizer_for_state(state)
        optimizer.load_state_dict(state["optimizer"])
        self.options.update(state["options"])
        self._optimizer = optimizer
        self._revoked = False
