"""nnU-Net's training augmentations, batched in torch so they run on the training device.

Every transform follows TorchIO's pattern: `sample_params` draws all random numbers of a batch from a
seeded `torch.Generator` into small frozen `*Params` records, and deterministic `apply_*` functions use
them. So `augment_batch(image, label, cfg, torch.Generator().manual_seed(s))` equals
`apply(image, label, sample_params(cfg, batch, torch.Generator().manual_seed(s), device))`, and any
batch can be replayed from its seed.

Tensors: `image` (B, C, D, H, W) floating (CT scaled to about [0, 1]); `label` (B, C, D, H, W)
integer or bool, the same B, D, H, W. Labels are only ever resampled nearest-neighbour and intensity
transforms never touch them. Parameters are per sample; a sample a transform skips costs nothing.

Order and defaults follow nnU-Net v2's `get_training_transforms` (batchgeneratorsv2):
spatial (rotation about all three axes + isotropic scaling, one affine) -> Gaussian noise -> Gaussian
blur -> multiplicative brightness -> contrast -> low-resolution simulation -> inverted gamma -> gamma
-> mirroring. Documented choices:
- Spatial padding: outside the patch the image is 0 (nnU-Net's `padding_mode_image="zeros"`; with
  panseg's [-160, 240] HU -> [0, 1] scaling, 0 is -160 HU or below, like air) and the label is 0.
  `image_padding="border"` is available. Pass a larger input and `out_size_zyx` (as nnU-Net samples
  an enlarged patch) to keep rotated corners inside real data.
- Scaling multiplies the sampling grid (nnU-Net's convention): a factor above 1 zooms out.
- Gamma: like nnU-Net, rescale to [0, 1] by the sample's min/max, apply the gamma, restore min/max;
  with `retain_stats` (nnU-Net: `p_retain_stats=1`; `cfg.gamma_retain_stats` once that field exists)
  the mean and std are then restored too, so min/max are exact only without it. The inverted variant
  negates the image around both steps; as in nnU-Net it is a separate pass before the plain one.
- Brightness, contrast and gamma factors are drawn nnU-Net's `BGContrast` way: half the time below 1,
  half above, so a range like (0.7, 1.5) is not biased towards brightening.
- Noise: `noise_variance` is a variance (std = sqrt); nnU-Net feeds the same number in as a std.
- Blur: an independent sigma per axis (nnU-Net: `synchronize_axes=False`), truncated at 4 sigma
  (scipy's default), replicate padding.
- Probabilities are per sample, as given. nnU-Net also applies blur and low-res only with
  `p_per_channel=0.5`, so its effective rates are half of `p_blur` and `p_lowres`.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, fields, replace
from typing import Literal

import torch
import torch.nn.functional as F

from panseg.config import AugmentConfig

Tensor = torch.Tensor
SPATIAL_DIMS = (2, 3, 4)  # D, H, W of a (B, C, D, H, W) tensor
_BLUR_TRUNCATE = 4.0  # kernel radius in sigmas, as scipy.ndimage.gaussian_filter (nnU-Net v1)


# ----------------------------------------------------------------------------------------------
# Parameter records: one per transform, tensors with a leading batch axis.
# ----------------------------------------------------------------------------------------------


class _Params:
    """Shared behaviour of the parameter records: moving their tensors to a device."""

    def to(self, device: torch.device | str):
        values = {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]
        moved = {k: v.to(device) for k, v in values.items() if isinstance(v, (Tensor, _Params))}
        return replace(self, **moved)  # type: ignore[type-var]


@dataclass(frozen=True)
class SpatialParams(_Params):
    """apply (B,) bool; angles_rad (B, 3) rotation about the z, y, x axes; scale (B,) grid factor."""
    apply: Tensor
    angles_rad: Tensor
    scale: Tensor


@dataclass(frozen=True)
class NoiseParams(_Params):
    """apply (B,) bool; std (B,) noise standard deviation; seed (B,) int64 seed of each sample's noise."""
    apply: Tensor
    std: Tensor
    seed: Tensor


@dataclass(frozen=True)
class BlurParams(_Params):
    """apply (B,) bool; sigma (B, 3) Gaussian sigma in voxels along z, y, x."""
    apply: Tensor
    sigma: Tensor


@dataclass(frozen=True)
class BrightnessParams(_Params):
    """apply (B,) bool; multiplier (B,)."""
    apply: Tensor
    multiplier: Tensor


