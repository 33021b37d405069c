"""Online, dictionary-driven mining: the hard-pixel dictionary steers what the model sees while it trains.

The paper's OHEM forwards every region and backpropagates the hardest; at the level of crops,
the training loop already forwards every crop and the dictionary already holds, per image and
per cell of the original image, how often its pixels were hard. So from ``mining.start_epoch``
on, each training crop is, with probability ``mining.hard_crop_prob``, centred on a cell drawn
in proportion to hardness ** ``crop_sharpness``; with probability ``mining.rare_crop_prob``, on a
pixel of a class present in the image, the class drawn in proportion to its pixel frequency **
-``rare_power`` (DAFormer-style rare-class sampling, inside the image); otherwise the crop is the
usual uniform random crop. With probability ``mining.paste_prob`` a crop then gets a hard
rare-class region pasted in from another training image, labels with it (ClassMix / DACS-style
copy-paste, driven by the dictionary): the class is drawn in proportion to frequency **
-``rare_power`` x the share of its pixels that were hard in the dictionary's latest epoch,
another image as the source in proportion to its hard pixels of that class (over all epochs:
the dictionary's confusion counts accumulate), and the source window is centred on a pixel
of the class in a cell drawn by its hardness; every pixel of the class in that window replaces
the crop's. Pasted pixels train but are not counted by the dictionary (their ``source_yx`` row
is -1): they belong to another image. ``mining.sampler`` draws the images themselves by their hardness.

Both read a snapshot of the dictionary taken at the start of each epoch (`observe`): the
dictionary after the previous epoch, identical on every rank (it is merged after each epoch)
and restored exactly by a resume, so crops are deterministic under a seed, DDP-consistent and
resumable. Every image is seen once per epoch, so the snapshot holds each image's latest state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from segohem.bank import HardPixelBank
from segohem.config import MiningConfig
from segohem.crops import cut_window, hard_cell_centre
from segohem.data.datasets import SegmentationDataset
from segohem.data.samplers import EpochShuffleSampler, draw_seed
from segohem.refine import WeightedEpochSampler, image_weights, weights_from_shares

CROP_KINDS = ("uniform", "hard", "rare")
CANDIDATE_KEYS = ("image", "mask", "source_yx", "crop_kind", "pasted")
_CANDIDATE_STRIDE = 1000  # candidate j of a key is drawn as repeat j * 1000 of its image: its own seed
_PASTE_REPEAT = 1 << 30  # a pasted window's augmentation is seeded as a repeat from here on


def rare_pixel_centre(
    mask: np.ndarray, frequency: np.ndarray, *, power: float, ignore_index: int, rng: np.random.Generator
) -> tuple[float, float] | None:
    """A pixel of ``mask`` (scaled-image coordinates) of a class present, the class drawn in
    proportion to ``frequency[c] ** -power``; None when the mask holds no valid class."""
    classes, counts = np.unique(mask, return_counts=True)
    present = (classes != ignore_index) & (classes < len(frequency)) & (counts > 0)
    classes = classes[present]
    if not len(classes):
        return None
    weights = np.maximum(frequency[classes], 1e-6) ** -power  # a class never counted yet: rarest, finite
    chosen = classes[rng.choice(len(classes), p=weights / weights.sum())]
    rows, cols = np.nonzero(mask == chosen)
    pick = int(rng.integers(len(rows)))
    return float(rows[pick]), float(cols[pick])


def recall_weights(
    bank: HardPixelBank, *, power: float, momentum: float = 0.0, floor: float = 0.0
) -> np.ndarray | None:
    """``mining.class_weight_power``'s class weights: the share of each class's pixels the
    dictionary's latest epoch missed (hard and predicted as another class; 1 - the class's
    training recall under threshold OHEM, a lower bound of it under top-k: see
    `EpochClassStats.missed_fraction`), as `segohem.refine.weights_from_shares` weighs shares.
    None when the dictionary holds no epoch yet, or its latest epoch was recorded before misses
    were counted.

    ``momentum`` m > 0 smooths over epochs: missed and valid pixels are each summed over the
    epochs, epoch e weighted m ** (latest - e), back to the first epoch with missed counts, and
    the share is their ratio (m = 0: the latest epoch alone).

    ``floor`` f raises every weight below f to f, after the normalization. With f = 1 the
    missed classes are pushed up, and the ones the model already gets right all keep weight 1,
    not pushed down against each other (without it, road at 0.2 beside pavement at 0.7 let the
    model call road pavement, and the two traded pixels from epoch to epoch). The loss is a
    weighted mean, so only the ratios count.

    Unlike the hard fraction (`segohem.refine.class_weights_from_bank`), which saturates near 1
    for every thin class, the miss rate keeps falling for the classes the model is learning, so
    the weight moves on to the ones it is not (in a street scene: poles after bicyclists).
    """
    if not bank.epochs:
        return None
    latest = max(bank.epochs)
    if bank.epochs[latest].missed is None:
        return None
    missed_sum, valid_sum = np.zeros(bank.num_classes), np.zeros(bank.num_classes)
    for epoch in sorted(bank.epochs, reverse=True) if momentum > 0 else [latest]:
        stats = bank.epochs[epoch]
        if stats.missed is None:  # counted from here back only
            break
        decay = momentum ** (latest - epoch)
        missed_sum += decay * stats.missed
        valid_sum += decay * stats.valid
    with np.errstate(invalid="ignore", divide="ignore"):
        missed = np.where(valid_sum > 0, missed_sum / np.maximum(valid_sum, 1e-12), np.nan)
    return np.maximum(weights_from_shares(missed, power=power), floor)


class DictionaryCropDataset(Dataset[dict[str, Any]]):
    """Wraps the training dataset: crops placed by the dictionary (see the module docstring).

    ``placed_transform`` is the training transform without its random scale and crop (flip,
    jitter, normalization, padding), applied to a crop this wrapper placed. Uniform crops are
    the base dataset's own samples, untouched. ``last_kind`` counts (per process) the crops of
    each kind drawn since the epoch started: uniform, hard, rare.
    """

    def __init__(
        self, base: SegmentationDataset, cfg: MiningConfig, *, crop: tuple[int, int], scale: tuple[float, float],
        placed_transform: Callable[..., dict[str, Any]], cell_size: int,
    ) -> None:  # fmt: skip
        self.base, self.cfg, self.crop, self.scale = base, cfg, crop, scale
        self.placed_transform, self.cell_size = placed_transform, cell_size
        self.epoch = 0
        self.hardness: dict[str, np.ndarray] = {}
        self.frequency: np.ndarray | None = None
        self.paste_images = np.zeros(0, np.int64)  # dataset indices of the images the dictionary knows
        self.paste_counts = np.zeros((0, 0))  # (images, C) their hard pixels by true class, all epochs
        self.paste_totals = np.zeros(0)  # (C,) the column sums of paste_counts
        self._paste_row: dict[int, int] = {}  # dataset index -> its row in paste_counts
        self.class_hardness = np.zeros(0)  # (C,) share of each class's pixels that were hard, latest epoch
        self._index_of: dict[str, int] | None = None

    def __len__(self) -> int:
        return len(self.base)

    def sample_id(self, index: int) -> str:
        return self.base.sample_id(index)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.base.set_epoch(epoch)

    @property
    def active(self) -> bool:
        """Whether this epoch's crops are steered (``epoch`` counts from 0, ``start_epoch`` from 1)."""
        return self.epoch + 1 >= self.cfg.start_epoch

    def observe(self, bank: HardPixelBank, epoch: int) -> None:
        """Snapshot what the crops are placed by: each image's hardness map and the classes' pixel
        frequencies, from the dictionary as it stands at the start of ``epoch``."""
        self.hardness = {key: stats.hardness for key, stats in bank.samples.items()}
        self.cell_size = bank.cell_size  # the maps' own cells (a loaded bank keeps the size it was made with)
        valid = sum((stats.valid for stats in bank.epochs.values()), np.zeros(bank.num_classes, np.int64))
        self.frequency = valid / valid.sum() if valid.sum() > 0 else None
        if self.cfg.paste_prob > 0:  # paste sources: the images the dictionary knows, their hard pixels by class
            if self._index_of is None:
                self._index_of = {self.base.sample_id(i): i for i in range(len(self.base))}
            known = [(index, bank.samples[key]) for key, index in self._index_of.items() if key in bank.samples]
            self.paste_images = np.array([index for index, _ in known], np.int64)
            self._paste_row = {index: row for row, (index, _) in enumerate(known)}
            latest = bank.epochs[max(bank.epochs)] if bank.epochs else None
            classes = np.arange(bank.num_classes)  # a dictionary of another label set: only this dataset's classes
            ours = (classes < self.base.num_classes) & (classes != self.base.ignore_index)
            self.class_hardness = latest.hard / np.maximum(latest.valid, 1) * ours if latest else np.zeros(len(ours))
            self.paste_counts = (
                np.stack([stats.hard_positives() for _, stats in known]).astype(np.float64)
                if known
                else np.zeros((0, bank.num_classes))
            )
            self.paste_totals = self.paste_counts.sum(0)

    def crop_kind(self, key: int) -> tuple[str, np.random.Generator]:
        """The kind of crop sampler key ``key`` gets this epoch, and the generator that places it."""
        index, repeat = self.base.split_key(key)
        rng = np.random.default_rng(draw_seed(self.base.seed, "mining", self.epoch, index, repeat=repeat))
        if not self.active:
            return "uniform", rng
        draw = rng.random()
        if draw < self.cfg.hard_crop_prob:
            return "hard", rng
        if draw < self.cfg.hard_crop_prob + self.cfg.rare_crop_prob:
            return "rare", rng
        return "uniform", rng

    def __getitem__(self, key: int) -> dict[str, Any]:
        sample = self._one(key)
        if self.cfg.candidates > 1 and self.active:
            # the read-only network's candidates: this crop and M - 1 more, each placed by the
            # same rules with a seed of its own; the loop scores them and keeps the hardest
            others = [self._one(key + j * _CANDIDATE_STRIDE * len(self.base)) for j in range(1, self.cfg.candidates)]
            for name in CANDIDATE_KEYS:
                values = [sample[name], *(other[name] for other in others)]
                sample[f"candidate_{name}"] = torch.stack([torch.as_tensor(v) for v in values])
        return sample

    def _one(self, key: int) -> dict[str, Any]:
        kind, rng = self.crop_kind(key)
        sample = self._placed(key, kind, rng) if kind != "uniform" else None
        if sample is None:  # uniform, or nothing known to steer by yet
            sample = self.base[key]
            kind = "uniform"
        sample["crop_kind"] = CROP_KINDS.index(kind)
        sample["pasted"] = self._paste(key, sample) if self.cfg.paste_prob > 0 and self.active else 0
        return sample

    def paste_source(self, key: int) -> tuple[int, int, np.random.Generator] | None:
        """What sampler key ``key`` gets pasted in this epoch: (class, source image index, the
        generator that places the source window), or None (no paste drawn, or nothing known)."""
        index, repeat = self.base.split_key(key)
        rng = np.random.default_rng(draw_seed(self.base.seed, "paste", self.epoch, index, repeat=repeat))
        if rng.random() >= self.cfg.paste_prob or self.frequency is None or not len(self.paste_images):
            return None
        own = self._paste_row.get(index)  # never paste an image into itself
        others = self.paste_totals - (self.paste_counts[own] if own is not None else 0.0)
        known = others > 0  # classes with another image to take hard pixels of from
        weights = np.where(known, np.maximum(self.frequency, 1e-6) ** -self.cfg.rare_power * self.class_hardness, 0.0)
        if not weights.sum() > 0:
            return None
        chosen = int(rng.choice(len(weights), p=weights / weights.sum()))
        column = self.paste_counts[:, chosen].copy()
        if own is not None:
            column[own] = 0.0
        source = int(self.paste_images[rng.choice(len(column), p=column / column.sum())])
        return chosen, source, rng

    def _paste(self, key: int, sample: dict[str, Any]) -> int:
        """Paste into ``sample`` (in place) the pixels of a hard rare class from another image's
        window (see the module docstring); returns the number of pixels pasted."""
        drawn = self.paste_source(key)
        if drawn is None:
            return 0
        chosen, index, rng = drawn
        base, (low, high) = self.base, self.scale
        image, mask, source_yx, original_hw = base.load(index, scale=float(rng.uniform(low, high)))
        rows, cols = np.nonzero(mask == chosen)
        if not len(rows):
            return 0
        # a pixel of the class, weighted by its cell's hardness (the dictionary's hardest pixels of it)
        hardness = np.nan_to_num(self.hardness.get(base.sample_id(index), np.zeros((1, 1), np.float32)), nan=0.0)
        original = source_yx[rows, cols]  # (K, 2) original row / col of each pixel of the class
        cell_rows = np.minimum((original[:, 0] // self.cell_size).astype(int), hardness.shape[0] - 1)
        cell_cols = np.minimum((original[:, 1] // self.cell_size).astype(int), hardness.shape[1] - 1)
        weights = hardness[cell_rows, cell_cols].astype(np.float64) + 1e-3  # every pixel of it stays possible
        pick = int(rng.choice(len(rows), p=weights / weights.sum()))
        window = cut_window((image, mask, source_yx), (float(rows[pick]), float(cols[pick])), self.crop,
                            ignore_index=base.ignore_index)  # fmt: skip
        # the source's own augmentation draw: a repeat far beyond any sampler's, so no crop shares it
        source = base.finish(index, *window, original_hw, transform=self.placed_transform,
                             repeat=_PASTE_REPEAT + int(rng.integers(1 << 20)))  # fmt: skip
        region = source["mask"] == chosen
        if source["image"].shape != sample["image"].shape:  # a crop padded differently: nothing aligned to paste
            return 0
        sample["image"][:, region] = source["image"][:, region]
        sample["mask"][region] = chosen
        sample["source_yx"][:, region] = -1.0
        return int(region.sum())

    def _placed(self, key: int, kind: str, rng: np.random.Generator) -> dict[str, Any] | None:
        base = self.base
        index, repeat = base.split_key(key)
        low, high = self.scale
        scale = float(rng.uniform(low, high))
        if kind == "hard":
            hardness = self.hardness.get(base.sample_id(index))
            if hardness is None:
                return None
            centre = hard_cell_centre(hardness, cell_size=self.cell_size, sharpness=self.cfg.crop_sharpness, rng=rng)
            if centre is None:
                return None
            image, mask, source_yx, original_hw = base.load(index, scale=scale)
            # original pixels -> the scaled image's pixels
            centre = (centre[0] * image.shape[0] / original_hw[0], centre[1] * image.shape[1] / original_hw[1])
        else:
            if self.frequency is None:
                return None
            image, mask, source_yx, original_hw = base.load(index, scale=scale)
            centre = rare_pixel_centre(mask, self.frequency, power=self.cfg.rare_power,
                                       ignore_index=base.ignore_index, rng=rng)  # fmt: skip
            if centre is None:
                return None
        window = cut_window((image, mask, source_yx), centre, self.crop, ignore_index=base.ignore_index)
        return base.finish(index, *window, original_hw, transform=self.placed_transform, repeat=repeat)


class DictionarySampler(Sampler[int]):
    """The epoch's images: a seeded shuffle before ``mining.start_epoch``, then images drawn (with
    replacement) by their hardness in the dictionary, ``refine.sampler``'s scores, recomputed at
    the start of every epoch. The same on every rank, sharded by batch, resumable."""

    def __init__(self, dataset: Any, cfg: MiningConfig, *, seed: int, batch_size: int, rank: int = 0,
                 world_size: int = 1) -> None:  # fmt: skip
        self.sample_ids = [dataset.sample_id(i) for i in range(len(dataset))]
        self.cfg, self.epoch = cfg, 0
        shard = {"batch_size": batch_size, "rank": rank, "world_size": world_size}
        self.shuffle = EpochShuffleSampler(len(self.sample_ids), seed=seed, **shard)
        self.weighted = WeightedEpochSampler(np.ones(len(self.sample_ids)), seed=seed, **shard)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.shuffle.set_epoch(epoch)
        self.weighted.set_epoch(epoch)

    @property
    def active(self) -> bool:
        return self.epoch + 1 >= self.cfg.start_epoch

    def observe(self, bank: HardPixelBank, epoch: int) -> None:
        """Recompute the image weights from the dictionary at the start of ``epoch``."""
        if self.cfg.sampler != "none" and bank.samples:
            weights = image_weights(bank, self.sample_ids, score=self.cfg.sampler, floor=self.cfg.sampler_floor)
            self.weighted = WeightedEpochSampler(
                weights, seed=self.shuffle.seed, batch_size=self.shuffle.batch_size, rank=self.shuffle.rank,
                world_size=self.shuffle.world_size,
            )  # fmt: skip
            self.weighted.set_epoch(epoch)

    def _current(self) -> Sampler[int]:
        return self.weighted if self.active and self.cfg.sampler != "none" else self.shuffle

    def __len__(self) -> int:
        return len(self.shuffle)

    def __iter__(self) -> Iterator[int]:
        return iter(self._current())


@torch.no_grad()
def choose_candidates(
    model: torch.nn.Module, loss_fn: Callable[..., Any], batch: dict[str, Any], *, scale: float,
    device: torch.device, divisor: int = 32,
) -> tuple[dict[str, Any], torch.Tensor]:  # fmt: skip
    """The paper's read-only network: score each image's M candidate crops with a no-grad
    forward (batch-norm in eval mode, at ``scale`` of the crop size, rounded to ``divisor``)
    and keep the hardest. A crop's score is the mean loss of the pixels the OHEM rule keeps in
    it, so crops with more valid pixels are not favoured. Returns the batch with ``image``,
    ``mask``, ``source_yx`` and ``crop_kind`` replaced by the chosen candidates (the
    ``candidate_*`` keys removed), and the (B, M) scores.
    """
    images = batch["candidate_image"]  # (B, M, 3, H, W)
    num_images, num_candidates = images.shape[:2]
    flat = images.flatten(0, 1).to(device)
    masks = batch["candidate_mask"].flatten(0, 1).to(device)
    height, width = flat.shape[-2:]
    size = (
        max(divisor, round(height * scale / divisor) * divisor),
        max(divisor, round(width * scale / divisor) * divisor),
    )
    if size != (height, width):
        flat = torch.nn.functional.interpolate(flat, size=size, mode="bilinear", align_corners=False)
        masks = torch.nn.functional.interpolate(masks[:, None].float(), size=size, mode="nearest")[:, 0].long()
    was_training = model.training
    model.eval()
    try:
        logits = model(flat)
    finally:
        model.train(was_training)
    result = loss_fn(logits.float(), masks)
    kept = result.hard_mask.reshape(len(flat), -1).float()
    losses = result.pixel_loss.reshape(len(flat), -1)
    scores = ((losses * kept).sum(1) / kept.sum(1).clamp(min=1)).reshape(num_images, num_candidates)
    chosen = scores.argmax(1).cpu()
    rows = torch.arange(num_images)
    out = {key: value for key, value in batch.items() if not key.startswith("candidate_")}
    for name in CANDIDATE_KEYS:
        if f"candidate_{name}" in batch:
            out[name] = batch[f"candidate_{name}"][rows, chosen]
    return out, scores
