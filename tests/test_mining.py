"""Online dictionary-driven mining: crops placed on hard cells and rare classes, the online
image sampler, repeat keys, and a training run that uses them (deterministic, resumable)."""

import json
import zlib
from collections import Counter

import numpy as np
import pytest
import torch

from segohem.bank import EpochClassStats, HardPixelBank, SampleStats, confusion_fields
from segohem.cli import run_train
from segohem.config import ConfigError, load_config
from segohem.crops import cut_window
from segohem.data import build_dataset
from segohem.data.samplers import draw_seed, repeat_keys
from segohem.data.transforms import build_train_transform
from segohem.engine.run import build_loss
from segohem.mining import (
    DictionaryCropDataset,
    DictionarySampler,
    choose_candidates,
    hard_cell_centre,
    rare_pixel_centre,
    recall_weights,
)  # fmt: skip
from segohem.ohem import OhemCrossEntropy

from .conftest import interrupted_after_epoch, tiny_config

ORIGINAL_HW = (96, 128)


def corner_bank(sample_id: str = "synthetic-train-00000") -> HardPixelBank:
    """A bank whose only hard cells are the bottom-right 3x3 cells (8 px) of a 96x128 image."""
    bank = HardPixelBank(7, cell_size=8)
    hard = np.zeros((12, 16), np.float32)
    hard[9:12, 13:16] = 1.0
    bank.samples[sample_id] = SampleStats(
        height=96, width=128, hard_acc=hard, seen_acc=np.ones_like(hard),
        **confusion_fields(np.zeros((7, 7), np.int64)), seen=1,
    )  # fmt: skip
    valid = np.array([1000, 1000, 1000, 1000, 1, 1000, 1000])  # class 4 (pole) is rare
    bank.epochs[0] = EpochClassStats(hard=np.zeros(7, np.int64), valid=valid)
    return bank


def crop_dataset(*overrides: str, scale=(1.0, 1.0)) -> DictionaryCropDataset:
    cfg = load_config(None, ["data.image_size=[96, 128]", "augment.hflip=0.0", "augment.crop=[32, 32]",
                             f"augment.scale=[{scale[0]}, {scale[1]}]", *overrides])  # fmt: skip
    base = build_dataset(cfg.data, cfg.augment, split="train", train=True, seed=0)
    return DictionaryCropDataset(
        base, cfg.mining, crop=(32, 32), scale=scale, cell_size=8,
        placed_transform=build_train_transform(cfg.augment, ignore_index=base.ignore_index, placement=False),
    )  # fmt: skip


@pytest.mark.parametrize("scale", [(1.0, 1.0), (0.75, 1.5)])
def test_hard_crops_cover_the_hard_cells_at_every_scale(scale):
    dataset = crop_dataset("mining.hard_crop_prob=1.0", "mining.start_epoch=1", scale=scale)
    dataset.observe(corner_bank(), 0)
    for epoch in range(6):
        dataset.set_epoch(epoch)
        sample = dataset[0]
        assert sample["crop_kind"] == 1 and sample["image"].shape == (3, 32, 32)
        rows, cols = sample["source_yx"]
        # the window is placed around the hard corner (original rows >= 72, cols >= 104)
        assert rows.max() >= 72 and cols.max() >= 104
        assert rows.min() >= 96 - 32 / scale[0] - 8 and cols.min() >= 128 - 32 / scale[0] - 8


def test_hard_crops_use_the_cell_size_of_the_dictionary_they_read():
    dataset = crop_dataset("mining.hard_crop_prob=1.0", "mining.start_epoch=1")  # built with 8-pixel cells
    bank = HardPixelBank(7, cell_size=16)
    hard = np.zeros((6, 8), np.float32)
    hard[5, 7] = 1.0  # the bottom-right 16x16 cell: rows 80-95, cols 112-127
    bank.samples["synthetic-train-00000"] = SampleStats(
        height=96, width=128, hard_acc=hard, seen_acc=np.ones_like(hard),
        **confusion_fields(np.zeros((7, 7), np.int64)), seen=1,
    )  # fmt: skip
    dataset.observe(bank, 0)
    rows, cols = dataset[0]["source_yx"]
    assert rows.max() >= 80 and cols.max() >= 112


