"""Mean-field Gaussian ``Linear`` and ``Conv2d`` layers with a mask of active weights.

Every weight is ``N(mu, sigma^2)`` with ``sigma = softplus(rho)``; the bias is Gaussian
too. A boolean ``mask`` buffer marks the active weights: inactive weights are exactly
zero (their ``mu`` is kept at 0, they add nothing to the output, the KL or the
gradients), which is how sparse subspace VI keeps a fixed-size subspace. With every
weight active the layers are plain dense mean-field VI layers.

A layer's ``sampling`` mode decides what one forward pass draws:

* ``"lrt"`` (default): the local reparameterization trick. The pre-activation is
  Gaussian given the input, mean ``op(x; mu)`` and variance ``op(x^2; sigma^2)``; one
  draw per output entry, so every example sees its own weight sample at the cost of
  two deterministic passes. Low-variance gradients for training.
* ``"weights"``: one weight sample shared by the whole batch (coherent functions,
  for prediction and joint samples), drawn from the layer's ``generator``.
* ``"mean"``: the mean network.

:func:`sampling_mode` switches every layer of a model for a block and restores them.
"""

from __future__ import annotations

import abc
import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from bayesify._linalg import gaussian_kl
from bayesify._validation import check_choice, check_positive_float
from bayesify.errors import InputError

__all__ = [
    "SAMPLING_MODES",
    "BayesianConv2d",
    "BayesianLinear",
    "MeanFieldLayer",
    "inverse_softplus",
    "sampling_mode",
]

SAMPLING_MODES = ("lrt", "weights", "mean")
# Keeps the square root of the LRT variance differentiable where the variance is 0
# (an output unit with no active weight and a tiny bias sigma).
_LRT_EPS = 1e-8


def inverse_softplus(sigma: torch.Tensor) -> torch.Tensor:
    """The ``rho`` with ``softplus(rho) = sigma`` (elementwise, sigma > 0)."""
    # log(expm1(s)) overflows for large s; there softplus is the identity.
    return torch.where(sigma > 20, sigma, torch.log(torch.expm1(sigma.clamp_max(20))))


def _mean_field_kl(mu: torch.Tensor, sigma: torch.Tensor, prior_std: float) -> torch.Tensor:
    """KL( N(mu, sigma^2) || N(0, prior_std^2) ) per entry: mu, sigma [...] -> [...].

    The mean-field case of the package's one Gaussian KL,
    :func:`bayesify._linalg.gaussian_kl`, with each entry a 1-d Gaussian.
    """
    variance = sigma * sigma
    return gaussian_kl(mu[..., None], variance, torch.log(variance), prior_std ** 2)


