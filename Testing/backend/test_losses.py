"""cnnreg.losses: box filter, LNCC, MSE, PCC, SSIM, MI and the named losses (2D and 3D)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from cnnreg import losses
from cnnreg.errors import InputError
from cnnreg.settings import Similarity


def _rand(shape, seed=0, dtype=torch.float64):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _blobs(synth, shape, seed=1, dtype=torch.float64):
    array = synth.blob_array(shape, seed=seed, count=8)
    return torch.from_numpy(array / array.max()).to(dtype)[None, None]


def _brute_force_box(x: np.ndarray, window: int) -> np.ndarray:
    """Mean over the voxels of a window^ndim box around each voxel that lie inside the image."""
    radius = window // 2
    ndim = x.ndim - 2
    out = np.zeros_like(x)
    for index in itertools.product(*[range(n) for n in x.shape[2:]]):
        box = tuple(slice(max(i - radius, 0), i + radius + 1) for i in index)
        out[(slice(None), slice(None), *index)] = x[(slice(None), slice(None), *box)].mean(
            axis=tuple(range(2, 2 + ndim))
        )
    return out


# --------------------------------------------------------------------------------------
# box filter
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, window",
    [((1, 2, 7, 9), 3), ((2, 1, 6, 5), 5), ((1, 1, 5, 6, 7), 3), ((1, 2, 4, 5, 3), 5), ((1, 1, 6, 6), 1)],
)
def test_box_filter_equals_brute_force_windowed_mean(shape, window):
    x = _rand(shape, seed=sum(shape))
    np.testing.assert_allclose(losses.box_filter(x, window).numpy(), _brute_force_box(x.numpy(), window), atol=1e-12)


def test_box_filter_hand_value_at_a_corner():
    # a ramp x[i, j] = j on a 5 x 5 grid, window 3: the corner box clips to columns {0, 1}
    # -> mean 0.5; an edge box at column 2 holds columns {1, 2, 3} -> 2; the last column {3, 4} -> 3.5
    ramp = torch.arange(5, dtype=torch.float64).repeat(5, 1)[None, None]
    out = losses.box_filter(ramp, 3)
    assert abs(float(out[0, 0, 0, 0]) - 0.5) < 1e-12
    assert abs(float(out[0, 0, 0, 2]) - 2.0) < 1e-12
    assert abs(float(out[0, 0, 4, 4]) - 3.5) < 1e-12
    # constants stay constant up to the border (no zero padding)
    assert torch.allclose(
        losses.box_filter(torch.ones(1, 1, 5, 5, dtype=torch.float64), 3), torch.ones(1, 1, 5, 5, dtype=torch.float64)
    )


# --------------------------------------------------------------------------------------
# LNCC
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(32, 32), (16, 16, 16)], ids=["2d", "3d"])
def test_lncc_self_scaled_and_shifted(shape):
    image = _rand((1, 1, *shape), seed=3)  # texture: local variance ~ 1/12 everywhere
    window = 5
    self_value = float(losses.lncc_similarity(image, image, window=window))
    assert self_value > 0.99
    # pure scaling: still ~1 over the whole image
    assert abs(float(losses.lncc_similarity(image, 2.5 * image, window=window)) - self_value) < 2e-3
    # a shifted copy of an uncorrelated texture: local correlation is near zero
    shifted = torch.roll(image, 3, dims=-1)
    assert float(losses.lncc_similarity(image, shifted, window=window)) < 0.2


@pytest.mark.parametrize("a, b", [(2.0, 0.5), (0.5, 0.2), (3.0, -1.0)])
def test_lncc_is_invariant_to_affine_intensity_change_inside(a, b):
    image = _rand((1, 1, 32, 32), seed=4)
    window = 5
    inner = torch.zeros_like(image)
    inner[..., window // 2 : -(window // 2), window // 2 : -(window // 2)] = 1
    value = float(losses.lncc_similarity(image, a * image + b, inner, window=window))
    assert value > 0.99


def test_lncc_is_invariant_to_intensity_offset_over_the_whole_image():
    image = _rand((1, 1, 32, 32), seed=4)
    self_value = float(losses.lncc_similarity(image, image))
    assert abs(float(losses.lncc_similarity(image, 2.0 * image + 0.5)) - self_value) < 2e-3


def test_lncc_of_a_smooth_image_with_itself_is_one_where_it_is_not_flat(synth):
    image = _blobs(synth, (32, 34))
    mean = losses.box_filter(image, 9)
    variance = losses.box_filter(image * image, 9) - mean * mean
    textured = (variance.clamp_min(0).sqrt() > 0.05).to(image.dtype)  # local std > 5 % of the range
    assert float(textured.mean()) > 0.5
    assert float(losses.lncc_similarity(image, image, textured)) > 0.99


def test_lncc_is_squared_so_negation_also_scores_one():
    # cc = cov^2 / (var var): a locally inverted image is "locally linearly related" too
    image = _rand((1, 1, 24, 24), seed=5)
    assert (
        abs(
            float(losses.lncc_similarity(image, -image, window=5))
            - float(losses.lncc_similarity(image, image, window=5))
        )
        < 1e-9
    )


def test_lncc_mask_and_window_validation():
    image = _rand((1, 1, 16, 16), seed=6)
    other = _rand((1, 1, 16, 16), seed=7)
    mask = torch.zeros_like(image)
    mask[..., :8] = 1
    # masked value = mean of the local cc map over the mask; compare with halves of the full map
    cc_left = float(losses.lncc_similarity(image, other, mask, window=3))
    cc_right = float(losses.lncc_similarity(image, other, 1 - mask, window=3))
    cc_all = float(losses.lncc_similarity(image, other, window=3))
    assert abs(0.5 * (cc_left + cc_right) - cc_all) < 1e-12
    for window in (0, 4, -3):
        with pytest.raises(InputError, match="odd"):
            losses.lncc_similarity(image, other, window=window)


# --------------------------------------------------------------------------------------
# PCC, SSIM, MSE, MI
# --------------------------------------------------------------------------------------


def test_pcc_hand_values():
    fixed = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64).view(1, 1, 2, 2)
    warped = torch.tensor([1.0, 3.0, 2.0, 4.0], dtype=torch.float64).view(1, 1, 2, 2)
    # deviations from the mean 2.5: (-1.5, -0.5, 0.5, 1.5) and (-1.5, 0.5, -0.5, 1.5)
    # cov = 2.25 - 0.25 - 0.25 + 2.25 = 4, var = 5 each -> r = 4 / 5 = 0.8
    assert abs(float(losses.pcc_similarity(fixed, warped)) - 0.8) < 1e-9
    assert abs(float(losses.pcc_similarity(fixed, fixed)) - 1.0) < 1e-9
    assert abs(float(losses.pcc_similarity(fixed, -fixed)) + 1.0) < 1e-9
    assert abs(float(losses.pcc_similarity(fixed, 3 * fixed + 7)) - 1.0) < 1e-9


def test_pcc_with_mask_and_batch():
    fixed = _rand((2, 1, 8, 8), seed=8)
    warped = fixed.clone()
    warped[1] = -warped[1]  # item 0 -> +1, item 1 -> -1, mean 0
    assert abs(float(losses.pcc_similarity(fixed, warped))) < 1e-9
    # outside the mask the images are unrelated; inside identical -> 1
    noise = _rand((1, 1, 8, 8), seed=9)
    image = _rand((1, 1, 8, 8), seed=10)
    mask = torch.zeros_like(image)
    mask[..., :4, :] = 1
    mixed = torch.where(mask > 0, image, noise)
    assert abs(float(losses.pcc_similarity(image, mixed, mask)) - 1.0) < 1e-9
    assert float(losses.pcc_similarity(image, mixed)) < 0.9


@pytest.mark.parametrize("shape", [(24, 26), (12, 13, 14)], ids=["2d", "3d"])
def test_ssim_identity_is_one_and_changes_lower_it(synth, shape):
    image = _blobs(synth, shape)
    assert abs(float(losses.ssim_similarity(image, image)) - 1.0) < 1e-9
    assert float(losses.ssim_similarity(image, image + 0.2)) < 0.99  # luminance term
    assert float(losses.ssim_similarity(image, torch.roll(image, 2, -1))) < 0.95


def test_mse_hand_values():
    fixed = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    warped = torch.tensor([[1.0, 1.0], [3.0, 3.0]], dtype=torch.float64).view(1, 1, 2, 2)
    assert abs(float(losses.mse_similarity(fixed, warped)) - (1 + 1 + 9 + 9) / 4) < 1e-12  # 5
    mask = torch.tensor([[1.0, 1.0], [0.0, 0.0]], dtype=torch.float64).view(1, 1, 2, 2)
    assert abs(float(losses.mse_similarity(fixed, warped, mask)) - 1.0) < 1e-12
    # weights: 1 on the first row, 0.5 on the second -> (1 + 1 + 0.5 * 9 * 2) / (1 + 1 + 0.5 + 0.5) = 11 / 3
    weights = torch.tensor([[1.0, 1.0], [0.5, 0.5]], dtype=torch.float64).view(1, 1, 2, 2)
    assert abs(float(losses.mse_similarity(fixed, warped, weights)) - 11 / 3) < 1e-12


@pytest.mark.parametrize("shape", [(32, 34), (20, 22, 18)], ids=["2d", "3d"])
def test_mutual_information(synth, shape):
    image = _blobs(synth, shape, dtype=torch.float32)
    noise = _rand(image.shape, seed=11, dtype=torch.float32)
    shuffled = image.flatten()[torch.randperm(image.numel(), generator=torch.Generator().manual_seed(1))].view_as(image)
    self_mi = float(losses.mutual_information(image, image))
    assert self_mi > 0.5
    assert float(losses.mutual_information(image, noise)) < 0.2 * self_mi
    assert float(losses.mutual_information(image, shuffled)) < 0.2 * self_mi
    # each image is rescaled to [0, 1] first: an affine intensity map changes nothing
    assert abs(float(losses.mutual_information(image, 3.0 * image + 2.0)) - self_mi) < 1e-4 * self_mi
    # a monotone non-linear map moves values between bins but keeps most of the information
    assert abs(float(losses.mutual_information(image, image.sqrt())) - self_mi) < 0.1 * self_mi
    # symmetric
    other = torch.roll(image, 2, -1)
    assert abs(float(losses.mutual_information(image, other)) - float(losses.mutual_information(other, image))) < 1e-4


def test_mutual_information_subsampling_is_seeded(synth):
    image = _blobs(synth, (40, 40), dtype=torch.float32)
    other = torch.roll(image, 3, -2)
    torch.manual_seed(5)
    a = float(losses.mutual_information(image, other, max_samples=500))
    torch.manual_seed(5)
    b = float(losses.mutual_information(image, other, max_samples=500))
    assert a == b
    full = float(losses.mutual_information(image, other))
    assert abs(a - full) < 0.5 * full  # a 500-sample estimate of the same quantity


# --------------------------------------------------------------------------------------
# named losses
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(32, 34), (20, 22, 18)], ids=["2d", "3d"])
@pytest.mark.parametrize("name", [s.value for s in Similarity])
def test_similarity_loss_decreases_as_images_get_more_similar(synth, shape, name):
    image = _blobs(synth, shape, dtype=torch.float32)
    options = losses.similarity_options(name, 9)
    values = [
        float(losses.similarity_loss(name, image, torch.roll(image, shift, -1), **options)) for shift in (0, 1, 2, 4)
    ]
    assert all(a < b for a, b in zip(values, values[1:])), values
    # value and loss are the two faces of the same number
    value = float(losses.similarity_value(name, image, torch.roll(image, 2, -1), **options))
    expected_loss = {"mse": value, "mi": -value}.get(name, 1 - value)
    assert abs(values[2] - expected_loss) < 1e-6


@pytest.mark.parametrize("name", [s.value for s in Similarity])
def test_similarity_loss_has_a_gradient(synth, name):
    image = _blobs(synth, (20, 22), dtype=torch.float32)
    warped = torch.roll(image, 2, -1).requires_grad_(True)
    losses.similarity_loss(name, image, warped, **losses.similarity_options(name, 5)).backward()
    assert warped.grad is not None and torch.isfinite(warped.grad).all() and float(warped.grad.abs().max()) > 0


def test_similarity_accepts_enum_members(synth):
    image = _blobs(synth, (16, 16), dtype=torch.float32)
    assert float(losses.similarity_loss(Similarity.PCC, image, image)) == pytest.approx(0.0, abs=1e-6)


def test_pcc_ssim_is_one_for_identical_images_and_falls_with_misalignment(synth):
    """Chen et al.'s PCC+SSIM: 1 (both terms' maximum) for an image and itself, lower the further
    it is shifted, and PCC's part ignores a linear intensity change that SSIM's does not."""
    image = _blobs(synth, (20, 22))
    assert float(losses.similarity_value("pcc+ssim", image, image)) == pytest.approx(1.0, abs=1e-6)
    values = [float(losses.similarity_value("pcc+ssim", image, torch.roll(image, k, -1))) for k in (1, 3, 6)]
    assert values[0] > values[1] > values[2]
    brighter = float(losses.similarity_value("pcc+ssim", image, 2.0 * image + 0.1))
    assert values[0] < 1.0 and 0.5 < brighter < 1.0  # PCC 1, SSIM below 1


@pytest.mark.parametrize("function", [losses.similarity_loss, losses.similarity_value])
def test_unknown_similarity_names_raise_input_error(function):
    image = torch.zeros(1, 1, 4, 4)
    with pytest.raises(InputError, match="unknown similarity 'ncc'") as error:
        function("ncc", image, image)
    assert "lncc" in str(error.value)  # the valid choices are listed


def test_similarity_options_unknown_name_raises_input_error():
    with pytest.raises(InputError):
        losses.similarity_options("ncc", 9)


def test_similarity_options_only_lncc_takes_a_window():
    assert losses.similarity_options("lncc", 7) == {"window": 7}
    for name in ("mse", "pcc", "ssim", "mi", "pcc+ssim"):
        assert losses.similarity_options(name, 7) == {}


def test_the_lncc_loss_of_a_loop_keeps_the_fixed_means_and_gives_the_same_numbers():
    """similarity_loss_function('lncc') box-filters the fixed image once (an optimisation loop's
    fixed image does not change): loss and gradient bitwise those of the direct measure, and a
    fixed image changed in place, or another one, is filtered again."""
    from cnnreg.losses import lncc_similarity, similarity_loss_function

    generator = torch.Generator().manual_seed(3)
    fixed = torch.rand((1, 1, 13, 17, 11), generator=generator)
    moving = torch.rand((1, 1, 13, 17, 11), generator=generator)
    loss = similarity_loss_function("lncc", 5)

    def both(f):
        a, b = moving.clone().requires_grad_(True), moving.clone().requires_grad_(True)
        kept, direct = loss(f, a), 1 - lncc_similarity(f, b, window=5)
        kept.backward()
        direct.backward()
        return kept, direct, a.grad, b.grad

    for _ in range(2):  # the second call uses the kept means
        kept, direct, grad_kept, grad_direct = both(fixed)
        assert torch.equal(kept, direct) and torch.equal(grad_kept, grad_direct)
    fixed.mul_(0.5).add_(torch.rand(fixed.shape, generator=generator))  # changed in place
    kept, direct, _, _ = both(fixed)
    assert torch.equal(kept, direct)
    other = torch.rand(fixed.shape, generator=generator)
    kept, direct, _, _ = both(other)
    assert torch.equal(kept, direct) and not torch.equal(kept, loss(fixed, moving))