@dataclass(frozen=True)
class ContrastParams(_Params):
    """apply (B,) bool; factor (B,) scaling around the mean, result clipped to the original range."""
    apply: Tensor
    factor: Tensor


@dataclass(frozen=True)
class LowResParams(_Params):
    """apply (B,) bool; zoom (B,) downsampling factor, the same on every axis (nnU-Net)."""
    apply: Tensor
    zoom: Tensor


@dataclass(frozen=True)
class GammaParams(_Params):
    """apply (B,) bool; gamma (B,); invert: negate around the gamma; retain_stats: restore mean/std."""
    apply: Tensor
    gamma: Tensor
    invert: bool
    retain_stats: bool


@dataclass(frozen=True)
class MirrorParams(_Params):
    """flip (B, 3) bool: flip along z, y, x."""
    flip: Tensor


@dataclass(frozen=True)
class AugmentParams(_Params):
    """Everything one batch's augmentation drew; `apply` replays it exactly."""
    spatial: SpatialParams
    noise: NoiseParams
    blur: BlurParams
    brightness: BrightnessParams
    contrast: ContrastParams
    lowres: LowResParams
    gamma_inverted: GammaParams
    gamma: GammaParams
    mirror: MirrorParams

    @property
    def batch_size(self) -> int:
        return int(self.mirror.flip.shape[0])


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------


def _coin(p: float, n: int, g: torch.Generator) -> Tensor:
    return torch.rand(n, generator=g, device=g.device) < p


def _uniform(low: float, high: float, shape: tuple[int, ...], g: torch.Generator) -> Tensor:
    return low + (high - low) * torch.rand(shape, generator=g, device=g.device)


def _bg_contrast(value_range: tuple[float, float], n: int, g: torch.Generator) -> Tensor:
    """nnU-Net's BGContrast: with p 0.5 uniform in [low, 1], else in [1, high] (for a range around 1)."""
    low, high = value_range
    below = _uniform(low, min(1.0, high), (n,), g)
    above = _uniform(max(low, 1.0), high, (n,), g)
    p_below = 0.5 if low < 1.0 < high else float(high <= 1.0)  # a range on one side of 1 is plain uniform
    return torch.where(_coin(p_below, n, g), below, above)


def _disabled(cfg: AugmentConfig) -> AugmentConfig:
    """`cfg` with every probability 0: the same draws are made, nothing is applied."""
    return replace(cfg, **{f.name: 0.0 for f in fields(cfg) if f.name.startswith("p_")})


def sample_params(
    cfg: AugmentConfig, batch_size: int, generator: torch.Generator, device: torch.device | str | None = None
) -> AugmentParams:
    """Draw one batch's augmentation parameters from `generator`, its only source of randomness.

    Draws happen on the generator's device in a fixed order and number (independent of the
    probabilities), then move to `device` (default: the generator's). `cfg.enabled=False` gives
    parameters that change nothing.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, but it is {batch_size}")
    if not cfg.enabled:
        cfg = _disabled(cfg)
    g, n = generator, batch_size
    max_angle = math.radians(cfg.rotation_deg)
    rotate = _coin(cfg.p_rotation, n, g)
    angles = _uniform(-max_angle, max_angle, (n, 3), g) * rotate[:, None]
    zoom = _coin(cfg.p_scale, n, g)
    scale = torch.where(zoom, _uniform(*cfg.scale_range, (n,), g), torch.ones(n, device=g.device))
    spatial = SpatialParams(apply=rotate | zoom, angles_rad=angles, scale=scale)
    noise = NoiseParams(
        apply=_coin(cfg.p_noise, n, g),
        std=_uniform(*cfg.noise_variance, (n,), g).clamp_min(0.0).sqrt(),
        seed=torch.randint(0, 2**62, (n,), generator=g, device=g.device),
    )
    blur = BlurParams(apply=_coin(cfg.p_blur, n, g), sigma=_uniform(*cfg.blur_sigma, (n, 3), g))
    brightness = BrightnessParams(_coin(cfg.p_brightness, n, g), _bg_contrast(cfg.brightness_range, n, g))
    contrast = ContrastParams(_coin(cfg.p_contrast, n, g), _bg_contrast(cfg.contrast_range, n, g))
    lowres = LowResParams(_coin(cfg.p_lowres, n, g), _uniform(*cfg.lowres_zoom, (n,), g))
    retain = cfg.gamma_retain_stats  # nnU-Net: p_retain_stats=1
    gamma_inverted = GammaParams(_coin(cfg.p_gamma_inverted, n, g), _bg_contrast(cfg.gamma_range, n, g), True, retain)
    gamma = GammaParams(_coin(cfg.p_gamma, n, g), _bg_contrast(cfg.gamma_range, n, g), False, retain)
    mirror = MirrorParams(flip=torch.rand((n, 3), generator=g, device=g.device) < cfg.p_mirror)
    params = AugmentParams(spatial, noise, blur, brightness, contrast, lowres, gamma_inverted, gamma, mirror)
    return params.to(device if device is not None else g.device)


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def _selected(mask: Tensor) -> Tensor:
    """Indices (n,) of the samples a transform applies to."""
    return mask.nonzero().flatten()


def _per_sample(values: Tensor, like: Tensor) -> Tensor:
    """(n,) -> (n, 1, 1, 1, 1) in `like`'s dtype, to broadcast over (n, C, D, H, W)."""
    return values.to(like.dtype).view(-1, 1, 1, 1, 1)


