"""IVON, the improved variational online Newton optimizer (Shen et al., ICML 2024).

A drop-in replacement for Adam that learns a mean-field Gaussian posterior
q(θ) = N(m, diag(σ²)) over the weights while it trains. The mean m is the parameter
itself; the posterior precision is λ(h + δ), with λ the effective sample size (``ess``),
h an online estimate of the diagonal Hessian and δ the weight decay (prior precision
per datum). One training step::

    for _ in range(mc_samples):
        with optimizer.sampled_params(train=True):   # θ = m + σ⊙ε
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()          # ĝ at θ
    optimizer.step()                                 # update g, h, m

or ``optimizer.step(closure)`` with a closure that zeroes the gradients, computes the
loss and calls ``backward``.

Memory: the persistent state is two tensors per parameter, ``momentum`` and ``hess``
(kept in float32 for bfloat16/float16 weights, whose 8-bit mantissa would round
β₂ = 0.99999 to 1 and freeze h). While a sample is drawn, one extra copy of each
parameter holds the means, so they can be written back bit for bit; it is freed when
the context exits. Between the exit and ``step()`` the summed statistics (the
gradient and ĝ⊙(θ − m), keys ``grad_sum``/``hess_sum``) are two more tensors per
parameter, freed by ``step()``. The optimizer's peak is at the context's exit, where
momentum, hess, the means and the two statistics coexist (5x the weights' size).

Randomness: the noise comes from the optimizer's own generators (one per device),
seeded from ``seed``, or from one draw of torch's global generator when ``seed`` is
None, and offset by the rank under ``torch.distributed`` so each rank samples its own
noise. Their states are part of ``state_dict()``, so a run resumed from a checkpoint
draws the same noise, and trains bit for bit like the uninterrupted one.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from bayesify._validation import check_choice, check_positive_float, check_positive_int
from bayesify.errors import InputError

__all__ = [
    "IVON",
    "hessian_update",
    "ivon_mean_update",
    "price_hessian",
]

HESS_APPROXES = ("price", "gradsq")
_LOW_PRECISION = (torch.float16, torch.bfloat16)
_SEED_RANGE = 2**62


# ------------------------------------------------------------------------- the math


def price_hessian(grad_noise: torch.Tensor, hess: torch.Tensor, ess: float,
                  weight_decay: float) -> torch.Tensor:
    """Price's theorem estimate ĥ = ĝ⊙(θ − m)/σ² with 1/σ² = λ(h + δ).

    Args:
        grad_noise: the averaged ĝ⊙(θ − m) [any shape].
        hess: h, the current Hessian estimate (same shape).
        ess, weight_decay: λ and δ.
    """
    return grad_noise * (hess + weight_decay) * ess


def hessian_update(hess: torch.Tensor, hess_hat: torch.Tensor, beta2: float,
                   weight_decay: float) -> torch.Tensor:
    """h ← β₂h + (1−β₂)ĥ + ½(1−β₂)²(h − ĥ)²/(h + δ).

    The last term keeps h + δ > 0 whatever ĥ is: with a = h + δ, b = ĥ + δ and
    r = 1 − β₂, the new h + δ equals a·½[(1 − r(a−b)/a)² + 1].
    """
    r = 1.0 - beta2
    return (beta2 * hess + r * hess_hat
            + 0.5 * r * r * (hess - hess_hat).square() / (hess + weight_decay))


def ivon_mean_update(mean: torch.Tensor, momentum: torch.Tensor, hess: torch.Tensor, *,
                     lr: float, step: int, beta1: float, weight_decay: float,
                     hess_init: float, clip_radius: float = math.inf,
                     rescale_lr: bool = True) -> torch.Tensor:
    """m ← m − α·clip((g/(1−β₁ᵗ) + δm)/(h + δ), ±ξ) with α = lr·(h₀ + δ) (or lr).

    ``momentum`` is g after this step's update and ``hess`` the updated h.
    """
    alpha = lr * (hess_init + weight_decay) if rescale_lr else lr
    direction = (momentum / (1.0 - beta1**step) + weight_decay * mean) / (hess + weight_decay)
    return mean - alpha * direction.clamp(-clip_radius, clip_radius)


# ------------------------------------------------------------------ the optimizer


def _check_group(group: dict[str, Any]) -> None:
    """Validate one param group's hyperparameters (the defaults or a user's overrides)."""
    group["lr"] = check_positive_float(group["lr"], "lr")
    group["ess"] = check_positive_float(group["ess"], "ess")
    group["hess_init"] = check_positive_float(group["hess_init"], "hess_init")
    group["weight_decay"] = check_positive_float(group["weight_decay"], "weight_decay",
                                                 allow_zero=True)
    group["clip_radius"] = check_positive_float(group["clip_radius"], "clip_radius",
                                                allow_inf=True)
    for name in ("beta1", "beta2"):
        value = group[name]
        if (isinstance(value, bool) or not isinstance(value, int | float)
                or not 0.0 <= value < 1.0):
            raise InputError(f"`{name}` must lie in [0, 1), got {value!r}")
        group[name] = float(value)
    check_choice(group["hess_approx"], "hess_approx", HESS_APPROXES)
    group["rescale_lr"] = bool(group["rescale_lr"])
    for p in group["params"]:
        if not p.is_floating_point():
            raise InputError(f"`params` must be floating point tensors, got dtype {p.dtype}")


def _state_dtype(param: torch.Tensor) -> torch.dtype:
    return torch.float32 if param.dtype in _LOW_PRECISION else param.dtype


def _buckets(params: Iterable[torch.Tensor]) -> dict[tuple, list[torch.Tensor]]:
    """Parameters grouped by (device, dtype), the unit one foreach call can handle."""
    buckets: dict[tuple, list[torch.Tensor]] = {}
    for p in params:
        buckets.setdefault((p.device, p.dtype), []).append(p)
    return buckets


def _as(tensors: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    return tensors if tensors[0].dtype == dtype else [t.to(dtype) for t in tensors]


def _flat_views(like: list[torch.Tensor], dtype: torch.dtype,
                fill: Callable[[torch.Tensor], Any] | None = None) -> list[torch.Tensor]:
    """One buffer shaped as the tensors of ``like``, returned as views (one allocation)."""
    flat = torch.empty(sum(t.numel() for t in like), dtype=dtype, device=like[0].device)
    if fill is not None:
        fill(flat)
    return [v.view_as(t) for v, t in zip(flat.split([t.numel() for t in like]), like,
                                         strict=True)]


class IVON(torch.optim.Optimizer):
    """Improved Variational Online Newton: Adam's drop-in with a Gaussian posterior.

    Args:
        params: parameters or param groups; a group may override ``lr``, ``ess``,
            ``weight_decay`` and the other hyperparameters below.
        lr: learning rate (> 0). Schedulers change it as for any optimizer.
        ess: λ, the effective sample size, normally the training-set size N.
        hess_init: h₀ > 0, the initial Hessian estimate; sets the initial posterior
            std 1/√(λ(h₀ + δ)).
        beta1: momentum decay in [0, 1).
        beta2: Hessian decay in [0, 1); the default 0.99999 suits long runs, a few
            thousand steps need a smaller value for h to move.
        weight_decay: δ ≥ 0, the prior precision per datum.
        mc_samples: training samples per step that ``step(closure)`` draws.
        hess_approx: ``"price"`` (ĝ⊙(θ − m)/σ², unbiased) or ``"gradsq"`` (λ·ĝ²,
            the scaling of the reference implementation).
        clip_radius: ξ > 0, elementwise clip of the preconditioned step (∞: none).
        rescale_lr: use α = lr·(h₀ + δ), so the first steps match SGD with ``lr``.
        sync: all-reduce the sampled statistics across ``torch.distributed`` ranks in
            ``step()`` (each rank samples its own noise; means stay identical).
        seed: seed of the noise generators (one draw of torch's global generator when
            ``None``).

    State per parameter: ``momentum`` g, ``hess`` h and the ``step`` count t.
    Parameters that get no gradient in a step keep their mean and state unchanged.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float,
        ess: float,
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
    ):
        defaults = dict(lr=lr, ess=ess, hess_init=hess_init, beta1=beta1, beta2=beta2,
                        weight_decay=weight_decay, hess_approx=hess_approx,
                        clip_radius=clip_radius, rescale_lr=rescale_lr)
        _check_group({**defaults, "params": []})
        self.mc_samples = check_positive_int(mc_samples, "mc_samples")
        self.sync = bool(sync)
        if seed is None:
            seed = int(torch.randint(_SEED_RANGE, ()))
        self.seed = check_positive_int(seed, "seed", minimum=0)
        self._generators: dict[str, torch.Generator] = {}
        self._active = False
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        _check_group(self.param_groups[-1])

    # ------------------------------------------------------------------ sampling

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
            generator = torch.Generator(device=device)
            generator.manual_seed((self.seed + 1_000_003 * rank) % _SEED_RANGE)
            self._generators[key] = generator
        return self._generators[key]

    def _state_of(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
        state = self.state[p]
        if "hess" not in state:
            dtype = _state_dtype(p)
            state["momentum"] = torch.zeros_like(p, dtype=dtype,
                                                 memory_format=torch.preserve_format)
            state["hess"] = torch.full_like(p, group["hess_init"], dtype=dtype,
                                            memory_format=torch.preserve_format)
            state["step"] = 0
        return state

    def _draw(self, params: list[torch.Tensor], group: dict[str, Any],
              generator: torch.Generator | None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """ε ~ N(0, I) and √(h + δ) for one bucket, in the state dtype; σ⊙ε = ε/√(h + δ)/√λ.

        ε is drawn once for the whole bucket (one call, views per parameter).
        """
        dtype = _state_dtype(params[0])
        if generator is None:
            generator = self._generator(params[0].device)
        eps = _flat_views(params, dtype, lambda flat: flat.normal_(generator=generator))
        root = torch._foreach_add([self._state_of(p, group)["hess"] for p in params],
                                  group["weight_decay"])
        torch._foreach_sqrt_(root)
        return eps, root

    @contextlib.contextmanager
    def sampled_params(self, train: bool = True,
                       generator: torch.Generator | None = None) -> Iterator[None]:
        """Replace every parameter by a posterior sample θ = m + σ⊙ε for the body.

        Args:
            train: on a normal exit, add the gradients found in ``p.grad`` (computed
                at θ inside the body) to the statistics the next ``step()`` uses.
            generator: draw ε from this generator (on the parameters' device) instead
                of the optimizer's own.

        The means are written back exactly on exit, also when the body raises (then
        no statistics are kept).
        """
        if self._active:
            raise InputError("sampled_params() is already active; do not nest it")
        self._active = True
        saved = []
        completed = False
        try:
            with torch.no_grad():
                for group in self.param_groups:
                    for params in _buckets(group["params"]).values():
                        eps, root = self._draw(params, group, generator)
                        means = _flat_views(params, params[0].dtype)
                        # Saved before the first parameter changes, so a failure below
                        # still restores everything.
                        torch._foreach_copy_(means, params)
                        saved.append((group, params, means))
                        scale = 1.0 / math.sqrt(group["ess"])
                        if eps[0].dtype == params[0].dtype:
                            torch._foreach_addcdiv_(params, eps, root, value=scale)
                        else:
                            torch._foreach_div_(eps, root)
                            torch._foreach_add_(params, _as(eps, params[0].dtype),
                                                alpha=scale)
                        del eps, root   # only the means stay alive during the body
            yield
            completed = True
        finally:
            try:
                if completed and train:
                    with torch.no_grad():
                        for group, params, means in saved:
                            self._accumulate(group, params, means)
            finally:
                with torch.no_grad():
                    for _, params, means in saved:
                        torch._foreach_copy_(params, means)
                self._active = False

    def _accumulate(self, group: dict[str, Any], params: list[torch.Tensor],
                    means: list[torch.Tensor]) -> None:
        """Add this sample's ĝ and ĝ⊙(θ − m) (or ĝ²) to the pending sums."""
        pairs = [(p, m) for p, m in zip(params, means, strict=True) if p.grad is not None]
        if not pairs:
            return
        params, means = [p for p, _ in pairs], [m for _, m in pairs]
        dtype = _state_dtype(params[0])
        grads = [p.grad for p in params]
        if grads[0].dtype == dtype:
            grads = torch._foreach_mul(grads, 1.0)  # a copy: the user may zero p.grad
        else:
            grads = _as(grads, dtype)
        if group["hess_approx"] == "price":
            torch._foreach_sub_(params, means)     # the parameters hold θ − m until restored
            second = torch._foreach_mul(grads, _as(params, dtype))
        else:
            second = torch._foreach_mul(grads, grads)
        states = [self.state[p] for p in params]
        pending = ["grad_sum" in s for s in states]
        if all(pending):
            torch._foreach_add_([s["grad_sum"] for s in states], grads)
            torch._foreach_add_([s["hess_sum"] for s in states], second)
        for s, g, h, seen in zip(states, grads, second, pending, strict=True):
            if not seen:
                s["grad_sum"], s["hess_sum"], s["count"] = g, h, 1
            elif all(pending):
                s["count"] += 1
            else:   # some parameters got no gradient in an earlier sample of this step
                s["grad_sum"].add_(g)
                s["hess_sum"].add_(h)
                s["count"] += 1

    # -------------------------------------------------------------------- update

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Update momentum, Hessian and means from the sampled statistics.

        Args:
            closure: optional; zeroes the gradients, computes the loss and calls
                ``backward()``. It is run ``mc_samples`` times, each at a fresh
                sample inside ``sampled_params(train=True)``.

        Returns:
            The closure's loss averaged over the samples (``None`` without closure).
        """
        if self._active:
            raise InputError("step() was called inside sampled_params(); call it after "
                             "the block, when the means are back in place")
        loss = None
        if closure is not None:
            losses = []
            for _ in range(self.mc_samples):
                with self.sampled_params(train=True), torch.enable_grad():
                    losses.append(closure())
            loss = sum(losses) / len(losses)
            if isinstance(loss, torch.Tensor):
                loss = loss.detach()
        work = []
        for group in self.param_groups:
            params = [p for p in group["params"] if "grad_sum" in self.state.get(p, ())]
            work.extend((group, bucket) for bucket in _buckets(params).values())
        if not work:
            raise InputError(
                "step() found no sampled gradient: call backward() inside `with "
                "optimizer.sampled_params(train=True):` first, or pass a closure")
        for _, params in work:
            states = [self.state[p] for p in params]
            counts = [float(s.pop("count")) for s in states]
            if any(c != 1.0 for c in counts):
                torch._foreach_div_([s["grad_sum"] for s in states], counts)
                torch._foreach_div_([s["hess_sum"] for s in states], counts)
        if self.sync and dist.is_available() and dist.is_initialized():
            self._all_reduce([self.state[p][key] for _, params in work for p in params
                              for key in ("grad_sum", "hess_sum")])
        for group, params in work:
            self._update(group, params)
        return loss

    @staticmethod
    def _all_reduce(tensors: list[torch.Tensor]) -> None:
        """Average ``tensors`` in place over the ranks, one flat all-reduce per bucket."""
        world = dist.get_world_size()
        for bucket in _buckets(tensors).values():
            flat = torch.cat([t.reshape(-1) for t in bucket])
            dist.all_reduce(flat)
            flat.div_(world)
            views = [v.view_as(t) for v, t in zip(flat.split([t.numel() for t in bucket]),
                                                  bucket, strict=True)]
            torch._foreach_copy_(bucket, views)

    def _update(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        """One IVON step for parameters of one group, device and dtype (foreach ops)."""
        states = [self.state[p] for p in params]
        grad = [s.pop("grad_sum") for s in states]      # averages by now
        hess_hat = [s.pop("hess_sum") for s in states]
        hess = [s["hess"] for s in states]
        momentum = [s["momentum"] for s in states]
        lam, wd = group["ess"], group["weight_decay"]
        beta1, beta2 = group["beta1"], group["beta2"]
        for s in states:
            s["step"] += 1

        # Each line below is one pass over the bucket; the order keeps the number of
        # passes (the cost next to Adam) and of temporary tensors small.
        shifted = torch._foreach_add(hess, wd)          # h + δ before the update
        if group["hess_approx"] == "price":
            torch._foreach_mul_(hess_hat, shifted)      # ĥ = ĝ⊙(θ − m)·λ(h + δ)
        torch._foreach_mul_(hess_hat, lam)

        torch._foreach_lerp_(momentum, grad, 1.0 - beta1)

        r = 1.0 - beta2
        del grad
        square = torch._foreach_sub(hess, hess_hat)     # (h − ĥ)²
        torch._foreach_mul_(square, square)
        torch._foreach_lerp_(hess, hess_hat, r)         # β₂h + (1−β₂)ĥ
        torch._foreach_addcdiv_(hess, square, shifted, value=0.5 * r * r)
        del square, hess_hat, shifted

        # m ← m − α·clip((g/(1−β₁ᵗ) + δm)/(h + δ)); with one t and no clip, the debias
        # factor moves into the scalar: (g + δ(1−β₁ᵗ)m)/(h + δ) · α/(1−β₁ᵗ).
        debias = [1.0 - beta1 ** s["step"] for s in states]
        alpha = group["lr"] * (group["hess_init"] + wd) if group["rescale_lr"] else group["lr"]
        dtype = hess[0].dtype
        shifted = torch._foreach_add(hess, wd)          # the new h + δ
        fast = (len(set(debias)) == 1 and math.isinf(group["clip_radius"])
                and params[0].dtype == dtype)
        if fast:
            direction = torch._foreach_add(momentum, params, alpha=wd * debias[0]) if wd \
                else momentum
            torch._foreach_addcdiv_(params, direction, shifted, value=-alpha / debias[0])
            return
        direction = torch._foreach_div(momentum, debias)
        if wd:
            torch._foreach_add_(direction, _as(params, dtype), alpha=wd)
        torch._foreach_div_(direction, shifted)
        if not math.isinf(group["clip_radius"]):
            torch._foreach_clamp_min_(direction, -group["clip_radius"])
            torch._foreach_clamp_max_(direction, group["clip_radius"])
        torch._foreach_add_(params, _as(direction, params[0].dtype), alpha=-alpha)

    # ----------------------------------------------------------------- posterior

    @property
    def params(self) -> list[torch.Tensor]:
        """Every parameter, in param-group order (the order of the accessors below)."""
        return [p for group in self.param_groups for p in group["params"]]

    @torch.no_grad()
    def posterior_mean(self) -> list[torch.Tensor]:
        """The posterior means m (copies of the parameters), one tensor per parameter."""
        return [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def posterior_std(self) -> list[torch.Tensor]:
        """σ = 1/√(λ(h + δ)) per parameter (h = h₀ before the first sample)."""
        stds = []
        for group in self.param_groups:
            for p in group["params"]:
                hess = self.state[p]["hess"] if "hess" in self.state.get(p, ()) else \
                    torch.full_like(p, group["hess_init"], dtype=_state_dtype(p))
                std = ((hess + group["weight_decay"]) * group["ess"]).rsqrt()
                stds.append(std.to(p.dtype))
        return stds

    @torch.no_grad()
    def sample(self, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """One posterior sample m + σ⊙ε per parameter, leaving the parameters untouched.

        Args:
            generator: source of ε (the optimizer's own generators when ``None``).
        """
        draws: dict[torch.Tensor, torch.Tensor] = {}
        for group in self.param_groups:
            for params in _buckets(group["params"]).values():
                eps, root = self._draw(params, group, generator)
                torch._foreach_div_(eps, root)
                torch._foreach_mul_(eps, 1.0 / math.sqrt(group["ess"]))
                for p, e in zip(params, eps, strict=True):
                    draws[p] = (p.detach().to(e.dtype) + e).to(p.dtype)
        return [draws[p] for p in self.params]

    # --------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state_dict plus the noise generators' seed and states."""
        state = super().state_dict()
        state["ivon"] = {
            "seed": self.seed,
            "generators": {key: g.get_state() for key, g in self._generators.items()},
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state written by :meth:`state_dict` of an IVON over the same params."""
        _check_state_dict(state_dict, self.param_groups)
        extra = state_dict.get("ivon", {})
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "ivon"})
        # torch casts the state to each parameter's dtype and may alias the given
        # tensors; keep float32 state for low-precision weights, and own copies.
        index = dict(enumerate(self.params))
        for key, saved in state_dict["state"].items():
            p = index[int(key)]
            self.state[p] = {
                name: value.to(device=p.device, dtype=_state_dtype(p), copy=True)
                if isinstance(value, torch.Tensor) and value.is_floating_point() else value
                for name, value in saved.items()
            }
        for group in self.param_groups:
            _check_group(group)
        if "seed" in extra:
            self.seed = int(extra["seed"])
        self._generators = {}
        for key, generator_state in extra.get("generators", {}).items():
            device = torch.device(key)
            if device.type != "cpu" and not getattr(torch, device.type).is_available():
                continue        # drawn afresh from the seed on the devices that exist here
            generator = torch.Generator(device=device)
            generator.set_state(generator_state)
            self._generators[key] = generator


_GROUP_KEYS = ("lr", "ess", "hess_init", "beta1", "beta2", "weight_decay", "hess_approx",
               "clip_radius", "rescale_lr", "params")
_STATE_KEYS = ("momentum", "hess", "grad_sum", "hess_sum")


def _check_state_dict(state_dict: Any, groups: list[dict[str, Any]]) -> None:
    """Raise InputError unless ``state_dict`` is an IVON state that fits ``groups``."""
    if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
        raise InputError("`state_dict` must be a dict with 'state' and 'param_groups' from "
                         f"IVON.state_dict(), got {type(state_dict).__name__}")
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(groups):
        raise InputError(f"`state_dict` has {len(saved_groups)} param group(s), this "
                         f"optimizer has {len(groups)}")
    shapes = {}
    for i, (saved, own) in enumerate(zip(saved_groups, groups, strict=True)):
        missing = [k for k in _GROUP_KEYS if k not in saved]
        if missing:
            raise InputError(f"`state_dict` param group {i} lacks {', '.join(missing)}; "
                             "is it from another optimizer than IVON?")
        if len(saved["params"]) != len(own["params"]):
            raise InputError(f"`state_dict` param group {i} has {len(saved['params'])} "
                             f"parameter(s), this optimizer's has {len(own['params'])}")
        shapes.update(zip(saved["params"], (p.shape for p in own["params"]), strict=True))
    for key, state in state_dict["state"].items():
        if key not in shapes:
            raise InputError(f"`state_dict` holds state for parameter {key!r}, which no "
                             "param group lists")
        for name in _STATE_KEYS:
            value = state.get(name)
            if value is not None and tuple(value.shape) != tuple(shapes[key]):
                raise InputError(
                    f"`state_dict` entry {name!r} of parameter {key} has shape "
                    f"{tuple(value.shape)}, the parameter has {tuple(shapes[key])}")
        if "hess" not in state or "momentum" not in state:
            raise InputError(f"`state_dict` state of parameter {key} lacks 'momentum' or "
                             "'hess'; is it from another optimizer than IVON?")


# The registry imports this module for method="ivon"; the method class lives next door.
from bayesify.inference.ivon_method import IVONModel  # noqa: E402, F401
