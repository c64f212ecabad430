"""Sliding-window prediction: exact on models a person can check by hand."""

import pytest
import torch

from panseg.inference.sliding_window import gaussian_importance, sliding_window_logits, window_starts


class PlusOne(torch.nn.Module):
    """A 'network' whose logits are the input + 1 in every class channel."""

    def __init__(self, num_classes):
        super().__init__()
        self.num_classes = num_classes

    def forward(self, x):
        return (x + 1).repeat(1, self.num_classes, 1, 1, 1)


class Counting(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.windows = 0

    def forward(self, x):
        self.windows += x.shape[0]
        return [x, x[:, :, ::2, ::2, ::2]]  # deep-supervision style list


@pytest.mark.parametrize("size, window, step, expected", [
    (10, 10, 0.875, [0]),
    (8, 10, 0.875, [0]),
    (18, 10, 0.5, [0, 4, 8]),
    (20, 8, 0.875, [0, 6, 12]),
    (100, 16, 0.875, [0, 14, 28, 42, 56, 70, 84]),  # step 14 = 7/8 of 16 fits exactly
])
def test_window_starts_cover_the_axis_with_bounded_steps(size, window, step, expected):
    starts = window_starts(size, window, step)
    assert starts == expected
    assert starts[0] == 0 and starts[-1] + window >= size
    assert all(b - a <= int(window * step) for a, b in zip(starts, starts[1:]))


@pytest.mark.parametrize("shape", [(13, 17, 19), (5, 9, 30), (16, 32, 32)])
def test_plus_one_is_reproduced_exactly_on_odd_volumes(shape):
    torch.manual_seed(0)
    image = torch.rand(1, 1, *shape)
    out = sliding_window_logits(PlusOne(3), image, (8, 16, 16), num_classes=3, step_fraction=0.5,
                                windows_per_batch=3)
    assert out.shape == (3, *shape)
    torch.testing.assert_close(out, (image[0] + 1).repeat(3, 1, 1, 1))


def test_every_window_is_predicted_once_and_mirroring_is_consistent():
    model = Counting()
    image = torch.rand(1, 1, 20, 20, 20)
    out = sliding_window_logits(model, image, (8, 8, 8), num_classes=1, step_fraction=0.875, windows_per_batch=4)
    assert model.windows == 27  # 3 starts per axis: 0, 6, 12
    torch.testing.assert_close(out, image[0])
    mirrored = sliding_window_logits(model, image, (8, 8, 8), num_classes=1, mirror_axes=(0, 1, 2))
    torch.testing.assert_close(mirrored, image[0])  # the identity is mirror-invariant


def test_gaussian_peaks_at_the_centre_and_is_positive_everywhere():
    w = gaussian_importance((8, 9, 10), 0.125)
    assert w.shape == (8, 9, 10) and float(w.max()) == pytest.approx(1.0)
    assert float(w.min()) > 0
    assert w[4, 4, 5] > w[0, 4, 5] and w[4, 4, 5] > w[4, 0, 5]


class BatchSizes(torch.nn.Module):
    """A random 3x3x3 convolution that records the batch size of every pass."""

    def __init__(self, classes=2):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv3d(1, classes, 3, padding=1)
        self.sizes = []

    def forward(self, x):
        self.sizes.append(x.shape[0])
        return self.conv(x)


def test_fixed_batch_fills_the_last_pass_and_changes_no_logit():
    image = torch.rand(1, 1, 20, 20, 20)
    model = BatchSizes()
    free = sliding_window_logits(model, image, (8, 8, 8), num_classes=2, windows_per_batch=4)
    assert model.sizes == [4] * 6 + [3]  # 27 windows
    model.sizes.clear()
    fixed = sliding_window_logits(model, image, (8, 8, 8), num_classes=2, windows_per_batch=4, fixed_batch=True)
    assert model.sizes == [4] * 7
    torch.testing.assert_close(fixed, free)


def test_a_compiled_network_predicts_what_the_eager_one_does():
    from panseg.config import InferConfig
    from panseg.inference.predictor import NetworkLogits

    model = BatchSizes().eval()
    image = torch.rand(1, 1, 12, 20, 20)
    cpu = torch.device("cpu")
    eager = NetworkLogits(model, (8, 8, 8), 2, InferConfig(precision="fp32"), cpu)
    compiled = NetworkLogits(model, (8, 8, 8), 2, InferConfig(precision="fp32", compile=True), cpu)
    assert compiled.network is not model and eager.network is model
    torch.testing.assert_close(compiled(image), eager(image), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Against a hand-computed blend, with a network that sees its neighbours and is not symmetric
# ----------------------------------------------------------------------------------------------

BLEND_SHAPE = (13, 10, 11)
BLEND_WINDOW = (8, 8, 8)
# step 0.5 of 8 = at most 4 voxels; starts spread evenly from 0 to size - 8 (worked out by hand):
# z: 13 - 8 = 5 in ceil(5 / 4) = 2 steps of 2.5 -> 0, round(2.5) = 2, 5; y: 2 in 1 step -> 0, 2; x: 3 -> 0, 3
BLEND_STARTS = ([0, 2, 5], [0, 2], [0, 3])


def _hand_gaussian(window_zyx, sigma_scale=0.125) -> torch.Tensor:
    """exp(-d^2 / (2 sigma^2)) per axis about the window's centre (n - 1) / 2, sigma = n / 8, product, max 1."""
    axes = []
    for n in window_zyx:
        d = torch.arange(n, dtype=torch.float64) - (n - 1) / 2
        axes.append(torch.exp(-(d ** 2) / (2 * (n * sigma_scale) ** 2)))
    g = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    return (g / g.max()).float()


def _fixed_conv(classes=2) -> torch.nn.Module:
    """A 3x3x3 convolution with seeded weights: each output voxel depends on its neighbours (zero padding at
    the window's border), and no kernel is symmetric, so a misplaced or unflipped window shows."""
    torch.manual_seed(3)
    conv = torch.nn.Conv3d(1, classes, 3, padding=1)
    assert not torch.equal(conv.weight, torch.flip(conv.weight, [2, 3, 4]))
    return conv.eval()


def _hand_blend(model, image, window_fn) -> torch.Tensor:
    g = _hand_gaussian(BLEND_WINDOW)
    acc = torch.zeros((2, *BLEND_SHAPE))
    norm = torch.zeros(BLEND_SHAPE)
    for z in BLEND_STARTS[0]:
        for y in BLEND_STARTS[1]:
            for x in BLEND_STARTS[2]:
                sl = (slice(z, z + 8), slice(y, y + 8), slice(x, x + 8))
                with torch.no_grad():
                    out = window_fn(model, image[(0, slice(None)) + sl][None])[0]  # (K, 8, 8, 8)
                acc[(slice(None),) + sl] += out * g
                norm[sl] += g
    return acc / norm


def test_a_convolution_is_blended_as_computed_by_hand():
    assert [window_starts(s, 8, 0.5) for s in BLEND_SHAPE] == list(BLEND_STARTS)
    torch.testing.assert_close(gaussian_importance(BLEND_WINDOW, 0.125), _hand_gaussian(BLEND_WINDOW))
    model, image = _fixed_conv(), torch.rand(1, 1, *BLEND_SHAPE, generator=torch.Generator().manual_seed(0))
    out = sliding_window_logits(model, image, BLEND_WINDOW, num_classes=2, step_fraction=0.5, windows_per_batch=5)
    expected = _hand_blend(model, image, lambda m, w: m(w))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # and it is not the whole-volume convolution: the window borders show
        assert not torch.allclose(out, model(image)[0], atol=1e-3)


@pytest.mark.parametrize("axes", [(0,), (2,), (0, 1, 2)])
def test_mirroring_averages_the_flipped_predictions_of_an_asymmetric_network(axes):
    import itertools

    model, image = _fixed_conv(), torch.rand(1, 1, *BLEND_SHAPE, generator=torch.Generator().manual_seed(1))
    combos = [()] + [c for r in range(1, len(axes) + 1) for c in itertools.combinations(axes, r)]

    def mirrored(m, window):  # each flip of the window predicted and flipped back, then the mean
        outs = [torch.flip(m(torch.flip(window, [a + 2 for a in c])), [a + 2 for a in c]) for c in combos]
        return sum(outs) / len(outs)

    out = sliding_window_logits(model, image, BLEND_WINDOW, num_classes=2, step_fraction=0.5, mirror_axes=axes)
    torch.testing.assert_close(out, _hand_blend(model, image, mirrored), rtol=1e-5, atol=1e-6)
    plain = sliding_window_logits(model, image, BLEND_WINDOW, num_classes=2, step_fraction=0.5)
    assert not torch.allclose(out, plain, atol=1e-3)  # the network is not symmetric: mirroring changes it