def test_crops_stay_uniform_before_start_epoch_and_without_knowledge():
    dataset = crop_dataset("mining.hard_crop_prob=1.0", "mining.start_epoch=3")
    dataset.observe(corner_bank(), 0)
    dataset.set_epoch(1)  # the second epoch: before start_epoch 3
    assert dataset[0]["crop_kind"] == 0
    assert torch.equal(dataset[0]["image"], dataset.base[0]["image"])  # the base's own uniform crop
    dataset.set_epoch(2)
    assert dataset[0]["crop_kind"] == 1
    assert dataset[1]["crop_kind"] == 0  # image 1 is unknown to the dictionary: a uniform crop


def test_crop_kinds_follow_their_probabilities_and_are_seeded():
    dataset = crop_dataset("mining.hard_crop_prob=0.3", "mining.rare_crop_prob=0.5", "mining.start_epoch=1")
    kinds = Counter(dataset.crop_kind(key)[0] for key in range(4000))
    assert kinds["hard"] / 4000 == pytest.approx(0.3, abs=0.03)
    assert kinds["rare"] / 4000 == pytest.approx(0.5, abs=0.03)
    again = [dataset.crop_kind(key)[0] for key in range(50)]
    assert again == [dataset.crop_kind(key)[0] for key in range(50)]


