"""Training of the learned networks: augmentation, losses, steps, the loop, the CLI, DDP.

Real data: the MNI152 2009a template at 2 mm from nilearn (installed with the test extras),
downsampled to 32^3 (3D) or cut into 32^2 slices (2D), so every test stays small.
"""

from __future__ import annotations

import json
import os
import socket
import time

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.multiprocessing as mp

from cnnreg import cli
from cnnreg.checkpoint import load_checkpoint
from cnnreg.errors import DeviceError, InputError
from cnnreg.jacobian import jacobian_determinant
from cnnreg.networks import CascadeNet, FAIMNet
from cnnreg.settings import EXIT_INPUT
from cnnreg.training.augment import (
    AugmentSettings,
    PairBatch,
    PairSampler,
    Sample,
    augment_intensity,
    deform,
    random_smooth_field,
    validation_pairs,
)
from cnnreg.training.dataset import index_labels, make_sample
from cnnreg.training.distributed import Distributed
from cnnreg.training.loop import Trainable, output_paths, train, training_step, wrap_parallel
from cnnreg.training.losses import soft_dice
from cnnreg.training.settings import TrainSettings, settings_from_dict


@pytest.fixture(scope="module")
def mni(mni_template) -> np.ndarray:
    return mni_template


def _tissue_labels(array: np.ndarray) -> np.ndarray:
    """Three rough intensity classes (0 background) -- enough to score overlap."""
    return (array > 0.2).astype(np.int16) + (array > 0.5) + (array > 0.75)


def _slices(mni: np.ndarray, count: int, labels: bool = True) -> list[Sample]:
    """``count`` axial-ish slices of the template as 2D samples on a 32^2 working grid."""
    samples = []
    for index in range(count):
        plane = mni[:, :, 40 + 6 * index]
        samples.append(
            make_sample(
                f"slice{index}", plane, (32, 32), labels=_tissue_labels(plane) if labels else None, label_space="tissue"
            )
        )
    index_labels(samples)
    return samples


def _perturb_head(network: torch.nn.Module, seed: int = 0, scale: float = 0.02) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in network.named_parameters():
            if "head" in name:
                parameter.copy_(scale * torch.randn(parameter.shape, generator=generator))
    return network


# --------------------------------------------------------------------------------------
# augmentation
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(40, 36), (20, 18, 22)], ids=["2d", "3d"])
def test_random_smooth_field_is_bounded_smooth_and_repeatable(shape):
    fields = [random_smooth_field(2, shape, 4.0, torch.Generator().manual_seed(3), control_spacing=8) for _ in range(2)]
    u = fields[0]
    assert u.shape == (2, len(shape), *shape)
    assert torch.equal(fields[0], fields[1])
    length = u.pow(2).sum(1).sqrt()
    assert 0.5 < float(length.max()) <= 4.0 * 1.05
    assert float(jacobian_determinant(u.double()).min()) > 0  # integrated velocity: no folding
    plain = random_smooth_field(1, shape, 4.0, torch.Generator().manual_seed(3), diffeomorphic=False)
    assert float(plain.pow(2).sum(1).sqrt().max()) <= 4.0 + 1e-4
    assert torch.count_nonzero(random_smooth_field(1, shape, 0.0, torch.Generator())) == 0


