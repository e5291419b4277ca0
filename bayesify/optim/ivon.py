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
loss and calls ``backward``. Each ``sampled_params`` block is one Monte Carlo sample and
``step()`` averages the blocks. To accumulate gradients over micro-batches, run them all
inside one block (one sample of θ for the whole batch)::

    with optimizer.sampled_params(train=True):
        optimizer.zero_grad()
        for xb, yb in micro_batches:
            (loss_fn(model(xb), yb) / k).backward()
    optimizer.step()

Spreading the micro-batches over several blocks without zeroing the gradients in each
(the usual recipe for Adam) would mix earlier samples' gradients into later ones; it is
detected and raises an error that shows the recipe above.

The math is in :mod:`bayesify.optim.ivon_functional`; this class holds the state,
draws the samples and collects their statistics. A sample that fails (its block
raises) discards the statistics pending for the step, so nothing half-collected is
averaged into the next one.

Memory: the persistent state is ``momentum`` and ``hess`` per parameter (float32 for
bfloat16/float16 weights, whose 8-bit mantissa would round β₂ = 0.99999 to 1 and
freeze h). Inside a block one more copy holds the means, to write them back bit for
bit; from the block's exit to ``step()`` the summed statistics (``grad_sum``,
``hess_sum``) are two more. The peak, at the exit, is 5x the weights' size.

Randomness: the noise comes from the optimizer's own generators (one per device),
seeded from ``seed``, or from one draw of torch's global generator when ``seed`` is
None, and offset by the rank under ``torch.distributed`` so each rank samples its own
noise. Their states are part of ``state_dict()``, so a run resumed from a checkpoint
draws the same noise, and trains bit for bit like the uninterrupted one.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from bayesify._validation import check_positive_int
from bayesify.errors import InputError
from bayesify.optim.ivon_checks import (
    check_group,
    check_state_dict,
    check_unscaled_in_block,
    owned_state,
    restore_generators,
    stale_gradients,
)
from bayesify.optim.ivon_functional import (
    add_noise_,
    add_to_pending,
    all_reduce_mean_,
    amp_unscale_,
    buckets,
    flat_views,
    hessian_update,
    ivon_mean_update,
    ivon_update_,
    posterior_noise,
    price_hessian,
    sample_statistics,
    state_dtype,
)

__all__ = [
    "IVON",
    "hessian_update",
    "ivon_mean_update",
    "price_hessian",
]

_SEED_RANGE = 2**62
_PENDING = ("grad_sum", "hess_sum", "count")


