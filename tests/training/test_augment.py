"""Tests of panseg.training.augment: replay, identities, geometry of the spatial transform, intensity statistics."""

from __future__ import annotations

import math
from dataclasses import fields, replace

import pytest
import torch
import torch.nn.functional as F

from panseg.config import AugmentConfig
from panseg.training import augment as A

SHAPE = (12, 16, 20)  # (D, H, W): small, non-cubic, so axis mix-ups show


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _all(p: float, mirror: float | None = None, **changes) -> AugmentConfig:
    """Every probability set to p (mirroring to `mirror` if given)."""
    probs = {f.name: p for f in fields(AugmentConfig) if f.name.startswith("p_")}
    if mirror is not None:
        probs["p_mirror"] = mirror
    return replace(AugmentConfig(), **{**probs, **changes})


def _batch(b: int = 2, shape=SHAPE, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = _gen(seed)
    image = torch.rand((b, 1, *shape), generator=g)
    label = torch.randint(0, 15, (b, 1, *shape), generator=g, dtype=torch.uint8)
    return image, label


def _no(b: int) -> torch.Tensor:
    return torch.zeros(b, dtype=torch.bool)


def _yes(b: int) -> torch.Tensor:
    return torch.ones(b, dtype=torch.bool)


def _cube_pair(shape=(24, 24, 24), value: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """A centred box whose image intensity is 1 exactly where its label is `value`."""
    label = torch.zeros((1, 1, *shape), dtype=torch.uint8)
    d, h, w = shape
    label[..., d // 4: 3 * d // 4, h // 4: 3 * h // 4, w // 4: 3 * w // 4] = value
    return (label == value).float(), label


# ----------------------------------------------------------------------------------------------
# Replay, identity, shapes
# ----------------------------------------------------------------------------------------------


def test_same_seed_replays_and_equals_apply_of_sampled_params():
    image, label = _batch()
    cfg = _all(1.0, mirror=0.5)
    first = A.augment_batch(image, label, cfg, _gen(123))
    second = A.augment_batch(image, label, cfg, _gen(123))
    replayed = A.apply(image, label, A.sample_params(cfg, 2, _gen(123), image.device))
    for out in (second, replayed):
        assert torch.equal(first[0], out[0]) and torch.equal(first[1], out[1])
    other = A.augment_batch(image, label, cfg, _gen(124))
    assert not torch.equal(first[0], other[0])


def test_inputs_are_not_modified():
    image, label = _batch()
    before = image.clone(), label.clone()
    A.augment_batch(image, label, _all(1.0, mirror=1.0), _gen(1))
    assert torch.equal(image, before[0]) and torch.equal(label, before[1])


def test_probability_zero_is_identity_and_disabled_returns_inputs():
    image, label = _batch()
    out_image, out_label = A.augment_batch(image, label, _all(0.0), _gen(5))
    assert torch.equal(out_image, image) and torch.equal(out_label, label)
    disabled = replace(_all(1.0), enabled=False)
    same = A.augment_batch(image, label, disabled, _gen(5))
    assert same[0] is image and same[1] is label
    assert not A.sample_params(disabled, 2, _gen(5)).spatial.apply.any()


@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int64])
def test_shapes_and_dtypes_preserved(label_dtype):
    image, label = _batch()
    out_image, out_label = A.augment_batch(image, label.to(label_dtype), _all(1.0, mirror=0.5), _gen(2))
    assert out_image.shape == image.shape and out_image.dtype == torch.float32
    assert out_label.shape == label.shape and out_label.dtype == label_dtype
    assert torch.isfinite(out_image).all()


def test_bad_inputs_are_rejected_with_a_message():
    image, label = _batch()
    with pytest.raises(ValueError, match="share B, D, H, W"):
        A.augment_batch(image, label[:, :, :-1], _all(1.0), _gen())
    with pytest.raises(ValueError, match="integer or bool"):
        A.augment_batch(image, label.float(), _all(1.0), _gen())
    with pytest.raises(ValueError, match="batch of 3"):
        A.apply(image, label, A.sample_params(_all(1.0), 3, _gen()))


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------


def test_sampled_rates_and_ranges_follow_the_config():
    cfg = AugmentConfig()
    p = A.sample_params(cfg, 20000, _gen(3))
    assert abs(p.noise.apply.float().mean() - cfg.p_noise) < 0.015
    assert abs(p.spatial.apply.float().mean() - (1 - (1 - cfg.p_rotation) * (1 - cfg.p_scale))) < 0.015
    assert abs(p.mirror.flip.float().mean() - cfg.p_mirror) < 0.015
    assert p.spatial.angles_rad.abs().max() <= math.radians(cfg.rotation_deg)
    assert (p.spatial.angles_rad[~p.spatial.apply] == 0).all() and (p.spatial.scale[~p.spatial.apply] == 1).all()
    low, high = cfg.gamma_range
    gamma = p.gamma.gamma
    assert low <= gamma.min() and gamma.max() <= high
    assert abs((gamma < 1).float().mean() - 0.5) < 0.02  # BGContrast: half below 1 despite (0.7, 1.5)
    assert ((p.noise.std ** 2 >= cfg.noise_variance[0]) & (p.noise.std ** 2 <= cfg.noise_variance[1] + 1e-7)).all()


# ----------------------------------------------------------------------------------------------
# Spatial
# ----------------------------------------------------------------------------------------------


def _spatial(angles_deg, scale=1.0) -> A.SpatialParams:
    angles = torch.tensor([angles_deg], dtype=torch.float32).deg2rad()
    return A.SpatialParams(apply=_yes(1), angles_rad=angles, scale=torch.tensor([scale]))


def test_grid_matches_torch_affine_grid():
    theta = torch.randn(2, 3, 4)
    ours = A.affine_grid(theta, SHAPE)
    torch_grid = F.affine_grid(theta, (2, 1, *SHAPE), align_corners=False)
    assert torch.allclose(ours, torch_grid, atol=1e-5)


def test_identity_affine_reproduces_input_and_crops_centre():
    image, label = _batch(1)
    out_image, out_label = A.apply_spatial(image, label, _spatial((0, 0, 0)))
    assert torch.allclose(out_image, image, atol=1e-5) and torch.equal(out_label, label)
    crop = (7, 10, 20)
    out_image, out_label = A.apply_spatial(image, label, _spatial((0, 0, 0)), out_size_zyx=crop)
    assert torch.allclose(out_image, image[:, :, 2:9, 3:13, :], atol=1e-5)
    assert torch.equal(out_label, label[:, :, 2:9, 3:13, :])


def test_quarter_turn_about_z_is_rot90_in_the_yx_plane():
    image, label = _batch(1, shape=(6, 10, 10))
    out_image, out_label = A.apply_spatial(image, label, _spatial((90, 0, 0)))
    turned = [torch.rot90(label, k, dims=(3, 4)) for k in (1, -1)]
    assert any(torch.equal(out_label, t) for t in turned)
    assert any(torch.allclose(out_image, torch.rot90(image, k, dims=(3, 4)), atol=1e-4) for k in (1, -1))


def test_rotation_keeps_labels_nearest_and_aligned_with_image():
    image, label = _cube_pair()
    out_image, out_label = A.apply_spatial(image, label, _spatial((20, -25, 15), scale=0.9))
    assert set(out_label.unique().tolist()) <= {0, 7}
    assert not torch.equal(out_label, label)  # it did move
    inside, outside = out_label == 7, out_label == 0
    assert (out_image[inside] > 0.5).float().mean() > 0.97
    assert (out_image[outside] < 0.5).float().mean() > 0.97
    expected_volume = (label == 7).sum() / 0.9 ** 3  # a grid factor below 1 zooms in
    assert abs(inside.sum() / expected_volume - 1) < 0.05


def test_rotation_does_not_shear_non_cubic_patches():
    """A ball is rotation invariant; a wrong normalisation would squash it into an ellipsoid."""
    shape = (16, 28, 40)
    z, y, x = torch.meshgrid(*[torch.arange(s) - (s - 1) / 2 for s in shape], indexing="ij")
    label = ((z ** 2 + y ** 2 + x ** 2) <= 6.5 ** 2).to(torch.uint8)[None, None]
    _, out_label = A.apply_spatial(label.float(), label, _spatial((40, 35, -30)))
    overlap = (out_label & label).sum() / (out_label | label).sum()
    assert overlap > 0.9


def test_only_selected_samples_are_resampled():
    image, label = _batch(2)
    params = A.SpatialParams(apply=torch.tensor([False, True]), angles_rad=torch.full((2, 3), 0.3), scale=torch.ones(2))
    out_image, out_label = A.apply_spatial(image, label, params)
    assert torch.equal(out_image[0], image[0]) and torch.equal(out_label[0], label[0])
    assert not torch.equal(out_label[1], label[1])


# ----------------------------------------------------------------------------------------------
# Mirroring
# ----------------------------------------------------------------------------------------------


def test_mirror_flips_image_and_label_together_per_sample():
    d, h, w = SHAPE
    image = torch.zeros((2, 1, *SHAPE))
    label = torch.zeros((2, 1, *SHAPE), dtype=torch.uint8)
    image[:, 0, 1, 2, 3], label[:, 0, 1, 2, 3] = 1.0, 14
    flip = torch.tensor([[True, False, False], [False, True, True]])
    out_image, out_label = A.apply_mirror(image, label, A.MirrorParams(flip=flip))
    assert out_image[0, 0, d - 2, 2, 3] == 1 and out_label[0, 0, d - 2, 2, 3] == 14
    assert out_image[1, 0, 1, h - 3, w - 4] == 1 and out_label[1, 0, 1, h - 3, w - 4] == 14
    assert out_image.sum() == 2 and (out_label > 0).sum() == 2


# ----------------------------------------------------------------------------------------------
# Intensity
# ----------------------------------------------------------------------------------------------


def test_intensity_transforms_never_change_labels():
    image, label = _batch()
    cfg = _all(1.0, mirror=0.0, p_rotation=0.0, p_scale=0.0)
    out_image, out_label = A.augment_batch(image, label, cfg, _gen(7))
    assert torch.equal(out_label, label)
    assert not torch.allclose(out_image, image)


def test_noise_has_the_sampled_variance_per_sample():
    cfg = _all(0.0, p_noise=1.0, noise_variance=(0.01, 0.1))
    params = A.sample_params(cfg, 2, _gen(11))
    image = torch.full((2, 1, 24, 32, 32), 0.5)
    out = A.apply_noise(image, params.noise)
    measured = (out - image).var(dim=(1, 2, 3, 4))
    expected = params.noise.std ** 2
    assert torch.allclose(measured, expected, rtol=0.05)
    assert abs(expected[0] - expected[1]) > 1e-3  # the two samples really differ


def test_blur_reduces_white_noise_variance_as_its_kernel_predicts():
    noise = torch.randn((2, 1, 24, 32, 32), generator=_gen(4))
    sigma = torch.tensor([[0.5, 0.5, 0.5], [1.0, 0.8, 0.6]])
    out = A.apply_blur(noise, A.BlurParams(apply=_yes(2), sigma=sigma))
    inner = (slice(None), slice(None), slice(4, -4), slice(4, -4), slice(4, -4))  # away from the padding
    ratio = out[inner].var(dim=(1, 2, 3, 4)) / noise[inner].var(dim=(1, 2, 3, 4))
    # White noise through a separable filter keeps the product over axes of sum(w ** 2).
    predicted = torch.stack([
        torch.prod(torch.stack([(A.gaussian_kernels(s[a:a + 1]) ** 2).sum() for a in range(3)]))
        for s in sigma
    ])
    assert (ratio < 0.5).all()
    assert torch.allclose(ratio, predicted, rtol=0.1)


def test_brightness_uses_each_samples_multiplier():
    image, _ = _batch()
    params = A.BrightnessParams(apply=_yes(2), multiplier=torch.tensor([0.8, 1.2]))
    out = A.apply_brightness(image, params)
    assert torch.allclose(out[0], image[0] * 0.8) and torch.allclose(out[1], image[1] * 1.2)


def test_contrast_scales_around_mean_within_the_original_range():
    image, _ = _batch()
    params = A.ContrastParams(apply=_yes(2), factor=torch.tensor([0.75, 1.25]))
    out = A.apply_contrast(image, params)
    for i in range(2):
        assert out[i].min() >= image[i].min() and out[i].max() <= image[i].max()
    assert abs(out[0].mean() - image[0].mean()) < 1e-4  # no clipping when shrinking: mean kept
    assert out[0].std() < image[0].std() < out[1].std()


def test_lowres_changes_the_image_coarsely():
    image, _ = _batch(2)
    params = A.LowResParams(apply=_yes(2), zoom=torch.tensor([1.0, 0.5]))
    out = A.apply_lowres(image, params)
    assert torch.allclose(out[0], image[0], atol=1e-6)  # zoom 1: nothing to simulate
    assert out[1].shape == image[1].shape and out[1].std() < image[1].std()


@pytest.mark.parametrize("invert", [False, True])
def test_gamma_keeps_min_max_and_retain_stats_keeps_mean_std(invert):
    image = torch.rand((2, 1, 8, 12, 16), generator=_gen(9)) * 2 - 0.5
    gamma = torch.tensor([0.7, 1.5])
    plain = A.apply_gamma(image, A.GammaParams(_yes(2), gamma, invert=invert, retain_stats=False))
    dims = (1, 2, 3, 4)
    assert torch.allclose(plain.amin(dim=dims), image.amin(dim=dims), atol=1e-5)
    assert torch.allclose(plain.amax(dim=dims), image.amax(dim=dims), atol=1e-5)
    assert not torch.allclose(plain, image, atol=1e-3)
    kept = A.apply_gamma(image, A.GammaParams(_yes(2), gamma, invert=invert, retain_stats=True))
    assert torch.allclose(kept.mean(dim=dims), image.mean(dim=dims), atol=1e-5)
    assert torch.allclose(kept.std(dim=dims), image.std(dim=dims), atol=1e-5)
    unchanged = A.apply_gamma(image, A.GammaParams(_yes(2), torch.ones(2), invert=invert, retain_stats=False))
    assert torch.allclose(unchanged, image, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Batches and the augmenter
# ----------------------------------------------------------------------------------------------


def test_batch_of_two_gets_different_params():
    image, label = _batch(1)
    pair_image, pair_label = image.repeat(2, 1, 1, 1, 1), label.repeat(2, 1, 1, 1, 1)
    out_image, _ = A.augment_batch(pair_image, pair_label, _all(1.0, mirror=0.5), _gen(21))
    assert not torch.allclose(out_image[0], out_image[1])


def test_augmenter_replays_by_seed_and_rank_and_resumes_from_state():
    image, label = _batch()
    cfg = _all(0.5)
    a, b = A.BatchAugmenter(cfg, seed=3), A.BatchAugmenter(cfg, seed=3)
    other_rank = A.BatchAugmenter(cfg, seed=3, rank=1)
    assert torch.equal(a(image, label)[0], b(image, label)[0])
    assert not torch.equal(a(image, label)[0], other_rank(image, label)[0])
    state = a.state_dict()
    expected = a(image, label)
    resumed = A.BatchAugmenter(cfg, seed=99)
    resumed.load_state_dict(state)
    got = resumed(image, label)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_out_size_crops_every_sample():
    image, label = _batch(2, shape=(16, 20, 24))
    augmenter = A.BatchAugmenter(_all(0.5), seed=0, out_size_zyx=(8, 12, 16))
    out_image, out_label = augmenter(image, label)
    assert out_image.shape == (2, 1, 8, 12, 16) and out_label.shape == (2, 1, 8, 12, 16)
