"""LoRA adapters as the Bayesian subset: finding them, the low-rank factors of the TFB
posterior, and adding sampled adapter noise to a network's forward without copying it.

A LoRA layer (peft's ``lora.Linear``, on ``nn.Linear`` or HF ``Conv1D`` base layers)
computes ``base(x) + s · B A x`` for each active adapter, with A [r, in], B [out, r] and
scaling s = lora_alpha / r. TFB (Shi et al., 2025) writes B = U diag(d) Vᵀ (thin SVD,
k = min(out, r) singular values) and takes the posterior over the rotated factor
A' = Vᵀ A with B' = U diag(d) fixed: A'_ij ~ N(M_ij, Ω_ij²), Ω_ij = σ_q / d_i. The
update B'A' then has mean B A and noise U diag(d) E with E_ij ~ N(0, σ_q² / d_i²),
i.e. U Z with Z [k, in] iid N(0, σ_q²) on the directions with d_i > 0: a low-rank
isotropic Gaussian in weight space. It is applied as an extra output term
``s · U (Z x)`` added by a forward hook, so neither the base weights nor the adapters
are copied or changed.

Layers are found by duck typing (``lora_A``/``lora_B`` ModuleDicts and a ``scaling``
dict, as peft lays them out), so importing this module does not need peft.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from bayesify.errors import InputError, UnsupportedModelError

__all__ = ["LoraFactor", "find_lora_layers", "lora_noise", "repeat_batch"]


def repeat_batch(x: Any, times: int) -> Any:
    """The batch tiled ``times`` along its first axis ([N, ...] -> [times·N, ...]; row
    s·N + i is copy s of row i); a dict batch has each tensor tiled."""
    if isinstance(x, Mapping):
        return {k: repeat_batch(v, times) if isinstance(v, torch.Tensor) else v
                for k, v in x.items()}
    return x.repeat(times, *([1] * (x.dim() - 1))) if times > 1 else x


def _is_lora_layer(module: nn.Module) -> bool:
    return (isinstance(getattr(module, "lora_A", None), nn.ModuleDict)
            and isinstance(getattr(module, "lora_B", None), nn.ModuleDict)
            and isinstance(getattr(module, "scaling", None), dict))


def _active_adapters(module: nn.Module) -> list[str]:
    active = getattr(module, "active_adapters", None)
    if active is None:
        active = getattr(module, "active_adapter", [])
    return [active] if isinstance(active, str) else list(active)


def find_lora_layers(model: nn.Module) -> list[tuple[str, str]]:
    """(layer name, adapter name) for every active LoRA adapter on a Linear layer.

    Raises:
        UnsupportedModelError: the model has no LoRA adapter, or one that is not on a
            Linear layer (embedding or convolution LoRA) or uses DoRA.
    """
    found = []
    for name, module in model.named_modules():
        if not _is_lora_layer(module):
            continue
        for adapter in _active_adapters(module):
            embedding = getattr(module, "lora_embedding_A", {})
            if adapter not in module.lora_A:
                if adapter in embedding:
                    raise UnsupportedModelError(
                        f"layer {name!r} has an embedding LoRA adapter {adapter!r}; tfb "
                        "supports LoRA on Linear layers (leave embeddings out of "
                        "target_modules)")
                continue
            a, b = module.lora_A[adapter], module.lora_B[adapter]
            if type(a) is not nn.Linear or type(b) is not nn.Linear:
                raise UnsupportedModelError(
                    f"layer {name!r} has a {type(a).__name__} LoRA adapter {adapter!r}; tfb "
                    "supports LoRA on Linear layers (nn.Linear or HF Conv1D bases)")
            if getattr(module, "use_dora", {}).get(adapter, False):
                raise UnsupportedModelError(f"layer {name!r} uses DoRA; tfb's posterior is "
                                            "defined for plain LoRA adapters")
            found.append((name, adapter))
    if not found:
        raise UnsupportedModelError(
            "tfb needs a model with active LoRA adapters on Linear layers (peft's "
            "get_peft_model or LoraModel with a LoraConfig); the model has none")
    return found


class LoraFactor(nn.Module):
    """The fixed part of one adapter's TFB posterior.

    Buffers: ``u`` [out, k], the left singular vectors of B; ``active`` [k], 1 where the
    singular value is non-zero (a zero direction of B gets no noise: Ω·d = 0 there).
    """

    def __init__(self, layer: str, adapter: str, module: nn.Module):
        super().__init__()
        self.layer, self.adapter = layer, adapter
        b = module.lora_B[adapter].weight
        self.in_features = int(module.lora_A[adapter].weight.shape[1])
        k = min(b.shape)
        self.register_buffer("u", torch.zeros(b.shape[0], k, dtype=b.dtype, device=b.device))
        self.register_buffer("active", torch.zeros(k, dtype=b.dtype, device=b.device))
        self.refresh(module)

    @torch.no_grad()
    def refresh(self, module: nn.Module) -> None:
        """Recompute U and the active directions from the adapter's current B."""
        b = module.lora_B[self.adapter].weight.detach().double()
        u, d, _ = torch.linalg.svd(b, full_matrices=False)
        threshold = d.max().clamp_min(0) * max(b.shape) * torch.finfo(self.u.dtype).eps
        self.u.copy_(u.to(self.u.dtype))
        self.active.copy_((d > threshold).to(self.active.dtype))

    @property
    def rank(self) -> int:
        """k, the directions of the posterior's noise (before masking)."""
        return int(self.u.shape[1])

    def draw(self, num_samples: int, generator: torch.Generator | None) -> torch.Tensor:
        """Standard-normal Z/σ_q for S network samples, [S, k, in] (zero rows on the
        inactive directions)."""
        eps = torch.randn(num_samples, self.rank, self.in_features, generator=generator,
                          dtype=self.u.dtype, device=self.u.device)
        return eps * self.active[:, None]

    def extra_repr(self) -> str:
        return f"layer={self.layer!r}, adapter={self.adapter!r}, rank={self.rank}"