class IVON(torch.optim.Optimizer):
    """Improved Variational Online Newton: Adam's drop-in with a Gaussian posterior.

    Args:
        params: parameters or param groups; a group may override ``lr``, ``ess``,
            ``weight_decay`` and the other hyperparameters below.
        lr: learning rate (> 0). Schedulers change it as for any optimizer (down to 0).
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

    State per parameter: ``momentum`` g, ``hess`` h and the ``step`` count t, in float32
    for bfloat16/float16 weights. Parameters that get no gradient in a step keep their
    mean and state unchanged.

    Mixed precision: ``torch.autocast`` works as for any optimizer. With a
    ``torch.amp.GradScaler``, call ``scaler.scale(loss).backward()`` inside each block,
    then ``scaler.step(optimizer)``: it unscales the collected statistics and skips the
    step on inf/NaN (the scaler's, or in a sum over samples). ``scaler.unscale_`` (to
    clip) belongs inside the block after ``backward``; after the block it raises.
    """

    _step_supports_amp_scaling = True

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
        check_group({**defaults, "params": []}, zero_lr=False)
        self.mc_samples = check_positive_int(mc_samples, "mc_samples")
        self.sync = bool(sync)
        if seed is None:
            seed = int(torch.randint(_SEED_RANGE, ()))
        self.seed = check_positive_int(seed, "seed", minimum=0)
        self._generators: dict[str, torch.Generator] = {}
        self._active = False
        # Whether zero_grad() ran since the last sampled block (see sampled_params).
        self._zeroed = False
        self._collected: tuple[torch.Tensor, torch.Tensor] | None = None
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        check_group(self.param_groups[-1])

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients (as ``torch.optim.Optimizer.zero_grad``)."""
        super().zero_grad(set_to_none=set_to_none)
        self._zeroed = True

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
            dtype = state_dtype(p)
            state["momentum"] = torch.zeros_like(p, dtype=dtype,
                                                 memory_format=torch.preserve_format)
            state["hess"] = torch.full_like(p, group["hess_init"], dtype=dtype,
                                            memory_format=torch.preserve_format)
            state["step"] = 0
        return state

    def _draw(self, params: list[torch.Tensor], group: dict[str, Any],
              generator: torch.Generator | None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """ε and √(h + δ) for one bucket (see :func:`posterior_noise`)."""
        if generator is None:
            generator = self._generator(params[0].device)
        hess = [self._state_of(p, group)["hess"] for p in params]
        return posterior_noise(params, hess, group["weight_decay"], generator)

    @contextlib.contextmanager
    def sampled_params(self, train: bool = True,
                       generator: torch.Generator | None = None) -> Iterator[None]:
        """Replace every parameter by a posterior sample θ = m + σ⊙ε for the body.

        Args:
            train: on a normal exit, add the gradients the body computed (at θ) to the
                statistics the next ``step()`` uses. A gradient left over from before
                the block and untouched by it is ignored; one that the body added to
                without zeroing it first raises :class:`~bayesify.errors.InputError`
                (gradient accumulation across blocks; see the module docstring).
            generator: draw ε from this generator (on the parameters' device) instead
                of the optimizer's own.

        The means are written back exactly on exit, also when the body raises; then
        this step's pending statistics are discarded.
        """
        if self._active:
            raise InputError("sampled_params() is already active; do not nest it")
        self._active = True
        saved = []
        entry = []
        completed = False
        try:
            if train:
                entry = [(p, weakref.ref(p.grad), p.grad._version)
                         for p in self.params if p.grad is not None]
            with torch.no_grad():
                for group in self.param_groups:
                    for params in buckets(group["params"]).values():
                        eps, root = self._draw(params, group, generator)
                        means = flat_views(params, params[0].dtype)
                        # Saved before the first parameter changes, so a failure below
                        # still restores everything.
                        torch._foreach_copy_(means, params)
                        saved.append((group, params, means))
                        add_noise_(params, eps, root, 1.0 / math.sqrt(group["ess"]))
                        del eps, root   # only the means stay alive during the body
            yield
            completed = True
        finally:
            try:
                if train and completed:
                    stale = stale_gradients(entry, zeroed=self._zeroed)
                    with torch.no_grad():
                        for group, params, means in saved:
                            self._accumulate(group, params, means, stale)
                    # The smallest collected gradient, to recognize a late unscale_.
                    held = [p for p in self.params if p.grad is not None]
                    small = min(held, key=torch.Tensor.numel) if held else None
                    self._collected = None if small is None else (small, small.grad)
                elif train:
                    self._discard_pending()
            except BaseException:
                self._discard_pending()
                raise
            finally:
                with torch.no_grad():
                    for _, params, means in saved:
                        torch._foreach_copy_(params, means)
                self._active = False
                if train:
                    self._zeroed = False

    def _accumulate(self, group: dict[str, Any], params: list[torch.Tensor],
                    means: list[torch.Tensor], stale: set[int]) -> None:
        """Add this sample's ĝ and ĝ⊙(θ − m) (or ĝ²) to the pending sums."""
        pairs = [(p, m) for p, m in zip(params, means, strict=True)
                 if p.grad is not None and id(p) not in stale]
        if pairs:
            grads, second = sample_statistics([p for p, _ in pairs], [m for _, m in pairs],
                                              group["hess_approx"])
            add_to_pending([self.state[p] for p, _ in pairs], grads, second)

    def _discard_pending(self) -> None:
        """Drop the statistics collected for the next step (after a failed sample)."""
        for state in self.state.values():
            for key in _PENDING:
                state.pop(key, None)

    # -------------------------------------------------------------------- update

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Update momentum, Hessian and means from the sampled statistics.

        Args:
            closure: optional; zeroes the gradients, computes the loss and calls
                ``backward()``. It is run ``mc_samples`` times, each at a fresh
                sample inside ``sampled_params(train=True)``. If it raises, the
                samples of this step are discarded and the means are left as they were.

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
            work.extend((group, bucket) for bucket in buckets(params).values())
        if not work:
            raise InputError(
                "step() found no sampled gradient: call backward() inside `with "
                "optimizer.sampled_params(train=True):` first, or pass a closure")
        if not self._unscale(work):
            return loss
        for _, params in work:
            states = [self.state[p] for p in params]
            counts = [float(s.pop("count")) for s in states]
            if any(c != 1.0 for c in counts):
                torch._foreach_div_([s["grad_sum"] for s in states], counts)
                torch._foreach_div_([s["hess_sum"] for s in states], counts)
        if self.sync and dist.is_available() and dist.is_initialized():
            all_reduce_mean_([self.state[p][key] for _, params in work for p in params
                              for key in ("grad_sum", "hess_sum")])
        for group, params in work:
            states = [self.state[p] for p in params]
            for s in states:
                s["step"] += 1
            ivon_update_(
                params, [s["momentum"] for s in states], [s["hess"] for s in states],
                [s.pop("grad_sum") for s in states], [s.pop("hess_sum") for s in states],
                [s["step"] for s in states], lr=group["lr"], ess=group["ess"],
                beta1=group["beta1"], beta2=group["beta2"],
                weight_decay=group["weight_decay"], hess_init=group["hess_init"],
                hess_approx=group["hess_approx"], clip_radius=group["clip_radius"],
                rescale_lr=group["rescale_lr"])
        return loss

    def _unscale(self, work: list[tuple[dict[str, Any], list[torch.Tensor]]]) -> bool:
        """Undo a GradScaler's loss scale (see :func:`amp_unscale_`); False, with the
        pending sums dropped, when the step is to be skipped."""
        scale, found = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        try:
            if scale is None and found is not None:      # the user called unscale_
                check_unscaled_in_block(self._collected, self.state)
            ok = amp_unscale_([(g, [self.state[p] for p in params]) for g, params in work],
                              scale, found)
        except BaseException:
            self._discard_pending()
            raise
        if not ok:
            self._discard_pending()
        return ok

    # ----------------------------------------------------------------- posterior

    @property
    def params(self) -> list[torch.Tensor]:
        """Every parameter, in param-group order (the order of the accessors below)."""
        return [p for group in self.param_groups for p in group["params"]]

    @property
    def has_posterior(self) -> bool:
        """Whether every parameter has Hessian state (after a sample or a loaded state)."""
        return all("hess" in self.state.get(p, ()) for p in self.params)

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
                    torch.full_like(p, group["hess_init"], dtype=state_dtype(p))
                std = ((hess + group["weight_decay"]) * group["ess"]).rsqrt()
                stds.append(std.to(p.dtype))
        return stds

    @torch.no_grad()
    def sample(self, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """One posterior sample m + σ⊙ε per parameter, leaving the parameters untouched.

        Args:
            generator: source of ε (the optimizer's own generators when ``None``).

        Returns:
            One tensor per parameter (the order of :attr:`params`), in its dtype.
        """
        draws: dict[torch.Tensor, torch.Tensor] = {}
        for group in self.param_groups:
            for params in buckets(group["params"]).values():
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
        """Load a state written by :meth:`state_dict` of an IVON over the same params.

        Everything is checked first; a bad state raises InputError and changes nothing.
        """
        check_state_dict(state_dict, self.param_groups)
        extra = state_dict.get("ivon", {})
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "ivon"})
        # torch casts the state to each parameter's dtype and may alias the given
        # tensors; keep float32 state for low-precision weights, and own copies.
        index = dict(enumerate(self.params))
        for key, saved in state_dict["state"].items():
            self.state[index[int(key)]] = owned_state(saved, index[int(key)])
        if "seed" in extra:
            self.seed = int(extra["seed"])
        self._generators = restore_generators(extra.get("generators", {}))