def test_intensity_augmentation_keeps_max_normalised_images(mni):
    image = make_sample("mni", mni, (24, 24, 24)).image[None].repeat(3, 1, 1, 1, 1)
    settings = AugmentSettings(probability=1.0)
    out = augment_intensity(image, settings, torch.Generator().manual_seed(0))
    assert out.shape == image.shape and float(out.min()) >= 0
    torch.testing.assert_close(out.flatten(1).amax(1), torch.ones(3))
    assert not torch.allclose(out, image, atol=1e-3)
    again = augment_intensity(image, settings, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    untouched = augment_intensity(image, AugmentSettings(probability=0.0), torch.Generator().manual_seed(0))
    torch.testing.assert_close(untouched, image / image.flatten(1).amax(1).view(3, 1, 1, 1, 1))


def test_pair_sampler_makes_self_and_cross_pairs_with_labels(mni):
    samples = _slices(mni, 3)
    settings = AugmentSettings(self_pair_fraction=0.5, max_displacement=3.0)
    batch = PairSampler(samples, settings, torch.Generator().manual_seed(1)).sample(6)
    assert batch.fixed.shape == batch.moving.shape == (6, 1, 32, 32)
    assert batch.fixed_labels is not None and batch.fixed_labels.shape == (6, 1, 32, 32)
    assert set(torch.unique(batch.moving_labels).tolist()) <= {0.0, 1.0, 2.0, 3.0}
    assert any("deformed" in name for name in batch.names) and any("deformed" not in name for name in batch.names)
    pairs = validation_pairs(samples, settings, pairs_per_image=1, cross_pairs=True)
    assert len(pairs) == 3 + 3 * 2
    assert all(p.fixed_labels is not None for p in pairs)
    with_training = validation_pairs(samples[:1], settings, pairs_per_image=1, others=samples[1:])
    assert [p.names[0] for p in with_training[1:]] == [
        "slice1->slice0",
        "slice0->slice1",
        "slice2->slice0",
        "slice0->slice2",
    ]


def test_deform_moves_labels_with_the_image(mni):
    sample = _slices(mni, 1)[0]
    u = random_smooth_field(1, (32, 32), 3.0, torch.Generator().manual_seed(0))
    moved, moved_labels = deform(sample.image[None], u, sample.labels[None])
    assert torch.equal(moved_labels, torch.round(moved_labels))
    assert not torch.equal(moved_labels, sample.labels[None])


# --------------------------------------------------------------------------------------
# losses and training steps
# --------------------------------------------------------------------------------------


def test_soft_dice_of_one_hot_maps():
    a = torch.zeros(1, 3, 4, 4)
    a[:, 0] = 1
    a[:, 0, :2, :2], a[:, 1, :2, :2] = 0, 1
    assert float(soft_dice(a, a)) == pytest.approx(1.0)
    b = a.clone()
    b[:, 1, :2, :2], b[:, 2, :2, :2] = 0, 1  # label 1 -> 2: no overlap in the foreground
    assert float(soft_dice(a, b)) == pytest.approx(0.0)


def test_a_few_training_steps_lower_the_loss_on_a_real_3d_pair(mni):
    torch.manual_seed(0)
    fixed = make_sample("mni", mni, (32, 32, 32)).image[None]
    u = random_smooth_field(1, (32, 32, 32), 3.0, torch.Generator().manual_seed(0))
    moving, _ = deform(fixed, u)
    batch = PairBatch(fixed, moving)
    settings = TrainSettings()
    network = FAIMNet(3)
    parts = Trainable(network, network)
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-3)
    with torch.no_grad():
        before = float(training_step(parts, batch, settings)[0])
    for _ in range(8):
        optimizer.zero_grad()
        loss, _ = training_step(parts, batch, settings)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after, terms = training_step(parts, batch, settings)
    assert float(after) < before - 1e-3
    assert float(terms["regularization"]) > 0  # the network now predicts a field


def test_cycle_dice_and_refinement_steps(mni):
    samples = _slices(mni, 2)
    batch = PairSampler(samples, AugmentSettings(), torch.Generator().manual_seed(0)).sample(2)
    network = _perturb_head(FAIMNet(2))
    settings = TrainSettings(cycle=True, dice_weight=1.0, jacobian_weight=0.1)
    loss, terms = training_step(Trainable(network, network), batch, settings)
    assert set(terms) == {"similarity_loss", "regularization", "negative_jacobian", "dice", "cycle"}
    loss.backward()
    assert all(p.grad is not None for p in network.parameters())

    refiner = {"ndim": 2, "in_channels": 4, "filters": 4, "features": 16, "levels": 2}
    cascade = CascadeNet(
        {"architecture": "FAIMNet", "config": {"ndim": 2}}, {"architecture": "FAIMNet", "config": refiner}
    )
    _perturb_head(cascade)
    parts = wrap_parallel(cascade, Distributed(), torch.device("cpu"))
    loss, _ = training_step(parts, batch, TrainSettings(), phase="refine")
    loss.backward()
    assert all(p.grad is None for p in cascade.base.parameters())  # the base is frozen while refining
    assert cascade.refiner.head.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------
