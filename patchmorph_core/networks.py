"""Networks behind one small interface; the spatial logic (model, sampling, inference) never looks inside.

Two roles, each a :class:`typing.Protocol`:

* :class:`DisplacementNet`: ``(B, 2, P, P, P)`` (fixed, moving patch) → ``(B, 3, P, P, P)`` dense
  displacement in **patch-voxel units**, component ``k`` along patch axis ``k``.
* :class:`AffineNet`: ``(B, 2, P, P, P)`` → ``(B, 3, 4)`` affine ``[A | t]`` in patch-voxel units about
  the patch centre: ``d(q) = A q + t`` with ``q = index - (P - 1) / 2``.

Working in patch-voxel units makes one set of weights serve every scale and species: the model
converts to world with the patch's linear part (:mod:`patchmorph_core.model`).

:data:`NETWORKS` maps ``ModelConfig.network`` to a dense-network factory. The default ``"unet"`` is a
small VoxelMorph-like 3D U-Net (widths ``(8, 16, 16, 16)``, 51 k parameters) sized for CPU throughput.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn


class DisplacementNet(Protocol):
    """Dense displacement network: ``(B, 2, P, P, P)`` → ``(B, 3, P, P, P)`` in patch-voxel units."""

    def __call__(self, pair: torch.Tensor) -> torch.Tensor: ...


class AffineNet(Protocol):
    """Affine head: ``(B, 2, P, P, P)`` → ``(B, 3, 4)`` ``[A | t]`` in patch-voxel units about the centre."""

    def __call__(self, pair: torch.Tensor) -> torch.Tensor: ...


def _conv(in_ch: int, out_ch: int, stride: int = 1) -> nn.Sequential:
    """3×3×3 convolution + LeakyReLU(0.2), as in VoxelMorph."""
    return nn.Sequential(nn.Conv3d(in_ch, out_ch, 3, stride=stride, padding=1), nn.LeakyReLU(0.2))


class UNet3D(nn.Module):
    """VoxelMorph-like U-Net: one conv per level, strided-conv downsampling, upsample + skip concat.

    Args:
        widths: channels per level, finest first; ``len(widths) - 1`` downsamplings, so ``P`` must be
            divisible by ``2 ** (len(widths) - 1)``.
        in_channels: input channels (2: fixed and moving).

    The output layer starts near zero (normal, std 1e-5), so an untrained cascade is the identity.
    """

    def __init__(self, widths: Sequence[int], in_channels: int = 2) -> None:
        super().__init__()
        widths = list(widths)
        self.stem = _conv(in_channels, widths[0])
        self.down = nn.ModuleList(_conv(widths[i], widths[i + 1], stride=2) for i in range(len(widths) - 1))
        self.up = nn.ModuleList(
            _conv(widths[i + 1] + widths[i], widths[i]) for i in reversed(range(len(widths) - 1))
        )
        self.head = nn.Conv3d(widths[0], 3, 3, padding=1)
        nn.init.normal_(self.head.weight, std=1e-5)
        nn.init.zeros_(self.head.bias)

    def forward(self, pair: torch.Tensor) -> torch.Tensor:
        """``(B, 2, P, P, P)`` → ``(B, 3, P, P, P)`` displacement in patch voxels."""
        skips = [self.stem(pair)]
        for layer in self.down:
            skips.append(layer(skips[-1]))
        x = skips.pop()
        for layer in self.up:
            skip = skips.pop()
            # resizes feature maps inside the network, not coordinates: spatial.ALIGN_CORNERS does not apply,
            # and the committed weights were trained with this setting
            x = F.interpolate(x, size=skip.shape[-3:], mode="trilinear", align_corners=False)
            x = conv_concat(layer, x, skip)
        return self.head(x)


def conv_concat(layer: nn.Sequential, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """``layer(torch.cat([first, second], dim=1))`` for a :func:`_conv` layer, without the concatenation.

    A convolution of a channel concatenation is the sum of the convolutions of its parts with the matching
    input-channel slices of the weight (the bias added once). Same values to float32 rounding, same
    parameters and checkpoints; on 2 CPU cores (oneDNN, channels-last) the concatenation cost more than
    the second convolution: a default registration took 7.0 s instead of 7.7 s (median of 3, same pair).

    Args:
        layer: ``Sequential(Conv3d(c1 + c2, c_out, k, groups=1), activation)``; its stride, padding and
            dilation are used as they are.
        first: ``(B, c1, D, H, W)`` (the upsampled coarser features).
        second: ``(B, c2, D, H, W)`` (the skip connection).

    Returns:
        ``(B, c_out, D, H, W)``.
    """
    conv, activation = layer
    split = first.shape[1]
    geometry = (conv.stride, conv.padding, conv.dilation)  # the layer's own, not assumed (groups: 1)
    out = F.conv3d(first, conv.weight[:, :split], conv.bias, *geometry)
    out = out + F.conv3d(second, conv.weight[:, split:], None, *geometry)
    return activation(out)


class AffineHead(nn.Module):
    """Strided conv encoder → global average pool → linear → ``(B, 3, 4)``, zero-initialised (identity).

    The linear part ``A`` is dimensionless; the translation ``t`` is in patch voxels, scaled by
    ``P / 2`` so the last layer's outputs are O(1) for translations of half a patch.
    """

    def __init__(self, widths: Sequence[int], patch_size: int, in_channels: int = 2) -> None:
        super().__init__()
        chans = [in_channels, *widths]
        self.encoder = nn.Sequential(*(_conv(chans[i], chans[i + 1], stride=2) for i in range(len(widths))))
        self.fc = nn.Linear(chans[-1], 12)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)
        self.register_buffer("scale", torch.tensor([1.0, 1.0, 1.0, patch_size / 2.0]), persistent=False)

    def forward(self, pair: torch.Tensor) -> torch.Tensor:
        """``(B, 2, P, P, P)`` → ``(B, 3, 4)`` ``[A | t]`` (patch-voxel units about the patch centre)."""
        feat = self.encoder(pair).mean(dim=(2, 3, 4))
        return self.fc(feat).view(-1, 3, 4) * self.scale


NETWORKS: dict[str, Callable[..., nn.Module]] = {"unet": UNet3D}
"""Dense displacement networks by ``ModelConfig.network`` name; each is called as ``factory(widths)``."""
