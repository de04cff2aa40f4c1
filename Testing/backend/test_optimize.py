"""the per-pair algorithms' parts (cnnreg.pyramid, cnnreg.phantom, cnnreg.field_optimizers), without a registration of images: the pyramid grids, the phantom
CNN's field and initialisation, the dense-field optimisers and the learning-rate schedule
(tested against torch's ``LambdaLR``), and that the dense-field modes never import
``torch._dynamo``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from cnnreg.pyramid import capped_shape, pyramid_shapes
from cnnreg.settings import (
    DEFAULT_ITERATIONS,
    DEFAULT_REFINE_ITERATIONS,
    LARGE_LEVEL_ITERATIONS,
    LARGE_LEVEL_VOXELS,
    Mode,
    OptimizationSettings,
    RegistrationSettings,
)


def test_pyramid_and_capped_shapes():
    assert pyramid_shapes((64, 64, 64), 3) == [(16, 16, 16), (32, 32, 32), (64, 64, 64)]
    assert pyramid_shapes((40, 40, 20), 3) == [(20, 20, 20), (40, 40, 20)]  # 20 < 32 is kept; stops at 20
    assert pyramid_shapes((20, 24), 3) == [(20, 24)]
    assert pyramid_shapes((65, 33), 2) == [(33, 17), (65, 33)]
    assert capped_shape((40, 40, 40), 32**3) == (32, 32, 32)
    assert capped_shape((20, 30), 10**4) == (20, 30)
    settings = OptimizationSettings(iterations=(40, 30, 20))
    assert settings.iterations_per_level(2) == [30, 20]
    assert settings.iterations_per_level(4) == [40, 40, 30, 20]
    assert OptimizationSettings(iterations=7).iterations_per_level(3) == [7, 7, 7]


def test_the_phantom_field_from_a_coarser_network_input():
    """``input_shape``: the network sees the pair resampled to it (once per pair of tensors),
    and its field, resized to the level's grid in the level's voxels, is added to the base."""
    from cnnreg.phantom import CNNField, phantom_network
    from cnnreg.spatial import resize_field, resize_image

    torch.manual_seed(0)
    network = phantom_network(3, 4)
    base = torch.randn(1, 3, 32, 24, 40)
    model = CNNField(network, base, 0.0, (16, 12, 20))
    network.head.weight.data.normal_(std=0.1)  # CNNField zeroed the head; a non-zero field to compare
    fixed, moving = torch.rand(1, 1, 32, 24, 40), torch.rand(1, 1, 32, 24, 40)
    seen = []
    network.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0]))
    with torch.no_grad():
        u = model(fixed, moving)
        again = model(fixed, moving)
        expected = base + resize_field(network(resize_image(torch.cat([moving, fixed], 1), (16, 12, 20))), (32, 24, 40))
        other = model(fixed.clone(), moving)
    assert seen[0].shape == (1, 2, 16, 12, 20) and seen[1] is seen[0]  # resampled once for the same tensors
    assert seen[3] is not seen[0]  # new tensors: resampled again
    assert u.shape == base.shape and again.equal(u) and other.equal(u)
    torch.testing.assert_close(u, expected)
    assert float((u - base).abs().max()) > 0.01


def test_the_phantom_network_keeps_its_features_from_vanishing():
    """Kaiming initialisation for LeakyReLU: the features that reach the zero head keep the
    input's scale (PyTorch's default initialisation left std 0.013 for an input of std 0.29,
    too little for the head's Adam steps to move the field)."""
    from cnnreg.phantom import phantom_network

    torch.manual_seed(0)
    network = phantom_network(3, 16)
    pair = torch.rand((1, 2, 64, 64, 64))
    features = []
    network.head.register_forward_hook(lambda module, inputs, output: features.append(inputs[0]))
    with torch.no_grad():
        field = network(pair)
    assert float(field.abs().max()) == 0.0  # the head starts at zero: u = base at every level start
    assert float(features[0].std()) > 0.5 * float(pair.std())


def test_the_learning_rate_warms_up_then_decays_to_the_final_fraction():
    from cnnreg.phantom import CNNField
    from cnnreg.pyramid import _learning_rate_factor

    factors = [_learning_rate_factor(step, 100, 0.1, warmup=10) for step in range(101)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.1)))
    assert factors[100] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))  # monotone after the warm-up
    assert _learning_rate_factor(0, 100, 0.1) == pytest.approx(1.0)  # dense fields: no warm-up
    assert CNNField.warmup_iterations > 0


