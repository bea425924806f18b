"""The self-supervised view augmentation (SimCLR / MoCo v2 stack), batched and seeded per image.

Random resized crop + horizontal flip (one ``grid_sample`` over the whole batch), colour jitter
(brightness, contrast, saturation, hue with per-image factors), random greyscale and Gaussian blur
(one grouped convolution with per-image kernels): no Python loop over images.

Every random choice for the item at position ``i`` of a global batch is drawn from a generator seeded
by the view key (a function of run seed and step) for the whole global batch and then indexed at
``i``: a process that holds only some positions computes exactly the views a single process would, and
a resumed run replays them.

Defaults follow the data: MoCo v2's stack (crop scale 0.08-1, jitter 0.4/0.4/0.4/0.1 at p=0.8, grey
p=0.2, blur p=0.5 with sigma 0.1-2 and a kernel of ~10% of the side) for images of 64 px and more;
for small images (28 px Fashion-MNIST, CIFAR) SimCLR's CIFAR variant: crop scale 0.2-1, no blur, and
on one channel only brightness and contrast. Unlike torchvision's ``ColorJitter`` the four jitters run
in a fixed order (brightness, contrast, saturation, hue); hue is a rotation of the chroma plane in
YIQ, the usual fast approximation of an HSV hue shift.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pydantic import Field

from synclone.config import StrictModel

_LUMA = (0.299, 0.587, 0.114)


class ViewConfig(StrictModel):
    """SSL view augmentation; ``None`` fields take the default for the image size (see module docstring)."""

    crop_scale: tuple[float, float] | None = Field(None, description="area fraction range of the random crop")
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = Field(0.5, ge=0, le=1)
    jitter_p: float = Field(0.8, ge=0, le=1)
    brightness: float = Field(0.4, ge=0)
    contrast: float = Field(0.4, ge=0)
    saturation: float = Field(0.4, ge=0)
    hue: float = Field(0.1, ge=0, le=0.5)
    grey_p: float = Field(0.2, ge=0, le=1)
    blur_p: float | None = Field(None, ge=0, le=1, description="default 0.5 from 64 px up, 0 below")
    blur_sigma: tuple[float, float] = (0.1, 2.0)


@dataclass(frozen=True)
class ViewSpec:
    """A :class:`ViewConfig` resolved for one image size and channel count."""

    size: tuple[int, int]
    channels: int
    crop_scale: tuple[float, float]
    crop_ratio: tuple[float, float]
    hflip: float
    jitter_p: float
    brightness: float
    contrast: float
    saturation: float
    hue: float
    grey_p: float
    blur_p: float
    blur_sigma: tuple[float, float]
    blur_kernel: int

    @classmethod
    def resolve(cls, cfg: ViewConfig, image_shape: tuple[int, int, int]) -> ViewSpec:
        c, h, w = (int(v) for v in image_shape)
        small = min(h, w) < 64
        rgb = c == 3
        kernel = max(3, int(0.1 * min(h, w)) // 2 * 2 + 1)
        return cls(size=(h, w), channels=c, crop_scale=tuple(cfg.crop_scale or ((0.2, 1.0) if small else (0.08, 1.0))),
                   crop_ratio=tuple(cfg.crop_ratio), hflip=cfg.hflip, jitter_p=cfg.jitter_p,
                   brightness=cfg.brightness, contrast=cfg.contrast, saturation=cfg.saturation if rgb else 0.0,
                   hue=cfg.hue if rgb else 0.0, grey_p=cfg.grey_p if rgb else 0.0,
                   blur_p=cfg.blur_p if cfg.blur_p is not None else (0.0 if small else 0.5),
                   blur_sigma=tuple(cfg.blur_sigma), blur_kernel=kernel)


@dataclass
class ViewParams:
    """The random choices for a global batch of ``n`` items (one row each)."""

    crop: torch.Tensor  # (n, 4): width, height (fractions of the side), centre x, centre y (fractions)
    flip: torch.Tensor  # (n,) bool
    jitter: torch.Tensor  # (n, 4): brightness, contrast, saturation factors and hue shift (identity when off)
    grey: torch.Tensor  # (n,) bool
    sigma: torch.Tensor  # (n,) blur sigma, 0 = no blur

    def take(self, idx: torch.Tensor) -> ViewParams:
        return ViewParams(self.crop[idx], self.flip[idx], self.jitter[idx], self.grey[idx], self.sigma[idx])


def sample_params(spec: ViewSpec, n: int, key: int) -> ViewParams:
    """Draw the choices for ``n`` items from one generator seeded by ``key`` (always in the same order)."""
    g = torch.Generator().manual_seed(int(key))

    def u(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(*shape, generator=g, dtype=torch.float64)

    area = u(*spec.crop_scale, n)
    log_r = u(math.log(spec.crop_ratio[0]), math.log(spec.crop_ratio[1]), n)
    ratio = log_r.exp()
    # torchvision retries out-of-bounds crops; clamping keeps the draw count fixed (one per image).
    w = (area * ratio).sqrt().clamp(max=1.0)
    h = (area / ratio).sqrt().clamp(max=1.0)
    cx = w / 2 + (1 - w) * torch.rand(n, generator=g, dtype=torch.float64)
    cy = h / 2 + (1 - h) * torch.rand(n, generator=g, dtype=torch.float64)
    flip = torch.rand(n, generator=g) < spec.hflip
    on = torch.rand(n, generator=g) < spec.jitter_p
    jit = torch.stack([u(1 - spec.brightness, 1 + spec.brightness, n), u(1 - spec.contrast, 1 + spec.contrast, n),
                       u(1 - spec.saturation, 1 + spec.saturation, n), u(-spec.hue, spec.hue, n)], 1)
    jit = torch.where(on[:, None], jit, torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64))
    grey = torch.rand(n, generator=g) < spec.grey_p
    blur = torch.rand(n, generator=g) < spec.blur_p
    sigma = torch.where(blur, u(*spec.blur_sigma, n), torch.zeros(n, dtype=torch.float64))
    return ViewParams(torch.stack([w, h, cx, cy], 1).float(), flip, jit.float(), grey, sigma.float())


def ssl_views(x: torch.Tensor, spec: ViewSpec, key: int, positions: torch.Tensor | None = None,
              total: int | None = None) -> torch.Tensor:
    """One augmented view of every image of ``x`` (N, C, H, W) in [0, 1].

    ``positions`` are the items' places in the global batch of ``total`` items (default: ``x`` is the
    whole batch); the choices of each item depend only on (``key``, its position).
    """
    n = x.shape[0]
    positions = torch.arange(n) if positions is None else positions.long()
    total = n if total is None else int(total)
    p = sample_params(spec, total, key).take(positions)
    return apply_views(x, p, spec)


def apply_views(x: torch.Tensor, p: ViewParams, spec: ViewSpec) -> torch.Tensor:
    """Crop + flip, jitter, grey, blur with the given per-image choices; output at ``spec.size``."""
    x = x.float()
    n = x.shape[0]
    dev = x.device
    w, h, cx, cy = (p.crop[:, i].to(dev) for i in range(4))
    sx = torch.where(p.flip.to(dev), -w, w)
    # The sampling grid of affine_grid(theta) for a scale-and-shift theta, built from two 1-D ramps.
    oh, ow = spec.size
    bx = (2 * torch.arange(ow, device=dev, dtype=x.dtype) + 1) / ow - 1
    by = (2 * torch.arange(oh, device=dev, dtype=x.dtype) + 1) / oh - 1
    gx = (sx[:, None] * bx + (2 * cx - 1)[:, None])[:, None, :].expand(n, oh, ow)
    gy = (h[:, None] * by + (2 * cy - 1)[:, None])[:, :, None].expand(n, oh, ow)
    grid = torch.stack([gx, gy], dim=-1)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    j = p.jitter.to(dev)
    x = (x * j[:, 0, None, None, None]).clamp_(0, 1)
    mean = _grey(x).mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * j[:, 1, None, None, None] + mean).clamp_(0, 1)
    if x.shape[1] == 3:
        if spec.saturation > 0:
            grey = _grey(x)
            x = ((x - grey) * j[:, 2, None, None, None] + grey).clamp_(0, 1)
        if spec.hue > 0:
            x = _hue_rotate(x, j[:, 3]).clamp_(0, 1)
        if spec.grey_p > 0:
            x = torch.where(p.grey.to(dev)[:, None, None, None], _grey(x).expand_as(x), x)
    if spec.blur_p > 0 and bool((p.sigma > 0).any()):
        sel = (p.sigma > 0).nonzero().flatten()  # only the images that are blurred pay for it
        x = x.index_copy(0, sel.to(dev), _blur(x[sel.to(dev)], p.sigma[sel].to(dev), spec.blur_kernel))
    return x.contiguous()


def _grey(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    w = torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


_RGB2YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def _hue_rotate(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the chroma (I, Q) plane by ``shift`` turns per image: one 3x3 matrix per image, one bmm."""
    m = _RGB2YIQ.to(x)
    a = 2 * math.pi * shift.to(x)
    rot = torch.zeros(len(a), 3, 3, dtype=x.dtype, device=x.device)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = a.cos(), -a.sin(), a.sin(), a.cos()
    full = torch.linalg.inv(m) @ rot @ m
    n, c, hh, ww = x.shape
    return torch.bmm(full, x.reshape(n, c, hh * ww)).view(n, c, hh, ww)


def _blur(x: torch.Tensor, sigma: torch.Tensor, k: int) -> torch.Tensor:
    """Separable Gaussian blur with a per-image sigma (sigma 0 = identity), reflect padding."""
    n, c, hh, ww = x.shape
    r = k // 2
    t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    s = sigma.clamp(min=1e-6)[:, None]
    ker = torch.exp(-0.5 * (t[None] / s) ** 2)
    ker = ker / ker.sum(1, keepdim=True)
    delta = (t == 0).to(x.dtype)[None].expand_as(ker)
    ker = torch.where((sigma > 0)[:, None], ker, delta)
    ker = ker.repeat_interleave(c, 0)  # (n * c, k)
    y = F.pad(x.reshape(1, n * c, hh, ww), (r, r, r, r), mode="reflect")
    y = F.conv2d(y, ker.view(n * c, 1, 1, k), groups=n * c)
    y = F.conv2d(y, ker.view(n * c, 1, k, 1), groups=n * c)
    return y.view(n, c, hh, ww)
