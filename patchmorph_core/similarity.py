"""Image similarities for the training loss and for instance optimisation (the polish), on voxel grids.

A :class:`Similarity` compares a fixed image ``F`` with a warped moving image ``W = M(x + u(x))``, both
``(B, 1, Z, Y, X)`` on one grid (a patch, or a box of the field grid), and gives three things:

* :meth:`Similarity.voxel_map`: a differentiable per-voxel similarity ``s(x)``, higher is more similar; its
  value at a voxel depends only on the voxels within :attr:`Similarity.reach` of it (so a box padded by the
  reach gives the same values inside as the whole grid does).
* :meth:`Similarity.loss`: ``-mean(s)``, the training loss (lower is better).
* :meth:`Similarity.force`: the ascent direction of ``s`` with respect to the displacement, ``(B, 3, Z, Y,
  X)`` per index axis ``(z, y, x)``, in explicit form (no autograd): what a greedy step adds to the field
  (in voxels of the grid, before the caller's gain, smoothing and clamp).

Two similarities:

* :class:`LocalNCC` — squared local normalised cross-correlation over ``(2r+1)³`` windows (VoxelMorph's loss;
  its force is ANTs SyN's CC update). It assumes the two intensities are locally linearly related: right
  for one contrast, wrong across contrasts (an MRI-like atlas against a microscopy brain, two stains).
* :class:`MindSSC` — MIND with the self-similarity context (Heinrich et al., MICCAI 2013): every voxel is
  described by 12 patch distances between pairs of its six neighbours at ``dilation`` voxels, each
  ``exp(-D / V)`` with ``V`` the voxel's mean distance; the similarity is minus the mean squared difference
  of the two descriptors. The descriptor depends on the local *structure*, not on the intensity mapping,
  so two contrasts of one anatomy get the same descriptor. Force: ``(2/12) Σ_c (m_F,c − m_W,c) ∇ m_W,c``
  (the Gauss-Newton force of the descriptor difference).

Window sums are means over the voxels of the window that lie inside the grid (truncated at the border),
so no border mode invents data. :func:`make_similarity` builds one by name (``"ncc"``, ``"mind"``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch
import torch.nn.functional as F

EPS = 1e-5
"""Added to local variance products of normalised intensities (0..1) before dividing."""


SLAB = 4
"""Output z-slices that the polish's filters and voxel-by-voxel arithmetic work through at a time in a large
volume (:func:`box_mean`, the local-NCC force, the polish's Gaussians and sampling map): a slab and the slices it
reads stay in a core's cache instead of going to memory for each of a kernel's taps. Every voxel gets the same
operations in the same order as in one pass over the whole volume, so the values are the same bit for bit."""

SLAB_FROM_BYTES = 2**21
"""Smallest volume (bytes) worked through in slabs (:func:`in_slabs`); a smaller one fits a core's cache whole."""


def in_slabs(x: torch.Tensor) -> bool:
    """Whether ``x`` (a ``(B, C, Z, Y, X)`` tensor) is worked through in :func:`z_slabs` of its ``Z`` axis: it is
    larger than :data:`SLAB_FROM_BYTES` and needs no gradient (the slabs are written into an output tensor)."""
    return not x.requires_grad and x.numel() * x.element_size() > SLAB_FROM_BYTES


def z_slabs(depth: int, whole: bool = False) -> list[slice]:
    """The z-ranges of :data:`SLAB` slices that cover ``depth`` slices (the last one shorter), or one range of all
    of them when ``whole``."""
    step = depth if whole else SLAB
    return [slice(start, min(start + step, depth)) for start in range(0, depth, max(step, 1))]


def box_mean(x: torch.Tensor, window: int) -> torch.Tensor:
    """Mean over a centred cube of ``window`` voxels, truncated at the border: ``(B, C, Z, Y, X)`` → same.

    Separable (one 1-D average per axis, 3·window instead of window³ operations per voxel), each a sum of
    shifted views of the zero-padded volume divided by the number of voxels inside (border windows average
    only the voxels inside; the values and gradients of ``avg_pool3d`` with ``count_include_pad=False``, at
    about a third of its time on CPU). A window larger than an axis shrinks to the axis' largest odd size. A
    large volume without gradient is averaged along z whole, then along y and x slab by slab (:func:`in_slabs`).
    """
    if not in_slabs(x):
        return _box_axis(_box_axis(_box_axis(x, window, 2), window, 3), window, 4)
    x = _box_axis(x, window, 2)
    out = torch.empty_like(x)
    for z in z_slabs(x.shape[2]):
        out[:, :, z] = _box_axis(_box_axis(x[:, :, z], window, 3), window, 4)
    return out


def _box_axis(x: torch.Tensor, window: int, dim: int) -> torch.Tensor:
    """:func:`box_mean` along the one axis ``dim`` of ``(B, C, Z, Y, X)``."""
    n = x.shape[dim]
    size = min(window, n)
    size -= 1 - size % 2  # odd, so the window stays centred
    radius = size // 2
    if radius == 0:
        return x
    # total[i] = x[i - radius] + ... + x[i + radius] added in that order, the terms outside the axis left out
    # (the zero-padded sum without the padded copy: the same values)
    total = torch.empty_like(x)
    total.narrow(dim, 0, radius).zero_()
    total.narrow(dim, radius, n - radius).copy_(x.narrow(dim, 0, n - radius))
    for offset in range(1 - radius, radius + 1):
        if offset < 0:
            total.narrow(dim, -offset, n + offset).add_(x.narrow(dim, 0, n + offset))
        else:
            total.narrow(dim, 0, n - offset).add_(x.narrow(dim, offset, n - offset))
    index = torch.arange(n, device=x.device)
    count = torch.clamp(index + radius, max=n - 1) - torch.clamp(index - radius, min=0) + 1
    shape = [1] * x.dim()
    shape[dim] = n
    return total / count.to(x.dtype).view(shape)


def spatial_gradient(x: torch.Tensor) -> torch.Tensor:
    """Central differences (one-sided at the border) of ``(B, C, Z, Y, X)`` → ``(B, C, 3, Z, Y, X)`` per voxel,
    components ``(z, y, x)``."""
    return torch.stack(torch.gradient(x, dim=(2, 3, 4)), dim=2)


class Similarity(Protocol):
    """What the training loss and the polish need of a similarity (see the module doc)."""

    name: str
    reach: int

    def voxel_map(self, fixed: torch.Tensor, warped: torch.Tensor) -> torch.Tensor:
        """``(B, 1, Z, Y, X)`` per-voxel similarity (higher is better), differentiable in ``warped``."""
        ...

    def loss(self, fixed: torch.Tensor, warped: torch.Tensor) -> torch.Tensor:
        """Scalar ``-mean(voxel_map)`` of ``fixed`` and ``warped`` (each ``(B, 1, Z, Y, X)``); lower is better."""
        ...

    def force(self, fixed: torch.Tensor, warped: torch.Tensor) -> torch.Tensor:
        """``(B, 3, Z, Y, X)`` ascent direction per index axis ``(z, y, x)``, explicit (no autograd)."""
        ...

    def force_towards(self, fixed: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """``warped → force(fixed, warped)`` with what depends on ``fixed`` alone computed once (the polish
        steps towards one fixed box many times); the same values: ``(B, 1, Z, Y, X)`` images in, a
        ``(B, 3, Z, Y, X)`` force per index axis ``(z, y, x)`` out."""
        ...


class LocalNCC:
    """Squared local NCC ``cc = cov² / (var_F var_W + eps)`` over ``(2 radius + 1)³`` windows (in ``[0, 1]``).

    Args:
        radius: window half-width in voxels (the training loss has used radius 4 on patches, the polish 2).
        eps: added to ``var_F var_W``.
    """

    name = "ncc"

    def __init__(self, radius: int = 2, eps: float = EPS) -> None:
        self.radius = int(radius)
        self.eps = float(eps)

    @property
    def window(self) -> int:
        """Window edge in voxels."""
        return 2 * self.radius + 1

    @property
    def reach(self) -> int:
        """Voxels a value depends on in each direction (the window; the force adds one for the gradient)."""
        return self.radius + 1

    def _fixed_means(self, fixed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Local means of ``F`` and ``F²`` (each ``(B, 1, Z, Y, X)``)."""
        f = fixed.float()
        f_mean, ff = box_mean(torch.cat([f, f * f], dim=1), self.window).split(1, dim=1)
        return f_mean, ff

    def _window_means(
        self, fixed: torch.Tensor, warped: torch.Tensor, fixed_means: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, ...]:
        """Local means of ``F``, ``F²``, ``W``, ``W²`` and ``F·W`` (each ``(B, 1, Z, Y, X)``)."""
        f, w = fixed.float(), warped.float()
        f_mean, ff = self._fixed_means(fixed) if fixed_means is None else fixed_means
        w_mean, ww, fw = box_mean(torch.cat([w, w * w, f * w], dim=1), self.window).split(1, dim=1)
        return f_mean, ff, w_mean, ww, fw

    @staticmethod
    def _moments(
        f_mean: torch.Tensor, ff: torch.Tensor, w_mean: torch.Tensor, ww: torch.Tensor, fw: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Local ``var_F``, ``var_W`` and ``cov`` from the local means (voxel by voxel)."""
        cov = fw - f_mean * w_mean
        var_f = (ff - f_mean**2).clamp_min(0.0)
        var_w = (ww - w_mean**2).clamp_min(0.0)
        return var_f, var_w, cov

    def voxel_map(self, fixed: torch.Tensor, warped: torch.Tensor) -> torch.Tensor:
        """``(B, 1, Z, Y, X)`` squared local NCC in ``[0, 1]`` of two ``(B, 1, Z, Y, X)`` images."""
        var_f, var_w, cov = self._moments(*self._window_means(fixed, warped))
        return cov * cov / (var_f * var_w + self.eps)

    def loss(self, fixed: torch.Tensor, warped: torch.Tensor) -> torch.Tensor:
        """Scalar ``-mean(voxel_map)`` in ``[-1, 0]``."""
        return -self.voxel_map(fixed, warped).mean()

    def force(self, fixed: torch.Tensor, warped: torch.Tensor) -> torch.Tensor:
        """ANTs' CC force ``2 s_FW / (s_FF s_WW) · ((F − F̄) − s_FW / s_WW · (W − W̄)) · ∇W``."""
        return self._force(fixed, warped, None)

    def force_towards(self, fixed: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """:meth:`force` towards ``fixed`` (``(B, 1, Z, Y, X)``), its local means computed once."""
        means = self._fixed_means(fixed)
        return lambda warped: self._force(fixed, warped, means)

    def _force(
        self, fixed: torch.Tensor, warped: torch.Tensor, fixed_means: tuple[torch.Tensor, torch.Tensor] | None
    ) -> torch.Tensor:
        """:meth:`force`; voxel by voxel after the window means and the gradient, so a large box is worked through
        in z-slabs (:func:`in_slabs`; the same values)."""
        means = self._window_means(fixed, warped, fixed_means)
        gradient = spatial_gradient(warped.float())[:, 0]
        out = torch.empty_like(gradient)
        for slab in z_slabs(gradient.shape[2], whole=not in_slabs(gradient)):
            z = (slice(None), slice(None), slab)
            f, w = fixed[z], warped[z]
            f_mean, ff, w_mean, ww, fw = (m[z] for m in means)
            var_f, var_w, cov = self._moments(f_mean, ff, w_mean, ww, fw)
            coef = 2.0 * cov / (var_f * var_w + self.eps) * ((f - f_mean) - cov / (var_w + self.eps) * (w - w_mean))
            out[z] = coef * gradient[z]
        return out


_SIX_NEIGHBOURS = ((0, 1, 1), (1, 1, 0), (1, 0, 1), (1, 1, 2), (2, 1, 1), (1, 2, 1))
"""The six face neighbours of the centre ``(1, 1, 1)`` of a 3³ cube."""

MIND_PAIRS: tuple[tuple[tuple[int, int, int], tuple[int, int, int]], ...] = tuple(
    (a, b)
    for i, a in enumerate(_SIX_NEIGHBOURS)
    for b in _SIX_NEIGHBOURS[i + 1 :]
    if sum((p - q) ** 2 for p, q in zip(a, b, strict=True)) == 2
)
"""The 12 pairs of face neighbours at squared distance 2 (the self-similarity context), in units of ``dilation``."""


MIND_VARIANCE_FLOOR = 1e-3
"""Smallest patch-distance scale ``V`` of :func:`mind_ssc`, for intensities normalised to 0..1 (about twice the
variance of noise of standard deviation 0.02: distances below it count as flat)."""


Offset = tuple[int, int, int]


def _context_differences(dilation: int) -> tuple[tuple[Offset, ...], tuple[tuple[int, Offset], ...]]:
    """The self-similarity context as six difference vectors and, per channel of :data:`MIND_PAIRS`, which of them
    it uses and where: channel ``(a, b)`` is ``(I(y + d·a') − I(y + d·b'))² = e_s(y + o)`` with ``e_s(z) = (I(z + s) −
    I(z))²``, ``s = ±d·(a − b)`` (the twelve pairs have six differences up to sign) and ``o`` the pair's point that
    ``s`` starts from (voxel offsets ``(z, y, x)``)."""
    vectors: list[Offset] = []
    channels: list[tuple[int, Offset]] = []
    for a, b in MIND_PAIRS:
        point_a: Offset = (dilation * (a[0] - 1), dilation * (a[1] - 1), dilation * (a[2] - 1))
        point_b: Offset = (dilation * (b[0] - 1), dilation * (b[1] - 1), dilation * (b[2] - 1))
        s: Offset = (point_a[0] - point_b[0], point_a[1] - point_b[1], point_a[2] - point_b[2])
        origin = point_b
        if (-s[0], -s[1], -s[2]) in vectors:
            s, origin = (-s[0], -s[1], -s[2]), point_a
        if s not in vectors:
            vectors.append(s)
        channels.append((vectors.index(s), origin))
    return tuple(vectors), tuple(channels)


def _crop(x: torch.Tensor, first: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """The view of ``(B, C, Z, Y, X)`` from voxel ``first`` with ``shape`` voxels along ``(z, y, x)``."""
    return x[(slice(None), slice(None), *(slice(f, f + n) for f, n in zip(first, shape, strict=True)))]


def _window_sums(x: torch.Tensor, window: int) -> torch.Tensor:
    """Sums over cubes of ``window`` voxels that lie wholly inside ``(B, C, Z, Y, X)``: each axis shrinks by
    ``window − 1`` (separable: one sum of shifted views per axis)."""
    for dim in (2, 3, 4):
        n = x.shape[dim] - window + 1
        total = x.narrow(dim, 0, n).clone()
        for k in range(1, window):
            total.add_(x.narrow(dim, k, n))
        x = total
    return x


def mind_ssc(image: torch.Tensor, radius: int = 1, dilation: int = 2) -> torch.Tensor:
    """MIND-SSC descriptor of ``(B, 1, Z, Y, X)`` → ``(B, 12, Z, Y, X)`` in ``(0, 1]``.

    For each pair ``(a, b)`` of :data:`MIND_PAIRS`, ``D = mean over the (2 radius + 1)³ window of (I(x + d·a') −
    I(x + d·b'))²`` (``a' = a − (1, 1, 1)``, ``d = dilation``; the image extended by replicating its border, as
    far as the neighbours and the window reach); the descriptor is ``exp(−(D − min_c D) / V)`` with ``V`` the
    mean of ``D − min_c D`` over the 12 channels, at least :data:`MIND_VARIANCE_FLOOR` (flat background does not
    divide by zero, and no image-wide statistic enters, so a value depends only on voxels within ``dilation +
    radius``).

    The twelve pairs have six differences up to sign (:func:`_context_differences`): each squared difference
    image and its window sums are computed once and cropped for its two channels (about three times faster than
    twelve of each on CPU). Without autograd the last steps run in place.
    """
    image = image.float()
    shape = tuple(image.shape[2:])
    pad = dilation + radius
    window = 2 * radius + 1
    padded = F.pad(image, [pad] * 6, mode="replicate")
    full = tuple(padded.shape[2:])
    vectors, channels = _context_differences(dilation)
    sums = []
    for s in vectors:  # e_s(z) = (I(z + s) − I(z))² wherever z and z + s lie in the padded image
        low = [max(0, -c) for c in s]
        size = [n - abs(c) for n, c in zip(full, s, strict=True)]
        start, end = _crop(padded, low, size), _crop(padded, [lo + c for lo, c in zip(low, s, strict=True)], size)
        sums.append((_window_sums((end - start).square(), window) * (1.0 / window**3), low))
    distances = []
    for k, origin in channels:  # the window around x + o starts at padded index x + o + pad − radius
        mean, low = sums[k]
        first = [o + pad - radius - lo for o, lo in zip(origin, low, strict=True)]
        distances.append(_crop(mean, first, shape))
    ssd = torch.cat(distances, dim=1)
    if ssd.requires_grad:
        ssd = ssd - ssd.amin(dim=1, keepdim=True)
        variance = ssd.mean(dim=1, keepdim=True).clamp_min(MIND_VARIANCE_FLOOR)
        return torch.exp(-ssd / variance)
    ssd.sub_(ssd.amin(dim=1, keepdim=True))
    variance = ssd.mean(dim=1, keepdim=True).clamp_min_(MIND_VARIANCE_FLOOR)
    return ssd.div_(variance).neg_().exp_()


class MindSSC:
    """``s = −mean_c (m_F,c − m_W,c)²`` with ``m`` the :func:`mind_ssc` descriptor (in ``[−1, 0]``).

    Args:
        radius: half-width of the patch-distance window (voxels).
        dilation: distance of the six neighbours from the centre (voxels).
        force_gain: the force is multiplied by this, so that a polish gain tuned for :class:`LocalNCC`'s force
            moves about as far per step (see ``docs/method.md``).
    """

    name = "mind"

    def __init__(self, radius: int = 1, dilation: int = 2, force_gain: float = 1.0) -> None:
        self.radius = int(radius)
        self.dilation = int(dilation)
        self.force_gain = float(force_gain)

    @property
    def reach(self) -> int:
        """Voxels a value depends on in each direction (neighbours, the window, the descriptor's gradient)."""
        return self.dilation + self.radius + 1

    def voxel_map(self, fixed: torch.Tensor, warped: torch.Tensor) -> torch.Tensor:
        """``(B, 1, Z, Y, X)`` similarity in ``[−1, 0]`` of two ``(B, 1, Z, Y, X)`` images."""
        diff = mind_ssc(fixed, self.radius, self.dilation) - mind_ssc(warped, self.radius, self.dilation)
        return -diff.square().mean(dim=1, keepdim=True)

    def loss(self, fixed: torch.Tensor, warped: torch.Tensor) -> torch.Tensor:
        """Scalar ``-mean(voxel_map)`` in ``[0, 1]``."""
        return -self.voxel_map(fixed, warped).mean()

    def force(self, fixed: torch.Tensor, warped: torch.Tensor) -> torch.Tensor:
        """``force_gain · (2 / 12) Σ_c (m_F,c − m_W,c) ∇ m_W,c``."""
        return self.force_towards(fixed)(warped)

    def force_towards(self, fixed: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """:meth:`force` towards ``fixed`` (``(B, 1, Z, Y, X)``), its descriptor ``(B, 12, Z, Y, X)`` computed once."""
        m_f = mind_ssc(fixed, self.radius, self.dilation)
        return lambda warped: self._force(m_f, warped)

    def _force(self, m_f: torch.Tensor, warped: torch.Tensor) -> torch.Tensor:
        m_w = mind_ssc(warped, self.radius, self.dilation)
        gradient = spatial_gradient(m_w)  # (B, 12, 3, Z, Y, X)
        force = ((m_f - m_w).unsqueeze(2) * gradient).sum(dim=1)
        return self.force_gain * 2.0 / m_f.shape[1] * force


SIMILARITIES = ("ncc", "mind")
"""Names :func:`make_similarity` accepts."""


def make_similarity(name: str, radius: int | None = None) -> Similarity:
    """The similarity called ``name`` (``"ncc"`` or ``"mind"``), with its window half-width ``radius``
    (None: the similarity's default)."""
    if name == "ncc":
        return LocalNCC() if radius is None else LocalNCC(radius)
    if name == "mind":
        return MindSSC() if radius is None else MindSSC(radius)
    raise ValueError(f"similarity {name!r} is unknown: use one of {', '.join(SIMILARITIES)}.")