def test_dense_field_optimizer_steps_follow_their_update_rules():
    from cnnreg.field_optimizers import GlobalAdam, GreedyFluid, set_learning_rate_factor

    gradient = torch.tensor([[[3.0, 0.0], [-4.0, 1.0]]])  # (1, ndim=2, 2 voxels): vectors (3, -4), (0, 1)
    for optimizer_class, expected in (
        # first Adam step: bias-corrected momentum = g, square = mean(g^2): a step of lr * g / rms(g)
        (GlobalAdam, -0.2 * 0.5 * gradient / gradient.pow(2).mean().sqrt()),
        # greedy, no smoothing: the voxel with the longest gradient vector (|(3, -4)| = 5) moves by lr
        (lambda params, lr: GreedyFluid(params, lr=lr, sigma=0.0), -0.2 * 0.5 * gradient / 5.0),
    ):
        p = torch.zeros(1, 2, 2, requires_grad=True)
        optimizer = optimizer_class([p], lr=0.2)
        set_learning_rate_factor(optimizer, 0.5)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1)
        p.grad = gradient.clone()
        optimizer.step()
        torch.testing.assert_close(p.detach(), expected)
        optimizer.zero_grad()
        assert p.grad is None
    set_learning_rate_factor(optimizer, 1.0)  # scales the initial rate, not the current one
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.2)


