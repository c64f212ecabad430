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