# the loop, checkpoints, resume, the command line
# --------------------------------------------------------------------------------------

TINY = dict(working_shape=[32, 32], epochs=1, steps_per_epoch=2, batch_size=2, val_pairs_per_image=1, device="cpu")


def test_train_writes_checkpoints_and_curve_and_resumes(tmp_path, mni):
    samples = _slices(mni, 3)
    events = []
    settings = TrainSettings(**TINY, learning_rate=1e-3)
    out = tmp_path / "model.pt"
    summary = train(settings, samples[:2], samples[2:], out, callback=events.append)
    paths = output_paths(out)
    for key in ("best", "last", "curve"):
        assert os.path.isfile(paths[key]), key
    assert os.path.isfile(paths["best"] + ".sha256") and os.path.isfile(paths["last"] + ".sha256")
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and kinds.count("progress") == 2 and kinds.count("epoch") == 1
    epoch = next(e for e in events if e["event"] == "epoch")
    assert epoch["val_dice"] is not None and 0 < epoch["val_dice"] <= 1 and epoch["val_pairs"] == 1 + 2 * 2
    assert summary["best"]["epoch"] == 1

    best = load_checkpoint(paths["best"], expected_ndim=2)
    assert best.working_shape == (32, 32) and best.normalization == "max"
    assert best.training["settings"]["epochs"] == 1 and len(best.training["history"]) == 1
    assert "optimizers" not in best.extra
    last = load_checkpoint(paths["last"])
    assert last.extra["epoch"] == 1 and "base" in last.extra["optimizers"]

    settings.epochs = 2
    events.clear()
    train(settings, samples[:2], samples[2:], out, resume=paths["last"], callback=events.append)
    assert next(e for e in events if e["event"] == "start")["start_epoch"] == 1
    assert [e["epoch"] for e in events if e["event"] == "epoch"] == [2]
    assert len(load_checkpoint(paths["last"]).training["history"]) == 2


def test_train_command_line_with_a_json_config(tmp_path, mni, capsys, keep_sigterm_handler):
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    for index in range(3):
        plane = mni[:, :, 40 + 6 * index]
        sitk.WriteImage(sitk.GetImageFromArray(plane), str(images / f"case{index}.nii.gz"))
        sitk.WriteImage(sitk.GetImageFromArray(_tissue_labels(plane)), str(labels / f"case{index}.nii.gz"))
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**TINY, "steps_per_epoch": 1, "augment": {"max_displacement": 3.0}}))
    out = tmp_path / "out" / "model.pt"
    argv = ["train", "--images", str(images), "--labels", str(labels), "--config", str(config), "--out", str(out)]
    assert cli.main(argv + ["--progress", "jsonl", "--epochs", "1"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["event"] for e in lines] == ["start", "progress", "epoch", "done"]
    assert lines[0]["train_images"] == 2 and lines[0]["val_images"] == 1  # one real image held out
    assert lines[2]["val_dice"] is not None and lines[2]["val_dice_before"] is not None
    assert os.path.isfile(out) and os.path.isfile(output_paths(out)["curve"])

    assert cli.main(argv + ["--progress", "jsonl"]) == EXIT_INPUT  # no silent overwrite
    assert "already exists" in capsys.readouterr().err


def test_config_errors_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="unknown training setting"):
        settings_from_dict({"epochz": 3})
    with pytest.raises(InputError, match="unknown augment setting"):
        settings_from_dict({"augment": {"max_displacment": 3}})
    with pytest.raises(InputError, match="unknown similarity"):
        TrainSettings(similarity="ncc").validate()
    with pytest.raises(InputError, match="has 3 axes but the images are 2D"):
        TrainSettings(working_shape=[32, 32, 32]).validate(2)
    with pytest.raises(InputError, match="dice_weight > 0 needs a label map"):
        train(TrainSettings(**TINY, dice_weight=1.0), [Sample("a", torch.rand(1, 32, 32))], None, tmp_path / "m.pt")