def test_learning_rate_factor_matches_torch_lambda_lr():
    from functools import partial

    from cnnreg.field_optimizers import set_learning_rate_factor
    from cnnreg.pyramid import _learning_rate_factor

    factor = partial(_learning_rate_factor, steps=8, final=0.1, warmup=2)
    p = torch.zeros(2, requires_grad=True)
    ours = torch.optim.Adam([{"params": [p], "lr": 0.3}], lr=0.3)
    reference = torch.optim.Adam([torch.zeros(2, requires_grad=True)], lr=0.3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(reference, factor)
    for step in range(8):
        set_learning_rate_factor(ours, factor(step))
        assert ours.param_groups[0]["lr"] == pytest.approx(reference.param_groups[0]["lr"])
        reference.step()
        scheduler.step()


def test_dense_field_registration_does_not_import_torch_dynamo(tmp_path, synth):
    # torch.optim optimisers import torch._dynamo when first built (1.4-2 s per process); the
    # Slicer module starts a process per registration
    import subprocess
    import sys

    fixed, moving = (synth.make_image(synth.blob_array((24, 20, 16), seed=s)) for s in (0, 1))
    sitk.WriteImage(fixed, str(tmp_path / "f.nii.gz"))
    sitk.WriteImage(moving, str(tmp_path / "m.nii.gz"))
    script = (
        "import sys, SimpleITK as sitk; from cnnreg.registration import register; "
        "from cnnreg.settings import RegistrationSettings, OptimizationSettings; "
        f"f, m = (sitk.ReadImage(str(p)) for p in ({str(tmp_path / 'f.nii.gz')!r}, {str(tmp_path / 'm.nii.gz')!r})); "
        "r = register(f, m, RegistrationSettings(mode='instance', device='cpu', "
        "optimization=OptimizationSettings(iterations=[2, 2], levels=2))); "
        "print(r.summary['iterations'], 'torch._dynamo' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == "False"


def test_the_default_schedule_runs_few_iterations_on_a_level_larger_than_the_budget():
    small, large = (64, 64, 64), (256, 256, 160)  # 0.26 M and 10.5 M voxels
    assert math.prod(small) <= LARGE_LEVEL_VOXELS < math.prod(large)
    defaults = OptimizationSettings()
    instance, phantom = DEFAULT_ITERATIONS[Mode.INSTANCE], DEFAULT_ITERATIONS[Mode.PHANTOM]
    assert defaults.iterations_per_level(3, Mode.INSTANCE, [(32,) * 3, small, large]) == [
        *instance[:2],
        LARGE_LEVEL_ITERATIONS,
    ]
    assert defaults.iterations_per_level(3, Mode.PHANTOM, [(16,) * 3, (32,) * 3, small]) == list(phantom)
    assert defaults.iterations_per_level(3, Mode.INSTANCE) == list(instance)  # no grid given
    # iterations that are set run as set, on any grid
    assert OptimizationSettings(iterations=[100, 60, 60]).iterations_per_level(
        3, Mode.INSTANCE, [(32,) * 3, small, large]
    ) == [100, 60, 60]


def test_learned_refine_by_default_runs_few_iterations_on_a_large_grid():
    settings = RegistrationSettings(mode="learned-refine")
    assert settings.refine_schedule(64**3) == [DEFAULT_REFINE_ITERATIONS]
    assert settings.refine_schedule(LARGE_LEVEL_VOXELS + 1) == [LARGE_LEVEL_ITERATIONS]
    assert settings.iterations_requested() == DEFAULT_REFINE_ITERATIONS
    # set: as set, on any grid
    assert RegistrationSettings(mode="learned-refine", refine_iterations=50).refine_schedule(10**8) == [50]
    assert RegistrationSettings(mode="learned-refine", refine_iterations=[30, 15]).refine_schedule(10**8) == [30, 15]


def test_a_registration_reports_the_schedule_its_grid_gave_it(synth, monkeypatch):
    """The default schedule on a grid over the budget (the budget lowered to this small pair's
    finest level): the finest level runs at most LARGE_LEVEL_ITERATIONS and the summary says so."""
    import cnnreg.settings
    from cnnreg.registration import register

    array = synth.blob_array((64, 64, 64), seed=4)  # levels of 16^3, 32^3 and 64^3 voxels
    fixed, moving = synth.make_image(array), synth.make_image(np.roll(array, 1, axis=0))
    monkeypatch.setattr(cnnreg.settings, "LARGE_LEVEL_VOXELS", 40**3)
    summary = register(fixed, moving, RegistrationSettings(device="cpu")).summary
    assert summary["iterations_requested"] == [*DEFAULT_ITERATIONS[Mode.INSTANCE][:2], LARGE_LEVEL_ITERATIONS]
    assert summary["iterations"][-1] <= LARGE_LEVEL_ITERATIONS and summary["levels"] == 3


def test_large_tensors_freed_in_an_optimisation_are_reused_instead_of_faulted_in_again(subprocess_env):
    """Inside reuse_freed_memory a tensor above glibc's mmap threshold soon reuses the pages of the one
    freed before it (outside, every such tensor faults in its 64 MiB afresh, ~16 000 pages); on
    leaving, the kept memory goes back to the system.  In a fresh interpreter: what this one
    allocated before would change the counts."""
    import json
    import subprocess
    import sys

    from cnnreg.device import _glibc

    if _glibc() is None:
        pytest.skip("glibc's allocator only")
    script = """
import json, resource, torch
from cnnreg.device import reuse_freed_memory

def faults_of_a_new_tensor():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(16 * 2**20)  # 64 MiB, every page written
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

def resident_mib():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096 / 2**20

outside = min(faults_of_a_new_tensor() for _ in range(3))
with reuse_freed_memory("cpu"):
    for _ in range(3):  # the heap grows at first (the small-chunk cache may have had a free slot or two)
        faults_of_a_new_tensor()
    inside = max(faults_of_a_new_tensor() for _ in range(3))
    kept = resident_mib()
after = resident_mib()
# blocks that overlap without nesting (two threads' runs): the setting lasts until the last one closes
first, second = reuse_freed_memory("cpu"), reuse_freed_memory("cpu")
first.__enter__()
second.__enter__()
for _ in range(3):
    faults_of_a_new_tensor()
first.__exit__(None, None, None)
overlapping = max(faults_of_a_new_tensor() for _ in range(3))
second.__exit__(None, None, None)
print(json.dumps({"outside": outside, "inside": inside, "kept": kept, "after": after, "overlapping": overlapping}))
"""
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True, env=subprocess_env
    )
    counts = json.loads(run.stdout.strip().splitlines()[-1])
    if counts["outside"] < 1000:
        pytest.skip("huge pages: few page faults either way")
    assert counts["inside"] < 0.05 * counts["outside"], counts
    assert counts["after"] < counts["kept"] - 48, counts  # handed back on leaving
    assert counts["overlapping"] < 0.05 * counts["outside"], counts  # still reused after the first block closed