def test_hard_cell_centre_draws_by_hardness_power_and_never_an_easy_cell():
    hardness = np.array([[0.0, 0.2], [0.8, np.nan]], np.float32)
    rng = np.random.default_rng(0)
    cells = Counter()
    for _ in range(3000):
        y, x = hard_cell_centre(hardness, cell_size=10, sharpness=2.0, rng=rng)
        cells[(int(y // 10), int(x // 10))] += 1
    assert set(cells) == {(0, 1), (1, 0)}
    assert cells[(1, 0)] / 3000 == pytest.approx(0.64 / 0.68, abs=0.02)  # 0.8^2 / (0.8^2 + 0.2^2)
    assert hard_cell_centre(np.zeros((2, 2), np.float32), cell_size=8, sharpness=0.0, rng=rng) is None


def test_rare_pixel_centre_prefers_rare_classes_present():
    mask = np.zeros((20, 20), np.uint8)
    mask[5, 7] = 2  # one pixel of the rare class 2
    mask[0, :] = 255  # ignored
    frequency = np.array([0.9, 0.09, 0.01])
    rng = np.random.default_rng(0)
    picks = Counter(rare_pixel_centre(mask, frequency, power=1.0, ignore_index=255, rng=rng) for _ in range(2000))
    # class 2 weighs 1/0.01 = 100 against class 0's 1/0.9: about 99% of the centres
    assert picks[(5.0, 7.0)] / 2000 == pytest.approx(100 / (100 + 1 / 0.9), abs=0.01)
    assert rare_pixel_centre(np.full((4, 4), 255, np.uint8), frequency, power=1.0, ignore_index=255, rng=rng) is None


def test_rare_crops_contain_the_rare_class():
    dataset = crop_dataset("mining.rare_crop_prob=1.0", "mining.start_epoch=1", "mining.rare_power=4.0")
    dataset.observe(corner_bank(), 0)
    _, mask = dataset.base.read(0)
    if not (mask == 4).any():
        pytest.skip("the synthetic scene has no pole in image 0")
    with_pole = 0
    for epoch in range(10):
        dataset.set_epoch(epoch)
        with_pole += int((dataset[0]["mask"] == 4).any())
    assert with_pole >= 9  # pole weighs 1000 ** 4 times more than any other class present


def test_repeat_keys_give_repeated_images_their_own_crops():
    assert repeat_keys([3, 1, 3, 3, 0], 5) == [3, 1, 8, 13, 0]
    # a first draw keeps the seed it had before repeats existed (earlier runs reproduce); a repeat has its own
    assert draw_seed(0, "mining", 3, 5) == zlib.crc32(b"0/mining/3/5")
    assert draw_seed(0, "mining", 3, 5, repeat=2) == zlib.crc32(b"0/mining/3/5/2")
    dataset = crop_dataset(scale=(0.75, 1.5))
    first, again = dataset[2], dataset[2 + len(dataset)]
    assert first["sample_id"] == again["sample_id"] and first["index"] == again["index"] == 2
    assert not torch.equal(first["image"], again["image"])
    assert torch.equal(dataset[2]["image"], first["image"])


def paste_bank(hard_by_image: dict[int, dict[int, int]], valid: list[int], hard_share=None) -> HardPixelBank:
    """A bank knowing images 0.. of the synthetic set, with hard pixels {image: {true class: count}};
    the last epoch's classes ``valid`` pixels, a ``hard_share`` of them hard (default: half)."""
    bank = HardPixelBank(7, cell_size=8)
    for index, hard in hard_by_image.items():
        confusion = np.zeros((7, 7), np.int64)
        for true_class, count in hard.items():
            confusion[true_class, 0 if true_class else 1] = count
        bank.samples[f"synthetic-train-{index:05d}"] = SampleStats(
            height=96, width=128, hard_acc=np.full((12, 16), 0.5, np.float32), seen_acc=np.ones((12, 16), np.float32),
            **confusion_fields(confusion), seen=1,
        )  # fmt: skip
    share = np.full(7, 0.5) if hard_share is None else np.array(hard_share)
    bank.epochs[0] = EpochClassStats(hard=np.zeros(7, np.int64), valid=np.array(valid) * 1000)  # an older epoch
    bank.epochs[1] = EpochClassStats(hard=(np.array(valid) * 100 * share).astype(np.int64), valid=np.array(valid) * 100)
    return bank


def test_paste_brings_a_hard_rare_region_from_another_image_and_the_dictionary_ignores_it():
    dataset = crop_dataset("mining.paste_prob=1.0", "mining.start_epoch=1")
    _, target_mask = dataset.base.read(1)
    _, source_mask = dataset.base.read(0)
    assert not (target_mask == 5).any() and (source_mask == 5).any()  # image 1 has no class 5; image 0 has
    # the dictionary knows hard pixels of class 5 in image 0 only, and of class 0 (common) in image 1
    dataset.observe(paste_bank({0: {5: 12}, 1: {0: 50}}, [1000, 1000, 1000, 1000, 1000, 1, 1000]), 0)
    pasted = 0
    for epoch in range(6):
        dataset.set_epoch(epoch)
        sample, plain = dataset[1], dataset.base[1]
        region = sample["source_yx"][0] < 0
        assert sample["pasted"] == int(region.sum())
        pasted += sample["pasted"]
        # outside the pasted region the crop is the image's own; inside, class 5 (from image 0), image replaced
        assert torch.equal(sample["mask"][~region], plain["mask"][~region])
        assert torch.equal(sample["image"][:, ~region], plain["image"][:, ~region])
        assert (sample["mask"][region] == 5).all()
        assert not torch.equal(sample["image"][:, region], plain["image"][:, region]) or not region.any()
        # the dictionary counts the crop's own pixels only
        bank = HardPixelBank(7, cell_size=8)
        batch = {k: v[None] for k, v in sample.items() if isinstance(v, torch.Tensor)}
        target = batch["mask"]
        bank.update(sample_ids=[sample["sample_id"]], hard_mask=torch.ones_like(target, dtype=torch.bool),
                    pixel_loss=torch.ones(target.shape), target=target, pred=torch.zeros_like(target),
                    source_yx=batch["source_yx"], source_hw=batch["source_hw"], epoch=0)  # fmt: skip
        own = int(((plain["mask"] < 7) & ~region).sum())
        assert bank.epochs[0].valid.sum() == own and bank.epochs[0].valid[5] == 0
        assert bank.samples[sample["sample_id"]].seen_acc.sum() == own
    assert pasted > 0


def test_paste_draws_the_class_by_rarity_and_hardness_and_the_source_by_its_hard_pixels():
    def draws(bank, *overrides, keys=3000):
        dataset = crop_dataset("mining.start_epoch=1", *overrides)
        dataset.observe(bank, 0)
        return [dataset.paste_source(key) for key in range(keys)]

    bank = paste_bank({0: {5: 30}, 1: {5: 10}, 2: {0: 40}}, [1000, 1000, 1000, 1000, 1000, 1, 1000])
    picks = draws(bank, "mining.paste_prob=0.3")
    assert sum(p is not None for p in picks) / 3000 == pytest.approx(0.3, abs=0.03)
    assert [p and p[:2] for p in picks[:40]] == [p and p[:2] for p in draws(bank, "mining.paste_prob=0.3", keys=40)]
    picks = [p[:2] for p in draws(bank, "mining.paste_prob=1.0", "mining.rare_power=0")]
    classes = Counter(c for c, _ in picks)
    assert set(classes) == {0, 5}  # only classes the dictionary holds hard pixels of
    assert classes[5] / 3000 == pytest.approx(0.5, abs=0.03)  # power 0: the known classes alike
    sources = Counter(source for c, source in picks if c == 5)
    assert set(sources) == {0, 1} and sources[0] / classes[5] == pytest.approx(0.75, abs=0.04)  # 30 : 10
    rare = Counter(p[0] for p in draws(bank, "mining.paste_prob=1.0", "mining.rare_power=1"))
    assert rare[5] / 3000 == pytest.approx(1000 / 1001, abs=0.01)  # frequency 1/6001 against 1000/6001
    # the class's hard share in the latest epoch weighs in: class 0 is 4x harder than class 5
    harder = paste_bank({0: {5: 30}, 2: {0: 40}}, [1000] * 7, hard_share=[0.8, 0, 0, 0, 0, 0.2, 0])
    classes = Counter(p[0] for p in draws(harder, "mining.paste_prob=1.0", "mining.rare_power=1"))
    assert classes[0] / 3000 == pytest.approx(0.8, abs=0.03)
    assert all(p is None for p in draws(HardPixelBank(7), "mining.paste_prob=1.0", keys=20))  # nothing known
    # never into itself: image 0 holds the only hard class-5 pixels, image 1 the only class-0 ones
    dataset = crop_dataset("mining.start_epoch=1", "mining.paste_prob=1.0")
    dataset.observe(paste_bank({0: {5: 30}, 1: {0: 40}}, [1000, 1000, 1000, 1000, 1000, 1, 1000]), 0)
    repeats = [r * len(dataset) for r in range(60)]  # image 0 or 1 drawn again: each draw its own seed
    assert {dataset.paste_source(0 + r)[:2] for r in repeats} == {(0, 1)}  # its own class 5: not a choice
    assert {dataset.paste_source(1 + r)[:2] for r in repeats} == {(5, 0)}
    dataset.observe(paste_bank({0: {5: 30}, 1: {0: 40}, 2: {5: 30}}, [1000, 1000, 1000, 1000, 1000, 1, 1000]), 0)
    assert {dataset.paste_source(0 + r)[:2] for r in repeats} == {(5, 2)}  # class 5, from the other image
    assert {dataset.paste_source(1 + r)[:2] for r in repeats} == {(5, 0), (5, 2)}
    # a dictionary of another label set (9 classes, an image of another dataset): only this dataset's
    # classes (class 8 is as hard and as rare as class 5) and images are pasted
    other = HardPixelBank(9, cell_size=8)
    confusion = np.zeros((9, 9), np.int64)
    confusion[5, 0], confusion[8, 0] = 30, 3000
    for key in ("synthetic-train-00000", "another-set-00001"):
        other.samples[key] = SampleStats(
            height=96, width=128, hard_acc=np.ones((12, 16), np.float32), seen_acc=np.ones((12, 16), np.float32),
            **confusion_fields(confusion), seen=1,
        )  # fmt: skip
    other.epochs[0] = EpochClassStats(hard=np.full(9, 50), valid=np.full(9, 100))
    dataset.observe(other, 0)
    assert {dataset.paste_source(1 + r)[:2] for r in repeats} == {(5, 0)}


def test_paste_centres_the_source_window_on_the_hard_pixels_of_the_class(monkeypatch):
    """Image 2 holds class 5 in two places (around columns 33-40 and 120-122); the dictionary
    finds only the right-hand cells hard, so the source window is centred there."""
    dataset = crop_dataset("mining.paste_prob=1.0", "mining.start_epoch=1")
    bank = paste_bank({2: {5: 25}}, [1000, 1000, 1000, 1000, 1000, 1, 1000])
    hard = np.zeros((12, 16), np.float32)
    hard[:, 15] = 1.0  # original columns 120-127
    bank.samples["synthetic-train-00002"].hard_acc = hard
    dataset.observe(bank, 0)
    centres = []

    def recording_cut_window(arrays, centre_yx, size_hw, *, ignore_index):
        centres.append(centre_yx)
        return cut_window(arrays, centre_yx, size_hw, ignore_index=ignore_index)

    monkeypatch.setattr("segohem.mining.cut_window", recording_cut_window)
    for epoch in range(10):
        dataset.set_epoch(epoch)
        assert dataset[1]["pasted"] > 0
    assert len(centres) == 10 and all(col >= 112 for _, col in centres)


def test_dictionary_sampler_shuffles_then_draws_by_hardness():
    cfg = load_config(None, ["data.image_size=[96, 128]", "mining.sampler=image", "mining.start_epoch=2",
                             "mining.sampler_floor=0.0", "data.num_train=8"])  # fmt: skip
    base = build_dataset(cfg.data, cfg.augment, split="train", train=True, seed=0)
    sampler = DictionarySampler(base, cfg.mining, seed=0, batch_size=2)
    bank = corner_bank(base.sample_id(5))
    bank.samples[base.sample_id(5)].ema_kept_fraction, bank.samples[base.sample_id(5)].ema_hard_loss = 1.0, 1.0
    for other in range(8):
        if other != 5:
            bank.samples[base.sample_id(other)] = SampleStats(
                height=96, width=128, hard_acc=np.zeros((12, 16), np.float32),
                seen_acc=np.ones((12, 16), np.float32), **confusion_fields(np.zeros((7, 7), np.int64)),
                seen=1, ema_kept_fraction=0.01, ema_hard_loss=0.01,
            )  # fmt: skip
    sampler.observe(bank, 0)
    sampler.set_epoch(0)
    assert sorted(sampler) == list(range(8))  # epoch 1: a permutation
    sampler.observe(bank, 1)
    sampler.set_epoch(1)
    keys = list(sampler)
    assert len(keys) == 8 and all(k % 8 == 5 for k in keys)  # only the hard image, each draw its own key


def test_mining_config_errors_name_the_keys():
    with pytest.raises(ConfigError, match=r"augment\.crop"):
        load_config(None, ["mining.hard_crop_prob=0.5"])
    with pytest.raises(ConfigError, match=r"mining.hard_crop_prob \+ mining.rare_crop_prob = 1.2"):
        load_config(None, ["mining.hard_crop_prob=0.6", "mining.rare_crop_prob=0.6", "augment.crop=[32,32]"])
    with pytest.raises(ConfigError, match=r"mining\.sampler is driven by the hard-pixel dictionary: set bank\.enabled"):
        load_config(None, ["mining.sampler=class", "bank.enabled=false"])
    with pytest.raises(ConfigError, match=r"use ohem\.scope=image"):
        load_config(None, ["mining.candidates=4", "augment.crop=[32,32]", "ohem.scope=batch"])
    with pytest.raises(ConfigError, match=r"mining\.sampler and refine\.sampler"):
        load_config(None, ["mining.sampler=class", "refine.sampler=image"])
    with pytest.raises(ConfigError, match=r"paste_prob / candidates choose training crops: set augment\.crop"):
        load_config(None, ["mining.paste_prob=0.5"])
    with pytest.raises(ConfigError, match=r"mining\.paste_prob is driven by the hard-pixel dictionary"):
        load_config(None, ["mining.paste_prob=0.5", "augment.crop=[32,32]", "bank.enabled=false"])
    with pytest.raises(ConfigError, match=r"mining\.rare_power: 100\.0 is out of range"):
        load_config(None, ["mining.rare_power=100"])
    with pytest.raises(ConfigError, match=r"mining\.class_weight_power is driven by the hard-pixel dictionary"):
        load_config(None, ["mining.class_weight_power=1", "bank.enabled=false"])
    with pytest.raises(ConfigError, match=r"class_weight_momentum=0\.5 smooths .* set mining\.class_weight_power"):
        load_config(None, ["mining.class_weight_momentum=0.5"])
    with pytest.raises(ConfigError, match=r"class_weight_floor=1 floors .* set mining\.class_weight_power"):
        load_config(None, ["mining.class_weight_floor=1"])
    with pytest.raises(ConfigError, match=r"class_weight_floor"):  # above 1 it would flatten every weight
        load_config(None, ["mining.class_weight_power=1", "mining.class_weight_floor=1.5"])
    with pytest.raises(ConfigError, match=r"ohem\.neg_ratio does not combine with .*mining\.class_weight_power"):
        build_loss(load_config(None, ["mining.class_weight_power=1", "ohem.neg_ratio=3", "data.kind=folder",
                                      "data.root=x", "data.class_names=[a,b]", "data.mask_format=binary"]))  # fmt: skip


def test_recall_weights_follow_the_latest_epochs_missed_share():
    bank = HardPixelBank(4)
    assert recall_weights(bank, power=1.0) is None  # no epoch yet
    valid = np.array([1000, 100, 10, 0])  # class 3 not seen
    bank.epochs[0] = EpochClassStats(hard=valid // 2, valid=valid, missed=np.array([0, 0, 10, 0]))
    bank.epochs[1] = EpochClassStats(hard=valid // 2, valid=valid, missed=np.array([10, 50, 9, 0]))
    # latest epoch: missed shares 0.01, 0.5, 0.9 (class 3 unseen: weight 1), mean 1 over the seen
    shares = np.array([0.01, 0.5, 0.9])
    np.testing.assert_allclose(recall_weights(bank, power=1.0), [*(shares / shares.mean()), 1.0])
    np.testing.assert_allclose(recall_weights(bank, power=2.0), [*(shares**2 / (shares**2).mean()), 1.0])
    np.testing.assert_allclose(recall_weights(bank, power=0.0), [1, 1, 1, 1])
    # a class learnt perfectly keeps a little weight; a hard fraction would not tell these apart
    bank.epochs[2] = EpochClassStats(hard=valid // 2, valid=valid, missed=np.array([0, 50, 9, 0]))
    weights = recall_weights(bank, power=1.0)
    assert 0 < weights[0] < 0.01 and weights[2] > weights[1] > weights[0]
    # smoothed: epochs 2, 1, 0 count 1, 0.5, 0.25 (missed and valid alike)
    decayed_missed = np.array([0, 50, 9]) + 0.5 * np.array([10, 50, 9]) + 0.25 * np.array([0, 0, 10])
    shares = decayed_missed / (1.75 * valid[:3])
    np.testing.assert_allclose(recall_weights(bank, power=1.0, momentum=0.5), [*(shares / shares.mean()), 1.0])
    np.testing.assert_allclose(recall_weights(bank, power=1.0, momentum=0.0), weights)
    # floored: no weight below 1 after the normalization; those above it unchanged
    floored = recall_weights(bank, power=1.0, momentum=0.5, floor=1.0)
    np.testing.assert_allclose(floored, np.maximum([*(shares / shares.mean()), 1.0], 1.0))
    assert floored[0] == floored[1] == floored[3] == 1.0 < floored[2]  # class 1: 0.96 unfloored
    np.testing.assert_allclose(recall_weights(bank, power=2.0, floor=0.5),
                               np.maximum(recall_weights(bank, power=2.0), 0.5))  # fmt: skip
    bank.epochs[0].missed = None  # an epoch from before misses were counted ends the sum
    shares = (np.array([0, 50, 9]) + 0.5 * np.array([10, 50, 9])) / (1.5 * valid[:3])
    np.testing.assert_allclose(recall_weights(bank, power=1.0, momentum=0.5), [*(shares / shares.mean()), 1.0])
    bank.epochs[3] = EpochClassStats(hard=valid // 2, valid=valid)  # restored from before misses were counted
    assert recall_weights(bank, power=1.0) is None and recall_weights(bank, power=1.0, momentum=0.5) is None


def test_scaled_class_weights_multiply_the_configured_ones_and_can_be_restored():
    logits = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    target = torch.randint(0, 3, (2, 8, 8), generator=torch.Generator().manual_seed(1))
    plain = OhemCrossEntropy(mode="none", ignore_index=255)
    configured = OhemCrossEntropy(mode="none", ignore_index=255, class_weight=[1.0, 2.0, 1.0])
    by_hand = OhemCrossEntropy(mode="none", ignore_index=255, class_weight=[0.5, 2.0 * 3.0, 1.0])
    configured.scale_class_weight(torch.tensor([0.5, 3.0, 1.0]))
    torch.testing.assert_close(configured(logits, target).loss, by_hand(logits, target).loss)
    plain.scale_class_weight(torch.tensor([0.5, 6.0, 1.0]))  # no configured weights: the factor alone
    torch.testing.assert_close(plain(logits, target).loss, by_hand(logits, target).loss)
    plain.scale_class_weight(np.array([0.5, 6.0, 1.0]))  # an array is taken as well, on the loss's device
    assert plain.class_weight.dtype == torch.float32
    torch.testing.assert_close(plain(logits, target).loss, by_hand(logits, target).loss)
    configured.scale_class_weight(None)
    torch.testing.assert_close(
        configured(logits, target).loss,
        OhemCrossEntropy(mode="none", ignore_index=255, class_weight=[1.0, 2.0, 1.0])(logits, target).loss,
    )


def test_weighing_by_the_predicted_class_charges_false_positives_of_a_heavy_class():
    # 1 image, 3 classes, 4 pixels: labels 0 0 1 2; the model predicts 1 1 1 0
    logits = torch.zeros(1, 3, 1, 4)
    logits[0, 1, 0, :3] = 2.0
    logits[0, 0, 0, 3] = 2.0
    target = torch.tensor([[[0, 0, 1, 2]]])
    weights = [1.0, 4.0, 2.0]
    pixel_loss = torch.nn.functional.cross_entropy(logits, target, reduction="none")[0, 0]
    # by the label alone: 1 1 4 2; by max(label, prediction): 4 4 4 2 (pixel 3: max(2, 1))
    for by_prediction, w in ((False, [1.0, 1.0, 4.0, 2.0]), (True, [4.0, 4.0, 4.0, 2.0])):
        loss = OhemCrossEntropy(mode="none", ignore_index=255, class_weight=weights,
                                weight_by_prediction=by_prediction)(logits, target).loss  # fmt: skip
        w = torch.tensor(w)
        torch.testing.assert_close(loss, (pixel_loss * w).sum() / w.sum())
    # without class weights the option has nothing to weigh: the plain mean
    plain = OhemCrossEntropy(mode="none", ignore_index=255, weight_by_prediction=True)(logits, target).loss
    torch.testing.assert_close(plain, pixel_loss.mean())
    # recall weights set later (scale_class_weight) are weighed by prediction too
    later = OhemCrossEntropy(mode="none", ignore_index=255, weight_by_prediction=True)
    later.scale_class_weight(torch.tensor(weights))
    torch.testing.assert_close(later(logits, target).loss, (pixel_loss * torch.tensor([4.0, 4, 4, 2])).sum() / 14)


def test_weighing_by_prediction_needs_class_weights():
    with pytest.raises(ConfigError, match=r"ohem\.class_weight_predicted .* set ohem\.class_weight, mining\.class_w"):
        load_config(None, ["ohem.class_weight_predicted=true"])
    load_config(None, ["ohem.class_weight_predicted=true", "mining.class_weight_power=1"])
    loss = build_loss(
        load_config(None, ["ohem.class_weight_predicted=true", "ohem.class_weight=[1, 2, 1, 1, 1, 1, 1]"])
    )
    assert loss.weight_by_prediction


def test_training_with_online_mining_is_seeded_and_resumes_exactly(tmp_path, monkeypatch):
    overrides = [
        "augment.crop=[32,32]", "augment.scale=[0.75,1.5]", "mining.hard_crop_prob=0.4", "mining.rare_crop_prob=0.4",
        "mining.sampler=class", "mining.start_epoch=2", "train.epochs=3", "ohem.mode=topk", "ohem.class_min_kept=0.2",
        "ohem.region_loss=dice", "mining.candidates=2", "mining.paste_prob=0.5", "mining.class_weight_power=1",
        "mining.class_weight_momentum=0.5", "wandb.mode=disabled",
    ]  # fmt: skip
    run_train(tiny_config(tmp_path / "a", *overrides), resume_from=None)
    whole = tmp_path / "a" / "tiny"
    records = [json.loads(line) for line in (whole / "epochs.jsonl").read_text().splitlines()]
    assert records[0]["train/hard_crops"] == records[0]["train/rare_crops"] == 0.0  # epoch 1: uniform
    # recall weights from epoch 2 on, from the dictionary's epoch before, mean 1 over the classes seen
    assert not any(key.startswith("train/class_weight/") for key in records[0])
    weights = [[r[key] for key in r if key.startswith("train/class_weight/")] for r in records[1:]]
    assert all(len(w) == 7 for w in weights) and weights[0] != weights[1] and len(set(weights[0])) > 1
    assert records[1]["train/hard_crops"] + records[1]["train/rare_crops"] > 0
    assert records[0]["train/pasted_crops"] == 0.0 and records[1]["train/pasted_crops"] > 0
    # interrupted after epoch 2, resumed for the third: the same crops, the same weights
    cfg = tiny_config(tmp_path / "b", *overrides)
    with interrupted_after_epoch(monkeypatch, 2):
        run_train(cfg, resume_from=None)
    resumed = tmp_path / "b" / "tiny"
    run_train(cfg, resume_from=resumed)
    first = torch.load(whole / "last.pt", weights_only=True)["model"]
    second = torch.load(resumed / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_floored_recall_weights_reach_the_loss(tmp_path):
    overrides = ["mining.start_epoch=2", "train.epochs=2", "ohem.mode=topk", "mining.class_weight_power=2",
                 "mining.class_weight_floor=1", "wandb.mode=disabled"]  # fmt: skip
    run_train(tiny_config(tmp_path, *overrides), resume_from=None)
    records = [json.loads(line) for line in (tmp_path / "tiny" / "epochs.jsonl").read_text().splitlines()]
    weights = [records[1][key] for key in records[1] if key.startswith("train/class_weight/")]
    # without the floor some class weighs below 1 (mean 1, not all equal); with it none does
    assert len(weights) == 7 and min(weights) == 1.0 and max(weights) > 1.0


class ConstantClassZero(torch.nn.Module):
    """Predicts class 0 everywhere, confidently; records the mode and input size it ran in."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = torch.nn.BatchNorm2d(3)
        self.seen: list[tuple[bool, tuple[int, ...]]] = []

    def forward(self, x):
        self.seen.append((self.training, tuple(x.shape)))
        logits = torch.zeros(x.shape[0], 3, *x.shape[2:])
        logits[:, 0] = 5.0
        return logits + 0 * self.bn(x).mean()


def test_candidates_are_scored_read_only_and_the_hardest_is_kept():
    masks = torch.zeros(2, 3, 64, 64, dtype=torch.long)  # 2 images x 3 candidates
    masks[0, 1] = 1  # image 0: candidate 1 disagrees with the model everywhere
    masks[1, 2, :32] = 2  # image 1: candidate 2 half wrong, candidate 0 right
    masks[1, 0, :, :] = 0
    images = torch.arange(2 * 3, dtype=torch.float32).reshape(2, 3, 1, 1, 1).expand(2, 3, 3, 64, 64).clone()
    batch = {
        "candidate_image": images, "candidate_mask": masks, "candidate_source_yx": torch.zeros(2, 3, 2, 64, 64),
        "candidate_crop_kind": torch.tensor([[0, 1, 2], [0, 0, 1]]), "image": images[:, 0], "mask": masks[:, 0],
        "sample_id": ["a", "b"],
    }  # fmt: skip
    model = ConstantClassZero().train()
    buffers = [b.clone() for b in model.buffers()]
    chosen, scores = choose_candidates(
        model, OhemCrossEntropy(mode="topk", top_k=0.2, ignore_index=255), batch, scale=0.5,
        device=torch.device("cpu"), divisor=16,
    )  # fmt: skip
    assert scores.shape == (2, 3) and scores.argmax(1).tolist() == [1, 2]
    assert torch.equal(chosen["mask"], torch.stack([masks[0, 1], masks[1, 2]]))
    assert torch.equal(chosen["image"][:, 0, 0, 0], torch.tensor([1.0, 5.0]))
    assert chosen["crop_kind"].tolist() == [1, 1] and not any(k.startswith("candidate_") for k in chosen)
    assert model.seen == [(False, (6, 3, 32, 32))] and model.training  # eval mode, half size, one pass
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers(), strict=True))  # read-only
