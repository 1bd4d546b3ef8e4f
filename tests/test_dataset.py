"""Every epoch's crops are a function of (seed, epoch, photo): the same with 0, 1 or 2 workers, persistent or not."""

from __future__ import annotations

import torch

from carclf.config import load_config
from carclf.data.dataset import EpochSampler, ImageDataset, make_loader
from carclf.data.scan import scan_train
from carclf.data.transforms import data_config_for, train_transform


def _train_ds(root):
    cfg = load_config(None, ["data.img_size=64"])
    ts = scan_train(root)
    return ImageDataset(ts.paths[:24], ts.labels[:24], train_transform(data_config_for(cfg), cfg.aug), 64)


def _epoch(loader, epoch):
    loader.sampler.set_epoch(epoch)
    batches = list(loader)
    return torch.cat([b[0] for b in batches]), torch.cat([b[2] for b in batches])


def test_epochs_are_identical_whatever_the_workers(synth_data):
    ds = _train_ds(synth_data)
    runs = {}
    for workers in (0, 1, 2):
        loader = make_loader(ds, 8, workers, shuffle=True, seed=7)
        assert loader.persistent_workers == (workers > 0)
        runs[workers] = [_epoch(loader, e) for e in (0, 1, 1)]
    for workers in (1, 2):
        for (x0, i0), (x, i) in zip(runs[0], runs[workers], strict=True):
            assert torch.equal(i0, i)
            assert torch.equal(x0, x)
    (x_e0, i_e0), (x_e1, i_e1), (x_again, _) = runs[2]
    assert not torch.equal(i_e0, i_e1)  # a new epoch: a new order ...
    assert torch.equal(x_e1, x_again)  # ... and set_epoch(1) again repeats epoch 1 exactly, with the same workers


def test_sampler_seeds_do_not_depend_on_the_order():
    a = dict(EpochSampler(10, shuffle=True, seed=1))
    b = dict(EpochSampler(10, shuffle=False, seed=1))
    assert a == b
    s = EpochSampler(10, shuffle=True, seed=1)
    s.set_epoch(1)
    assert dict(s) != a


def test_the_main_process_rng_is_left_alone(synth_data):
    ds = _train_ds(synth_data)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    ds[(0, 123)]
    assert torch.equal(torch.rand(3), expected)


def test_a_bad_first_photo_keeps_the_batch_shape_of_a_wide_input(synth_data, tmp_path):
    """An undecodable photo stands in as zeros shaped like the good photos, also when it is the first of a batch and
    the input is wide (height != width): the batch still stacks, in the DataLoader and in eval_batches alike, and
    both give the same batches."""
    from carclf.data.dataset import eval_batches
    from carclf.data.transforms import eval_transform

    cfg = load_config(None, ["data.img_size=64", "data.aspect=1.5"])
    dcfg = data_config_for(cfg)
    good = scan_train(synth_data).paths[:5]
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good[0].read_bytes()[:200])
    sources = [truncated, *good[:3], truncated, *good[3:]]
    ds = ImageDataset(sources, None, eval_transform(dcfg), 64)
    loaded = list(make_loader(ds, 4, 0))
    direct = list(eval_batches(ImageDataset(sources, None, eval_transform(dcfg), 64), 4))
    assert len(loaded) == len(direct) == 2
    for a, b in zip(loaded, direct, strict=True):
        assert a[0].shape[1:] == (3, 64, 96)
        for ta, tb in zip(a, b, strict=True):
            assert torch.equal(ta, tb)
    ok = torch.cat([b[3] for b in direct])
    assert ok.tolist() == [False, True, True, True, False, True, True]
    assert not direct[0][0][0].any()
    assert direct[0][0][1].any()
