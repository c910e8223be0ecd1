"""The random inputs of a training step (step_inputs): every step draws anew, the same (seed, step) draws the same.

Resume, multi-process and determinism tests compare two runs of the same code with each other, so they pass even when
every step draws the same sigma, noise, label dropout and augmentation (a step seed that ignores the step). These tests
pin the draws themselves: cheap, exact, on small tensors.
"""

import itertools

import pytest
import torch

from edmkit.data.augment import AUGMENT_DIM
from edmkit.diffusion.loss import make_loss
from edmkit.presets import get_preset, sr_augment_dim
from edmkit.training.step_inputs import (
    AUGMENT_CHUNK,
    SR_CHUNK,
    Shard,
    step_augment,
    step_generator,
    step_noise,
    step_seed,
    step_sr_condition,
)

BATCH, CLASSES, RES = 64, 10, 8


@pytest.fixture
def cfg():
    """Class-conditional with label dropout and augmentation: every kind of draw a step makes is made."""
    c = get_preset("tiny").override("network", label_dim=CLASSES, augment_dim=AUGMENT_DIM)
    return c.override("loss", p_uncond=0.5).override("train", augment_p=0.5)


def batch(n=BATCH):
    """Fixed images [n, 1, RES, RES] and one-hot labels [n, CLASSES] (any values: only the draws are under test)."""
    y = torch.randn(n, 1, RES, RES, generator=torch.Generator().manual_seed(99))
    return y, torch.eye(CLASSES)[torch.arange(n) % CLASSES]


def draws(cfg, step, shard=None, y=None, labels=None):
    """Everything random of step ``step`` for ``shard``'s rows: sigma, noise, labels after dropout, augmented y, augment labels."""
    shard = shard or Shard(batch=BATCH, size=BATCH)
    if y is None:
        y, labels = batch()
    sigma, noise, dropped, *_ = step_noise(make_loss(cfg), cfg, step, shard, y, labels)
    augmented, params = step_augment(cfg, step, shard, y)
    return {"sigma": sigma, "noise": noise, "labels": dropped, "y": augmented, "augment": params}


def test_step_seeds_are_distinct_over_steps_chunks_and_seeds():
    chunks = (0, 1, 2, 3, AUGMENT_CHUNK, SR_CHUNK)
    seeds = [step_seed(s, k, c) for s, k, c in itertools.product(range(3), range(200), chunks)]
    assert len(set(seeds)) == len(seeds)
    assert all(0 <= s < 2**63 for s in seeds)


def test_step_generator_is_a_function_of_seed_and_step():
    first = lambda seed, step: torch.rand(4, generator=step_generator(seed, step, "cpu"))  # noqa: E731
    assert torch.equal(first(0, 7), first(0, 7))
    assert not torch.equal(first(0, 7), first(0, 8))
    assert not torch.equal(first(0, 7), first(1, 7))


def test_consecutive_steps_draw_new_sigma_noise_dropout_and_augmentation(cfg):
    steps = [draws(cfg, k) for k in range(4)]
    for a, b in itertools.combinations(steps, 2):
        assert not torch.isclose(a["sigma"], b["sigma"]).any()
        assert not torch.isclose(a["noise"], b["noise"]).all()
        keep_a, keep_b = a["labels"].any(1), b["labels"].any(1)
        assert not torch.equal(keep_a, keep_b)  # which rows lose their label: 64 fair coins each
        assert not torch.equal(a["augment"], b["augment"]) and not torch.equal(a["y"], b["y"])
    for d in steps:  # every kind of draw was made: some rows dropped and some kept, some augmented and some not
        keep = d["labels"].any(1)
        assert 0 < int(keep.sum()) < BATCH
        changed = d["augment"].ne(0).any(1)
        assert 0 < int(changed.sum()) < BATCH


def test_the_same_seed_and_step_reproduce_exactly(cfg):
    later = draws(cfg, 5)
    draws(cfg, 3)  # drawing other steps (or anything from the global RNG) in between changes nothing
    torch.rand(10)
    again = draws(cfg, 5)
    assert all(torch.equal(later[k], again[k]) for k in later)
    other_seed = draws(cfg.override("train", seed=1), 5)
    assert not torch.equal(later["sigma"], other_seed["sigma"]) and not torch.equal(later["augment"], other_seed["augment"])


def test_label_dropout_endpoints_and_its_draws_come_after_sigma_and_noise(cfg):
    y, labels = batch()
    base = draws(cfg, 2)
    none = draws(cfg.override("loss", p_uncond=0.0), 2)
    every = draws(cfg.override("loss", p_uncond=1.0), 2)
    assert torch.equal(none["labels"], labels) and not every["labels"].any()
    for d in (none, every):  # dropout on or off leaves sigma, noise and augmentation as they were
        assert all(torch.equal(d[k], base[k]) for k in ("sigma", "noise", "y", "augment"))
    # the kept rows are those whose uniform draw u >= p_uncond, u drawn after sigma and noise from the step's generator
    g = step_generator(cfg.train.seed, 2, "cpu")
    make_loss(cfg).sample_sigma(BATCH, generator=g)
    torch.randn(y.shape, generator=g)
    u = torch.rand(BATCH, generator=g)
    quarter = draws(cfg.override("loss", p_uncond=0.25), 2)
    assert torch.equal(quarter["labels"].any(1), u >= 0.25)
    assert torch.equal(quarter["labels"][u >= 0.25], labels[u >= 0.25])  # kept rows unchanged
    assert 0 < int((u < 0.25).sum()) < BATCH // 2


def test_augmentation_probability_is_honoured(cfg):
    y, _ = batch()
    off = draws(cfg.override("train", augment_p=1e-9), 0)
    assert not off["augment"].any() and torch.equal(off["y"], y)
    on = draws(cfg.override("train", augment_p=1.0), 0)
    assert on["augment"][:, 4:6].ne(0).any(1).all()  # p = 1: every image rotated (theta continuous: never exactly 0)
    assert on["augment"][:, [1, 2, 3, 6]].ne(0).any(1).float().mean() > 0.9
    same, params = step_augment(cfg.override("train", augment_p=0.0), 0, Shard(batch=BATCH, size=BATCH), y)
    assert same is y and params is None  # p = 0: no draws, no augment labels


@pytest.mark.parametrize("size, world", [(16, 2), (8, 2), (4, 4), (16, 1)])
def test_each_rank_gets_its_rows_of_the_global_draws(cfg, size, world):
    y, labels = batch()
    whole = draws(cfg, 4)
    for rank in range(world):
        shard = Shard(batch=BATCH, size=size, rank=rank, world=world)
        rows = shard.rows()
        part = draws(cfg, 4, shard, y[rows], labels[rows])
        assert all(torch.equal(part[k], whole[k][rows]) for k in whole)


def test_sr_conditioning_draws_new_noise_each_step():
    cfg = get_preset("tiny").override("network", cond_channels=1, augment_dim=sr_augment_dim(augment_p=0.0))
    cfg = cfg.override("train", task="sr", sr_scale=2)
    y, _ = batch(8)
    shard = Shard(batch=8, size=8)
    cond = [step_sr_condition(cfg, k, shard, y, None) for k in (0, 1, 0)]
    assert torch.equal(cond[0][0], cond[2][0]) and torch.equal(cond[0][1], cond[2][1])
    assert not torch.isclose(cond[0][0], cond[1][0]).all() and not torch.equal(cond[0][1], cond[1][1])
