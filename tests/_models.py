"""Small stand-ins for real vision models (timm needs torchvision, which does not install
here): a ResNet-like CNN (Conv2d, BatchNorm2d, skip connections, global pooling, Linear
head) and a ViT-like transformer (patch embedding, class token, LayerNorm, multi-head
self-attention, MLP, Linear head), a few thousand parameters each, built from a seed
without touching torch's global random state, and tiny generated images to train them.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["BasicBlock", "TinyResNet", "TinyViT", "count_parameters", "tiny_images"]


def _seeded(build, seed: int) -> nn.Module:
    """``build()`` with torch's global generator seeded, restored afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class BasicBlock(nn.Module):
    """ResNet's basic block: two 3x3 conv + BatchNorm, added to a (projected) skip."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.skip = nn.Identity() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, c_in, H, W] -> [N, c_out, H/stride, W/stride]."""
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + self.skip(x))


class TinyResNet(nn.Module):
    """Stem, two basic blocks (the second downsamples), global average pool, head.

    Args:
        num_classes: C.
        in_channels: image channels.
        width: channels of the stem (the second block doubles them).

    Forward: images [N, in_channels, H, W] -> logits [N, C].
    """

    def __init__(self, num_classes: int = 3, in_channels: int = 3, width: int = 8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())
        self.layer1 = BasicBlock(width, width)
        self.layer2 = BasicBlock(width, 2 * width, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layer2(self.layer1(self.stem(x)))
        return self.fc(self.pool(h).flatten(1))

    @classmethod
    def build(cls, seed: int = 0, **kwargs) -> TinyResNet:
        return _seeded(lambda: cls(**kwargs), seed)


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then h + MLP(LN(h)); the MLP's
    dropout (rate ``dropout``, 0 by default as in timm) sits after its activation."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, T, dim] -> [N, T, dim]."""
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """Patch embedding, class token, learned positions, encoder blocks, LayerNorm, head.

    Args:
        num_classes: C.
        in_channels: image channels.
        image_size: H = W.
        patch: patch side (image_size must be a multiple).
        dim: token width.
        depth: number of encoder blocks.
        heads: attention heads (dim must be a multiple).
        dropout: rate of the MLP's dropout in every block.

    Forward: images [N, in_channels, H, W] -> logits [N, C], read at the class token.
    """

    def __init__(self, num_classes: int = 3, in_channels: int = 3, image_size: int = 8,
                 patch: int = 4, dim: int = 16, depth: int = 2, heads: int = 2,
                 dropout: float = 0.0):
        super().__init__()
        tokens = (image_size // patch) ** 2
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, tokens + 1, dim))
        self.blocks = nn.ModuleList(EncoderBlock(dim, heads, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)       # [N, T, dim]
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        h = torch.cat([cls, tokens], dim=1) + self.pos_embed
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h[:, 0]))

    @classmethod
    def build(cls, seed: int = 0, **kwargs) -> TinyViT:
        return _seeded(lambda: cls(**kwargs), seed)


def tiny_images(n: int, num_classes: int = 3, *, in_channels: int = 3, size: int = 8,
                seed: int = 0, dtype: torch.dtype = torch.float32
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose class sets a coloured bar at a class-specific row, plus noise.

    Returns:
        x [n, in_channels, size, size] in ``dtype`` and labels y [n] (int64).
    """
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, num_classes, (n,), generator=g)
    x = 0.5 * torch.randn(n, in_channels, size, size, generator=g)
    rows = (y * size) // num_classes
    x[torch.arange(n), y % in_channels, rows, :] += 2.0
    return x.to(dtype), y


def lora_network(task: str, *, batchnorm: bool = False, seed: int = 0, rank: int = 4
                 ) -> nn.Module:
    """The suite's MLP with random (not zero) LoRA adapters on every Linear layer. peft
    freezes the base weights; they are unfrozen again so that the suite's copy_model
    check can see that tfb itself freezes nothing."""
    import peft

    from bayesify.testing import default_network

    net = default_network(task, batchnorm=batchnorm, seed=seed)
    names = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    torch.manual_seed(seed)
    model = peft.get_peft_model(net, peft.LoraConfig(r=rank, lora_alpha=2 * rank,
                                                     target_modules=names,
                                                     init_lora_weights=False))
    for p in model.parameters():
        p.requires_grad_(True)
    return model
