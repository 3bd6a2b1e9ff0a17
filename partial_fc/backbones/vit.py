"""Vision Transformer face backbones (vit_t/s/b/l/h) with the parameter names and shapes of insightface arcface_torch.

112x112 input in 9x9 patches (a 12x12 grid, the last 4 pixel rows and columns unused), no class token, the
flattened tokens go through Linear-BN-Linear-BN to the embedding. In training, a share of the patches may be
dropped before the blocks and replaced by a learned mask token after them; blocks use stochastic depth.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from partial_fc.backbones.registry import body_autocast, register_model
from partial_fc.errors import InputError


def _full_precision(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Turn autocast off inside a body that runs under it."""
    if x.device.type in ("cuda", "cpu"):
        return torch.autocast(device_type=x.device.type, enabled=False)
    return contextlib.nullcontext()


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a sample's residual branch with probability p and rescale the rest."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


class Mlp(nn.Module):
    """Two linear layers with ReLU6 between, dropout after each."""

    def __init__(self, dim: int, hidden: int, drop: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.ReLU6()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Attention(nn.Module):
    """Multi-head self-attention; the bias-free qkv and the output projection may run in half precision,
    the attention itself always in float32."""

    def __init__(self, dim: int, num_heads: int, drop: float):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(x).unflatten(-1, (3, self.num_heads, -1)).permute(2, 0, 3, 1, 4)
        with _full_precision(x):
            q, k, v = qkv.float().unbind(0)
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.proj_drop(self.proj(out.transpose(1, 2).flatten(2)))


class Block(nn.Module):
    """Pre-norm transformer block with stochastic depth on both residual branches."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop: float, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, drop)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Non-overlapping patch_size x patch_size patches of an img_size square image, projected to tokens."""

    def __init__(self, img_size: int, patch_size: int, embed_dim: int):
        super().__init__()
        self.img_size = img_size
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or tuple(x.shape[1:]) != (3, self.img_size, self.img_size):
            raise InputError(f"ViT input must be [N, 3, {self.img_size}, {self.img_size}], got {list(x.shape)}")
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """ViT over 9x9 patches of a 112x112 face with a flattened-token embedding head."""

    def __init__(
        self,
        num_features: int = 512,
        embed_dim: int = 256,
        depth: int = 12,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        img_size: int = 112,
        patch_size: int = 9,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        mask_ratio: float = 0.0,
        using_checkpoint: bool = False,
        fp16: bool = False,
    ):
        super().__init__()
        if not 0.0 <= mask_ratio < 1.0:
            raise InputError(f"mask_ratio must be in [0, 1), got {mask_ratio!r}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise InputError(f"drop_path_rate must be in [0, 1), got {drop_path_rate!r}")
        self.embed_dim = embed_dim
        self.mask_ratio = mask_ratio
        self.using_checkpoint = using_checkpoint
        self.fp16 = fp16
        self.patch_embed = PatchEmbed(img_size, patch_size, embed_dim)
        self.num_patches = self.patch_embed.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, drop_rate, rate) for rate in rates)
        self.norm = nn.LayerNorm(embed_dim)
        self.feature = nn.Sequential(
            nn.Linear(embed_dim * self.num_patches, embed_dim, bias=False),
            nn.BatchNorm1d(embed_dim, eps=2e-5),
            nn.Linear(embed_dim, num_features, bias=False),
            nn.BatchNorm1d(num_features, eps=2e-5),
        )
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def _drop_patches(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep a random int(L * (1 - mask_ratio)) tokens per sample; also return the order that restores them."""
        n, length, dim = x.shape
        keep = int(length * (1.0 - self.mask_ratio))
        order = torch.rand(n, length, device=x.device).argsort(dim=1)
        kept = x.gather(1, order[:, :keep, None].expand(-1, -1, dim))
        return kept, order.argsort(dim=1)

    def _restore_patches(self, x: torch.Tensor, restore: torch.Tensor) -> torch.Tensor:
        n, kept, dim = x.shape
        filler = self.mask_token.to(x.dtype).expand(n, restore.shape[1] - kept, dim)
        return torch.cat([x, filler], dim=1).gather(1, restore[:, :, None].expand(-1, -1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        masking = self.training and self.mask_ratio > 0.0
        with body_autocast(x, self.fp16):
            x = self.pos_drop(self.patch_embed(x) + self.pos_embed)
            if masking:
                x, restore = self._drop_patches(x)
            for block in self.blocks:
                if self.using_checkpoint and self.training:
                    x = checkpoint(block, x, use_reentrant=False)
                else:
                    x = block(x)
        x = self.norm(x.float())
        if masking:
            x = self._restore_patches(x, restore)
        return self.feature(x.flatten(1))


_VARIANTS = {
    # name: (embed_dim, depth, drop_path_rate, mask_ratio, using_checkpoint), as in arcface_torch's get_model
    "vit_t": (256, 12, 0.1, 0.1, False),
    "vit_t_dp005_mask0": (256, 12, 0.05, 0.0, False),
    "vit_s": (512, 12, 0.1, 0.1, False),
    "vit_s_dp005_mask_0": (512, 12, 0.05, 0.0, False),
    "vit_b": (512, 24, 0.1, 0.1, True),
    "vit_b_dp005_mask_005": (512, 24, 0.05, 0.05, True),
    "vit_l_dp005_mask_005": (768, 24, 0.05, 0.05, True),
    "vit_h": (1024, 48, 0.1, 0.0, True),
}


def _register_variant(name: str, embed_dim: int, depth: int, drop_path: float, mask: float, ckpt: bool) -> None:
    def factory(
        *,
        num_features: int = 512,
        dropout: float = 0.0,
        fp16: bool = False,
        drop_path_rate: float = drop_path,
        mask_ratio: float = mask,
        using_checkpoint: bool = ckpt,
    ) -> VisionTransformer:
        return VisionTransformer(
            num_features,
            embed_dim=embed_dim,
            depth=depth,
            drop_rate=dropout,
            drop_path_rate=drop_path_rate,
            mask_ratio=mask_ratio,
            using_checkpoint=using_checkpoint,
            fp16=fp16,
        )

    factory.__name__ = name
    factory.__doc__ = (
        f"ViT {name}: width {embed_dim}, depth {depth}, 8 heads, drop path {drop_path}, "
        f"patch masking {mask} in training."
    )
    register_model(factory, name=name)


for _name, _config in _VARIANTS.items():
    _register_variant(_name, *_config)