def _center_crop(x: Tensor, size_zyx: tuple[int, int, int]) -> Tensor:
    """The centred (.., *size_zyx) window of x (x itself when the size already matches)."""
    if tuple(x.shape[2:]) == tuple(size_zyx):
        return x
    window = [slice((n - m) // 2, (n - m) // 2 + m) for n, m in zip(x.shape[2:], size_zyx)]
    return x[:, :, window[0], window[1], window[2]]


# ----------------------------------------------------------------------------------------------
# Spatial: rotation + scaling as one affine, resampled once
# ----------------------------------------------------------------------------------------------


def _axis_rotation(angle: Tensor, i: int, j: int) -> Tensor:
    """(n, 3, 3) rotations by `angle` (n,) in the plane of axes i and j."""
    m = torch.eye(3, dtype=angle.dtype, device=angle.device).repeat(angle.shape[0], 1, 1)
    c, s = torch.cos(angle), torch.sin(angle)
    m[:, i, i], m[:, i, j], m[:, j, i], m[:, j, j] = c, -s, s, c
    return m


def spatial_matrix(params: SpatialParams) -> Tensor:
    """(B, 3, 3) maps an output voxel offset from the patch centre (z, y, x) to the input offset.

    Rotation about z (the y-x plane), then y (z-x), then x (z-y), times the isotropic scale.
    """
    angles = params.angles_rad.to(torch.float64)  # float64: 90-degree turns land exactly on voxels
    about_z, about_y, about_x = (_axis_rotation(angles[:, 0], 1, 2), _axis_rotation(angles[:, 1], 0, 2),
                                 _axis_rotation(angles[:, 2], 0, 1))
    rotation = about_z @ about_y @ about_x
    return rotation * params.scale.to(torch.float64).view(-1, 1, 1)


def affine_theta(matrix: Tensor, in_zyx: tuple[int, ...], out_zyx: tuple[int, ...]) -> Tensor:
    """`F.affine_grid`'s theta (n, 3, 4) for a voxel-space matrix (n, 3, 3) about the patch centres.

    affine_grid works in normalised coordinates (align_corners=False: u = 2 * offset / size), so the
    voxel matrix is conjugated by the sizes; without that a rotation would shear non-cubic patches.
    The small translation matches `_center_crop`'s rounding when in - out is odd.
    """
    n_in = torch.tensor(in_zyx, dtype=matrix.dtype, device=matrix.device)
    n_out = torch.tensor(out_zyx, dtype=matrix.dtype, device=matrix.device)
    linear = matrix * n_out.view(1, 1, 3) / n_in.view(1, 3, 1)  # diag(1/n_in) @ M @ diag(n_out)
    shift = torch.floor((n_in - n_out) / 2) - (n_in - n_out) / 2  # 0 or -0.5 voxel
    translation = (2 * shift / n_in).expand(matrix.shape[0], 3)
    theta_zyx = torch.cat([linear, translation[:, :, None]], dim=2)  # (n, 3, 4), rows/cols in z, y, x
    return theta_zyx[:, [2, 1, 0]][:, :, [2, 1, 0, 3]]  # affine_grid orders coordinates x, y, z


def affine_grid(theta: Tensor, out_zyx: tuple[int, ...]) -> Tensor:
    """Same result as `F.affine_grid(theta, (n, 1, *out_zyx), align_corners=False)`, (n, D, H, W, 3).

    Built as a sum of three broadcast axis terms: affine_grid's batched matmul over every voxel is
    several times slower on CPU than the grid_sample it feeds.
    """
    d, h, w = out_zyx
    axis = [(torch.arange(s, device=theta.device, dtype=theta.dtype) * 2 + 1) / s - 1 for s in out_zyx]
    t = theta.view(-1, 1, 1, 1, 3, 4)  # (n, 1, 1, 1, xyz, 4)
    x_term = axis[2].view(1, 1, 1, w, 1) * t[..., 0]
    y_term = axis[1].view(1, 1, h, 1, 1) * t[..., 1]
    z_term = axis[0].view(1, d, 1, 1, 1) * t[..., 2] + t[..., 3]
    return (x_term + y_term) + z_term  # (n, D, H, W, 3)


def apply_spatial(image: Tensor, label: Tensor, params: SpatialParams, out_size_zyx: tuple[int, int, int] | None = None,
                  image_padding: Literal["zeros", "border"] = "zeros") -> tuple[Tensor, Tensor]:
    """Rotate and scale the selected samples about the patch centre; centre-crop the others.

    The image is resampled trilinearly, the label nearest-neighbour with 0 outside, both on one grid.
    `out_size_zyx` (default: the input size) may be smaller than the input, as nnU-Net does.
    """
    out_zyx = tuple(out_size_zyx) if out_size_zyx is not None else tuple(image.shape[2:])
    if any(o > i for o, i in zip(out_zyx, image.shape[2:])):
        raise ValueError(f"out_size_zyx must fit in the input {tuple(image.shape[2:])}, but it is {out_zyx}")
    image_out, label_out = _center_crop(image, out_zyx), _center_crop(label, out_zyx)
    idx = _selected(params.apply)
    if idx.numel() == 0:
        return image_out, label_out
    theta = affine_theta(spatial_matrix(params)[idx.to(params.apply.device)], tuple(image.shape[2:]), out_zyx)
    grid = affine_grid(theta.to(device=image.device, dtype=torch.float32), out_zyx)
    moved = F.grid_sample(image[idx].float(), grid, mode="bilinear", padding_mode=image_padding, align_corners=False)
    # Labels go through float32 (exact for integers below 2**24); nearest never mixes two ids.
    moved_label = F.grid_sample(label[idx].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    image_out = image_out.index_copy(0, idx, moved.to(image.dtype))
    return image_out, label_out.index_copy(0, idx, moved_label.to(label.dtype))


# ----------------------------------------------------------------------------------------------
# Intensity transforms: image only
# ----------------------------------------------------------------------------------------------


def apply_noise(image: Tensor, params: NoiseParams) -> Tensor:
    """Add zero-mean Gaussian noise of std `params.std` to the selected samples.

    Each sample's noise comes from its own seed, so it does not depend on the rest of the batch.
    """
    idx = _selected(params.apply)
    if idx.numel() == 0:
        return image
    noisy = []
    for i in idx.tolist():
        g = torch.Generator(device=image.device).manual_seed(int(params.seed[i]))
        noise = torch.randn(image.shape[1:], generator=g, device=image.device, dtype=image.dtype)
        noisy.append(image[i] + float(params.std[i]) * noise)
    return image.index_copy(0, idx, torch.stack(noisy))


def gaussian_kernels(sigma: Tensor, truncate: float = _BLUR_TRUNCATE) -> Tensor:
    """(n, K) normalised 1-D Gaussians for sigmas (n,), on a shared odd support K sized for the largest."""
    radius = max(1, math.ceil(truncate * float(sigma.max())))
    offsets = torch.arange(-radius, radius + 1, device=sigma.device, dtype=sigma.dtype)
    kernels = torch.exp(-0.5 * (offsets[None, :] / sigma[:, None]) ** 2)
    return kernels / kernels.sum(dim=1, keepdim=True)


def _blur_axis(x: Tensor, kernels: Tensor, axis: int) -> Tensor:
    """Convolve each channel of x (1, N, D, H, W) along `axis` (0..2) with its own kernel (N, K)."""
    n, k = kernels.shape
    weight_shape = [n, 1, 1, 1, 1]
    weight_shape[2 + axis] = k
    pad = [0] * 6  # F.pad lists the last axis first: (W, W, H, H, D, D)
    pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = k // 2
    return F.conv3d(F.pad(x, pad, mode="replicate"), kernels.view(weight_shape), groups=n)


def apply_blur(image: Tensor, params: BlurParams) -> Tensor:
    """Separable Gaussian blur of the selected samples, one sigma per sample and axis."""
    idx = _selected(params.apply)
    if idx.numel() == 0:
        return image
    x = image[idx]
    n, c = x.shape[:2]
    y = x.reshape(1, n * c, *x.shape[2:])  # (1, n*C, D, H, W): one conv group per sample-channel
    sigma = params.sigma[idx.to(params.sigma.device)].to(device=image.device, dtype=image.dtype)
    for axis in range(3):
        kernels = gaussian_kernels(sigma[:, axis]).repeat_interleave(c, dim=0)  # (n*C, K)
        y = _blur_axis(y, kernels, axis)
    return image.index_copy(0, idx, y.reshape(x.shape))  # (n, C, D, H, W)


def apply_brightness(image: Tensor, params: BrightnessParams) -> Tensor:
    """Multiply the selected samples by their multiplier."""
    idx = _selected(params.apply)
    if idx.numel() == 0:
        return image
    return image.index_copy(0, idx, image[idx] * _per_sample(params.multiplier[idx], image))


def _stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per sample and channel minimum and maximum, (n, C, 1, 1, 1) each."""
    return x.amin(dim=SPATIAL_DIMS, keepdim=True), x.amax(dim=SPATIAL_DIMS, keepdim=True)


def apply_contrast(image: Tensor, params: ContrastParams) -> Tensor:
    """nnU-Net's contrast: scale around the mean by `factor`, clip to the original min/max."""
    idx = _selected(params.apply)
    if idx.numel() == 0:
        return image
    x = image[idx]
    mean = x.mean(dim=SPATIAL_DIMS, keepdim=True)
    low, high = _stats(x)
    y = ((x - mean) * _per_sample(params.factor[idx], x) + mean).clamp(low, high)
    return image.index_copy(0, idx, y)


def apply_lowres(image: Tensor, params: LowResParams) -> Tensor:
    """Simulate a coarser scan: downsample by `zoom` (nearest), upsample back (trilinear)."""
    idx = _selected(params.apply)
    if idx.numel() == 0:
        return image
    size = tuple(image.shape[2:])
    blurred = []
    for i in idx.tolist():  # each sample has its own coarse shape, so they cannot share a call
        coarse = [max(1, round(s * float(params.zoom[i]))) for s in size]
        down = F.interpolate(image[i:i + 1], size=coarse, mode="nearest-exact")
        blurred.append(F.interpolate(down, size=size, mode="trilinear", align_corners=False)[0])
    return image.index_copy(0, idx, torch.stack(blurred))


def apply_gamma(image: Tensor, params: GammaParams) -> Tensor:
    """nnU-Net's gamma: x -> ((x - min) / range) ** gamma * range + min, per sample and channel.

    With `invert`, the image is negated before and after (bright structures get the dark treatment).
    With `retain_stats`, the result is shifted and scaled back to the input's mean and std.
    """
    idx = _selected(params.apply)
    if idx.numel() == 0:
        return image
    x = -image[idx] if params.invert else image[idx]
    low, high = _stats(x)
    span = high - low
    unit = ((x - low) / span.clamp_min(1e-7)).clamp_min(0.0)  # clamp: rounding can dip below 0
    y = unit.pow(_per_sample(params.gamma[idx], x)) * span + low
    if params.retain_stats:
        mean, std = x.mean(dim=SPATIAL_DIMS, keepdim=True), x.std(dim=SPATIAL_DIMS, keepdim=True)
        y_mean, y_std = y.mean(dim=SPATIAL_DIMS, keepdim=True), y.std(dim=SPATIAL_DIMS, keepdim=True)
        y = (y - y_mean) * (std / y_std.clamp_min(1e-8)) + mean
    return image.index_copy(0, idx, -y if params.invert else y)


def apply_mirror(image: Tensor, label: Tensor, params: MirrorParams) -> tuple[Tensor, Tensor]:
    """Flip image and label together along each axis the sample's `flip` selects."""
    flips = params.flip.tolist()  # one host read; each sample then does all its flips in one pass
    if not any(any(row) for row in flips):
        return image, label
    dims = [[1 + a for a in range(3) if row[a]] for row in flips]  # D, H, W of a (C, D, H, W) sample
    image = torch.stack([x.flip(d) if d else x for x, d in zip(image, dims)])
    label = torch.stack([y.flip(d) if d else y for y, d in zip(label, dims)])
    return image, label


# ----------------------------------------------------------------------------------------------
# The whole pipeline
# ----------------------------------------------------------------------------------------------


def check_inputs(image: Tensor, label: Tensor) -> None:
    """Raise ValueError unless image and label are a (B, C, D, H, W) floating / integer pair."""
    shapes = f"{tuple(image.shape)} and {tuple(label.shape)}"
    if image.ndim != 5 or label.ndim != 5:
        raise ValueError(f"image and label must be (B, C, D, H, W), but they are {shapes}")
    if image.shape[0] != label.shape[0] or image.shape[2:] != label.shape[2:]:
        raise ValueError(f"image and label must share B, D, H, W, but they are {shapes}")
    if not image.is_floating_point():
        raise ValueError(f"the image must be floating point, but it is {image.dtype}")
    if label.is_floating_point() or label.is_complex():
        raise ValueError(f"the label must be integer or bool (it is only resampled nearest), but it is {label.dtype}")
    if image.device != label.device:
        raise ValueError(f"image and label must be on one device, but they are on {image.device} and {label.device}")


def apply(image: Tensor, label: Tensor, params: AugmentParams, out_size_zyx: tuple[int, int, int] | None = None,
          image_padding: Literal["zeros", "border"] = "zeros") -> tuple[Tensor, Tensor]:
    """Apply drawn parameters in nnU-Net's order; returns new (image, label), inputs untouched.

    Replay is exact on the same kind of device (CPU and CUDA noise generators differ).
    """
    check_inputs(image, label)
    if params.batch_size != image.shape[0]:
        raise ValueError(f"the parameters are for a batch of {params.batch_size}, "
                         f"but the image has {image.shape[0]} samples")
    params = params.to(image.device)
    image, label = apply_spatial(image, label, params.spatial, out_size_zyx, image_padding)
    image = apply_noise(image, params.noise)
    image = apply_blur(image, params.blur)
    image = apply_brightness(image, params.brightness)
    image = apply_contrast(image, params.contrast)
    image = apply_lowres(image, params.lowres)
    image = apply_gamma(image, params.gamma_inverted)
    image = apply_gamma(image, params.gamma)
    return apply_mirror(image, label, params.mirror)


def augment_batch(image: Tensor, label: Tensor, cfg: AugmentConfig, generator: torch.Generator,
                  out_size_zyx: tuple[int, int, int] | None = None) -> tuple[Tensor, Tensor]:
    """Draw parameters for this batch from `generator` and apply them.

    With `cfg.enabled=False` the inputs come back as they are (centre-cropped to `out_size_zyx` if given).
    """
    check_inputs(image, label)
    if not cfg.enabled:
        out_zyx = tuple(out_size_zyx) if out_size_zyx is not None else tuple(image.shape[2:])
        return _center_crop(image, out_zyx), _center_crop(label, out_zyx)
    params = sample_params(cfg, image.shape[0], generator, image.device)
    return apply(image, label, params, out_size_zyx)


def stream_seed(seed: int, rank: int, stream: str = "augment") -> int:
    """A 63-bit seed for one named random stream of one rank, decorrelated from the others."""
    digest = hashlib.sha256(f"panseg:{stream}:{seed}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class BatchAugmenter:
    """Holds the config and a CPU generator seeded from (seed, rank); call it on each batch.

    Its `state_dict` goes into checkpoints so a resumed run draws the same augmentations.
    """

    def __init__(self, cfg: AugmentConfig, seed: int, rank: int = 0,
                 out_size_zyx: tuple[int, int, int] | None = None) -> None:
        self.cfg = cfg
        self.out_size_zyx = out_size_zyx
        # CPU: parameter draws are tiny, and a CPU generator's state is portable across devices.
        self.generator = torch.Generator().manual_seed(stream_seed(seed, rank))

    def __call__(self, image: Tensor, label: Tensor) -> tuple[Tensor, Tensor]:
        return augment_batch(image, label, self.cfg, self.generator, self.out_size_zyx)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


__all__ = [
    "AugmentParams", "BatchAugmenter", "BlurParams", "BrightnessParams", "ContrastParams", "GammaParams",
    "LowResParams", "MirrorParams", "NoiseParams", "SpatialParams", "affine_grid", "affine_theta", "apply",
    "apply_blur", "apply_brightness", "apply_contrast", "apply_gamma", "apply_lowres", "apply_mirror",
    "apply_noise", "apply_spatial", "augment_batch", "check_inputs", "gaussian_kernels", "sample_params",
    "spatial_matrix", "stream_seed",
]