# --------------------------------------------------------------------------------------
# distributed data parallel (2 CPU processes, gloo)
# --------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _network() -> FAIMNet:
    torch.manual_seed(7)
    return _perturb_head(FAIMNet(2), seed=7)


def _ddp_worker(rank: int, folder: str, port: int) -> None:
    """One DDP process: the gradient of its half of the batch, averaged by DDP, saved to a file."""
    import torch.distributed as dist

    from cnnreg.training.distributed import init_distributed, leave_distributed

    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    info, device = init_distributed("cpu")
    assert info.enabled and info.world_size == 2 and dist.get_backend() == "gloo"
    batch = torch.load(os.path.join(folder, "batch.pt"))
    network = _network()
    parts = wrap_parallel(network, info, device)
    mine = PairBatch(batch["fixed"][rank : rank + 1], batch["moving"][rank : rank + 1])
    loss, _ = training_step(parts, mine, TrainSettings())
    loss.backward()
    torch.save({name: p.grad for name, p in network.named_parameters()}, os.path.join(folder, f"grad{rank}.pt"))
    leave_distributed(info)
    assert not dist.is_initialized()


def test_ddp_on_two_processes_averages_the_gradient_of_the_batch(tmp_path, mni):
    samples = _slices(mni, 2, labels=False)
    batch = PairSampler(samples, AugmentSettings(), torch.Generator().manual_seed(0)).sample(2)
    torch.save({"fixed": batch.fixed, "moving": batch.moving}, tmp_path / "batch.pt")
    context = mp.spawn(_ddp_worker, args=(str(tmp_path), _free_port()), nprocs=2, join=False)
    deadline = time.monotonic() + 180
    while not context.join(timeout=2):  # raises if a worker failed
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the DDP workers did not finish within 180 s")

    network = _network()
    loss, _ = training_step(Trainable(network, network), PairBatch(batch.fixed, batch.moving), TrainSettings())
    loss.backward()
    expected = {name: p.grad for name, p in network.named_parameters()}
    for rank in range(2):
        grads = torch.load(tmp_path / f"grad{rank}.pt")
        assert grads.keys() == expected.keys()
        for name, grad in expected.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-7, msg=f"rank {rank}, {name}")
    assert expected["head.weight"].abs().sum() > 0


def test_the_weights_recipe_settings_are_valid():
    """scripts/train_weights.py: every recipe (full and --quick) makes valid settings and networks."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "scripts" / "train_weights.py"
    spec = importlib.util.spec_from_file_location("train_weights", path)
    recipe_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe_module)
    for key, recipe in recipe_module.RECIPES.items():
        ndim = int(key[0])
        for values in (recipe["settings"], {**recipe["settings"], **recipe["quick"]}):
            settings = settings_from_dict(values)
            settings.validate(ndim)
            assert len(settings.shape_for(ndim)) == ndim
        assert recipe["file"].endswith(".pt")


def test_a_checkpoint_that_cannot_be_written_is_a_write_error_and_keeps_the_previous_one(tmp_path, monkeypatch):
    from cnnreg.checkpoint import save_checkpoint
    from cnnreg.errors import WriteError

    path = tmp_path / "model.pt"
    save_checkpoint(path, FAIMNet(2), {"working_shape": (32, 32)})
    before = path.read_bytes()

    def full_disk(obj, target):
        with open(target, "wb") as handle:
            handle.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(WriteError, match="No space left on device"):
        save_checkpoint(path, FAIMNet(2), {"working_shape": (32, 32)})
    assert path.read_bytes() == before and not (tmp_path / "model.pt.tmp").exists()
    assert issubclass(WriteError, DeviceError)  # the command line exits with 3