@contextlib.contextmanager
def lora_noise(model: nn.Module, factors: list[LoraFactor], noises: list[torch.Tensor],
               sigma: float | torch.Tensor) -> Iterator[None]:
    """Within the block, each LoRA layer adds ``σ · s · U (Z_s x)`` to its output.

    The batch the network sees must be S copies of the inputs stacked along the first
    axis (:func:`repeat_batch`), S = ``noises[i].shape[0]``; copy s gets adapter draw s.

    Args:
        model: the network holding the layers.
        factors: one per adapter.
        noises: standard draws per factor, [S, k, in].
        sigma: σ_q.
    """
    modules = dict(model.named_modules())
    by_layer: dict[str, list[tuple[LoraFactor, torch.Tensor]]] = {}
    for factor, z in zip(factors, noises, strict=True):
        by_layer.setdefault(factor.layer, []).append((factor, z))
    handles = []

    def make_hook(pairs: list[tuple[LoraFactor, torch.Tensor]]) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> Any:
            if getattr(module, "disable_adapters", False):
                return output
            x = args[0]
            samples = pairs[0][1].shape[0]
            if x.shape[0] % samples:
                raise InputError(f"LoRA layer input has {x.shape[0]} rows, not a multiple of "
                                 f"the {samples} posterior samples: tfb needs the batch first")
            xs = x.reshape(samples, -1, x.shape[-1])
            extra = 0
            for factor, z in pairs:
                scale = sigma * module.scaling[factor.adapter]
                inner = xs @ z.to(xs.dtype).transpose(-1, -2)            # [S, M, k]
                extra = extra + scale * (inner @ factor.u.to(xs.dtype).T)  # [S, M, out]
            return output + extra.reshape(output.shape).to(output.dtype)
        return hook

    try:
        for layer, pairs in by_layer.items():
            if layer not in modules:
                raise InputError(f"LoRA layer {layer!r} is no longer in the model")
            handles.append(modules[layer].register_forward_hook(make_hook(pairs)))
        yield
    finally:
        for handle in handles:
            handle.remove()