class MeanFieldLayer(nn.Module, metaclass=abc.ABCMeta):
    """Shared state of the mean-field layers: parameters, mask, KL and sampling.

    Subclasses supply ``_op(x, weight, bias)`` (the deterministic layer) and
    ``out_dim``, the output axis of the output units.

    Args:
        weight_shape: shape of the weight tensor.
        bias: whether the layer has a (Gaussian) bias.
        prior_std: standard deviation of the N(0, prior_std^2) prior on every weight.
        init_std: the starting sigma of every weight and bias.
        device, dtype: where the parameters live.
    """

    out_dim = 1  # the output axis that indexes output units (1 for conv, -1 for linear)

    def __init__(self, weight_shape: tuple[int, ...], bias: bool, *, prior_std: float = 1.0,
                 init_std: float = 1e-3, device: torch.device | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.prior_std = check_positive_float(prior_std, "prior_std")
        init_std = check_positive_float(init_std, "init_std")
        self.weight_mu = nn.Parameter(torch.empty(weight_shape, **kw))
        self.weight_rho = nn.Parameter(torch.empty(weight_shape, **kw))
        out = weight_shape[0]
        if bias:
            self.bias_mu = nn.Parameter(torch.zeros(out, **kw))
            self.bias_rho = nn.Parameter(torch.empty(out, **kw))
        else:
            self.register_parameter("bias_mu", None)
            self.register_parameter("bias_rho", None)
        self.register_buffer("mask", torch.ones(weight_shape, dtype=torch.bool, device=device))
        nn.init.kaiming_uniform_(self.weight_mu, a=math.sqrt(5))
        self.reset_std(init_std)
        #: What a forward pass draws: "lrt", "weights" or "mean" (see the module doc).
        self.sampling = "lrt"
        #: Source of the noise in "weights" and "lrt" modes (``None``: global RNG).
        self.generator: torch.Generator | None = None
        #: When True, the next backward stores the dense gradient of the loss with
        #: respect to the effective weight ``mu * mask`` in ``dense_grad`` (all
        #: entries, inactive ones included), as SSVI's weight addition needs.
        self.record_dense_grad = False
        self.dense_grad: torch.Tensor | None = None
        #: Output entries per example and output unit seen in the last forward pass.
        self.output_positions: int | None = None

    # ---------------------------------------------------------------- parameters

    @torch.no_grad()
    def reset_std(self, init_std: float) -> None:
        """Set every active sigma (and the bias sigmas) to ``init_std``."""
        rho = float(inverse_softplus(torch.tensor(init_std, dtype=torch.float64)))
        self.weight_rho.fill_(rho).mul_(self.mask)
        if self.bias_rho is not None:
            self.bias_rho.fill_(rho)

    @property
    def weight_std(self) -> torch.Tensor:
        """Standard deviations of the weights, exactly 0 where inactive; weight shape."""
        return F.softplus(self.weight_rho) * self.mask

    @property
    def bias_std(self) -> torch.Tensor | None:
        return None if self.bias_rho is None else F.softplus(self.bias_rho)

    @property
    def num_weights(self) -> int:
        return self.mask.numel()

    @property
    def num_active(self) -> int:
        return int(self.mask.sum())

    @torch.no_grad()
    def _copy_means(self, module: nn.Module) -> MeanFieldLayer:
        self.weight_mu.copy_(module.weight)
        if module.bias is not None:
            self.bias_mu.copy_(module.bias)
        return self

    @torch.no_grad()
    def apply_mask(self) -> None:
        """Zero ``mu`` and ``rho`` of inactive weights (after an optimizer step)."""
        self.weight_mu.mul_(self.mask)
        self.weight_rho.mul_(self.mask)

    @torch.no_grad()
    def set_mask(self, mask: torch.Tensor) -> None:
        """Replace the active set (a bool tensor of the weight's shape); zeroes the rest."""
        if mask.shape != self.mask.shape or mask.dtype != torch.bool:
            raise InputError(f"`mask` must be a bool tensor of shape {tuple(self.mask.shape)}, "
                             f"got {mask.dtype} {tuple(mask.shape)}")
        self.mask.copy_(mask)
        self.apply_mask()

    def kl(self) -> torch.Tensor:
        """KL(q || prior) summed over the active weights and the bias (a scalar)."""
        mu = self.weight_mu[self.mask]
        sigma = F.softplus(self.weight_rho[self.mask])
        total = _mean_field_kl(mu, sigma, self.prior_std).sum()
        if self.bias_mu is not None:
            total = total + _mean_field_kl(self.bias_mu, self.bias_std, self.prior_std).sum()
        return total

    # ------------------------------------------------------------------- forward

    @abc.abstractmethod
    def _op(self, x: torch.Tensor, weight: torch.Tensor,
            bias: torch.Tensor | None) -> torch.Tensor:
        """The deterministic layer with the given weight and bias."""

    def _store_dense_grad(self, grad: torch.Tensor) -> None:
        self.dense_grad = grad.detach().clone()

    def _effective_mu(self) -> torch.Tensor:
        weight = self.weight_mu * self.mask
        if self.record_dense_grad and weight.requires_grad:
            weight.register_hook(self._store_dense_grad)
        return weight

    def _noise(self, like: torch.Tensor) -> torch.Tensor:
        return torch.randn(like.shape, generator=self.generator, dtype=like.dtype,
                           device=like.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_choice(self.sampling, "sampling", SAMPLING_MODES)
        weight = self._effective_mu()
        if self.sampling == "mean":
            out = self._op(x, weight, self.bias_mu)
        elif self.sampling == "weights":
            weight = weight + self.weight_std * self._noise(weight)
            bias = self.bias_mu
            if bias is not None:
                bias = bias + self.bias_std * self._noise(bias)
            out = self._op(x, weight, bias)
        else:
            mean = self._op(x, weight, self.bias_mu)
            bias_var = None if self.bias_rho is None else self.bias_std ** 2
            var = self._op(x * x, self.weight_std ** 2, bias_var)
            out = mean + torch.sqrt(var + _LRT_EPS) * self._noise(mean)
        self.output_positions = out.numel() // max(1, out.shape[0] * out.shape[self.out_dim])
        return out

    # ------------------------------------------------------------------- FLOPs

    def forward_flops(self, dense: bool = False) -> int:
        """FLOPs of one LRT forward pass per example (multiply-add = 2 FLOPs).

        Counts the mean and the variance products over the active weights (all weights
        with ``dense=True``) and the two bias additions, at the output size seen in the
        last forward pass.
        """
        if self.output_positions is None:
            raise InputError(f"{type(self).__name__} has not seen an input yet; run a forward "
                             "pass (or fit) before counting its FLOPs")
        weights = self.num_weights if dense else self.num_active
        out_units = self.mask.shape[0]
        bias = 2 * out_units if self.bias_mu is not None else 0
        return self.output_positions * (2 * 2 * weights + bias)


class BayesianLinear(MeanFieldLayer):
    """Mean-field Gaussian ``nn.Linear``: x [..., in_features] -> [..., out_features].

    Args:
        in_features, out_features, bias: as for ``nn.Linear``.
        prior_std, init_std, device, dtype: see :class:`MeanFieldLayer`.
    """

    out_dim = -1

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 prior_std: float = 1.0, init_std: float = 1e-3,
                 device: torch.device | None = None, dtype: torch.dtype | None = None):
        self.in_features = in_features
        self.out_features = out_features
        super().__init__((out_features, in_features), bias, prior_std=prior_std,
                         init_std=init_std, device=device, dtype=dtype)

    @classmethod
    def from_module(cls, module: nn.Linear, *, prior_std: float = 1.0,
                    init_std: float = 1e-3) -> BayesianLinear:
        """A BayesianLinear whose means start at ``module``'s weight and bias."""
        if not isinstance(module, nn.Linear):
            raise InputError(f"`module` must be an nn.Linear, got {type(module).__name__}")
        layer = cls(module.in_features, module.out_features, module.bias is not None,
                    prior_std=prior_std, init_std=init_std, device=module.weight.device,
                    dtype=module.weight.dtype)
        return layer._copy_means(module)

    def _op(self, x: torch.Tensor, weight: torch.Tensor,
            bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, weight, bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias_mu is not None}, prior_std={self.prior_std}, "
                f"active={self.num_active}/{self.num_weights}")


class BayesianConv2d(MeanFieldLayer):
    """Mean-field Gaussian ``nn.Conv2d``: x [N, C_in, H, W] -> [N, C_out, H', W'].

    Any kernel size, stride, padding (numbers, ``"same"``/``"valid"``, any
    ``padding_mode``), dilation and groups, as for ``nn.Conv2d``.
    """

    out_dim = 1

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 *, prior_std: float = 1.0, init_std: float = 1e-3,
                 device: torch.device | None = None, dtype: torch.dtype | None = None):
        if in_channels % groups or out_channels % groups:
            raise InputError(f"`groups` ({groups}) must divide in_channels ({in_channels}) "
                             f"and out_channels ({out_channels})")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        self.dilation = _pair(dilation)
        self.groups = groups
        self.padding_mode = padding_mode
        # nn.Conv2d's own bookkeeping gives the explicit padding for non-zero modes.
        shape_probe = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding,
                                dilation, groups, False, padding_mode, device="meta")
        self._pad = shape_probe._reversed_padding_repeated_twice
        super().__init__((out_channels, in_channels // groups, *self.kernel_size), bias,
                         prior_std=prior_std, init_std=init_std, device=device, dtype=dtype)

    @classmethod
    def from_module(cls, module: nn.Conv2d, *, prior_std: float = 1.0,
                    init_std: float = 1e-3) -> BayesianConv2d:
        """A BayesianConv2d with ``module``'s geometry whose means start at its weights."""
        if not isinstance(module, nn.Conv2d):
            raise InputError(f"`module` must be an nn.Conv2d, got {type(module).__name__}")
        layer = cls(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                    module.padding, module.dilation, module.groups, module.bias is not None,
                    module.padding_mode, prior_std=prior_std, init_std=init_std,
                    device=module.weight.device, dtype=module.weight.dtype)
        return layer._copy_means(module)

    def _op(self, x: torch.Tensor, weight: torch.Tensor,
            bias: torch.Tensor | None) -> torch.Tensor:
        if self.padding_mode != "zeros":
            # Padding the squared input with reflect/replicate/circular values is exact
            # for the variance product too: padding commutes with squaring.
            x = F.pad(x, self._pad, mode=self.padding_mode)
            return F.conv2d(x, weight, bias, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"groups={self.groups}, bias={self.bias_mu is not None}, "
                f"prior_std={self.prior_std}, active={self.num_active}/{self.num_weights}")


@contextlib.contextmanager
def sampling_mode(module: nn.Module, mode: str,
                  generator: torch.Generator | None = None) -> Iterator[None]:
    """Set every mean-field layer in ``module`` to ``mode`` (and ``generator``) for a block.

    The previous modes and generators come back on exit, also when the body raises.
    """
    check_choice(mode, "mode", SAMPLING_MODES)
    layers = [m for m in module.modules() if isinstance(m, MeanFieldLayer)]
    saved = [(m, m.sampling, m.generator) for m in layers]
    try:
        for m in layers:
            m.sampling = mode
            m.generator = generator
        yield
    finally:
        for m, old_mode, old_generator in saved:
            m.sampling = old_mode
            m.generator = old_generator
