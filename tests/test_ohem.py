import itertools
import math
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from segohem import ohem
from segohem.ohem import (
    KeepAmount,
    OhemCrossEntropy,
    _topk_rows,
    keep_floor_at,
    parse_amount,
    resolve_count,
    select_hard_pixels,
)

IGNORE = 255


def logits_for_probs(true_probs: torch.Tensor, target: torch.Tensor, num_classes: int = 3) -> torch.Tensor:
    """Logits whose softmax gives exactly ``true_probs`` for the target class (rest split evenly)."""
    probs = ((1 - true_probs) / (num_classes - 1)).unsqueeze(1).repeat(1, num_classes, 1, 1)
    probs.scatter_(1, target.clamp(0, num_classes - 1).unsqueeze(1), true_probs.unsqueeze(1))
    return probs.log()


def random_batch(seed: int = 0, *, n: int = 3, c: int = 5, h: int = 8, w: int = 9):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, h, w, generator=gen) * 2
    target = torch.randint(0, c, (n, h, w), generator=gen)
    target[torch.rand(n, h, w, generator=gen) < 0.2] = IGNORE
    return logits, target


def test_keep_all_equals_cross_entropy():
    logits, target = random_batch()
    expected = F.cross_entropy(logits, target, ignore_index=IGNORE)
    for loss_fn in (
        OhemCrossEntropy(mode="none", ignore_index=IGNORE),
        OhemCrossEntropy(mode="threshold", thresh=1.0, min_kept="100%", ignore_index=IGNORE),
        OhemCrossEntropy(mode="topk", top_k="100%", ignore_index=IGNORE),
    ):
        result = loss_fn(logits, target)
        torch.testing.assert_close(result.loss, expected)
        assert torch.equal(result.hard_mask, target != IGNORE)


def test_class_weighted_keep_all_equals_weighted_cross_entropy():
    logits, target = random_batch(1)
    weight = torch.tensor([1.0, 2.0, 0.5, 3.0, 1.5])
    expected = F.cross_entropy(logits, target, weight=weight, ignore_index=IGNORE)
    result = OhemCrossEntropy(mode="none", class_weight=weight, ignore_index=IGNORE)(logits, target)
    torch.testing.assert_close(result.loss, expected)


def test_threshold_counts_and_min_kept_fallback():
    # Image 0: 4 pixels below 0.7 (kept by the threshold). Image 1: only 1 below, min_kept=3.
    probs = torch.tensor(
        [[[0.1, 0.2, 0.3, 0.5], [0.8, 0.9, 0.95, 0.99]], [[0.6, 0.75, 0.8, 0.85], [0.9, 0.95, 0.97, 0.99]]]
    )
    target = torch.zeros(2, 2, 4, dtype=torch.long)
    loss_fn = OhemCrossEntropy(mode="threshold", thresh=0.7, min_kept=3, ignore_index=IGNORE)
    result = loss_fn(logits_for_probs(probs, target), target)
    assert result.num_kept.tolist() == [4, 3]
    assert torch.equal(result.hard_mask[0], probs[0] < 0.7)
    assert torch.equal(result.hard_mask[1], probs[1] <= 0.8)
    torch.testing.assert_close(result.prob_threshold, torch.tensor([0.7, 0.8]))
    # min_kept as a fraction: 50% of 8 valid pixels = 4 in image 1
    result = OhemCrossEntropy(mode="threshold", thresh=0.7, min_kept=0.5, ignore_index=IGNORE)(
        logits_for_probs(probs, target), target
    )
    assert result.num_kept.tolist() == [4, 4]
    assert torch.equal(result.hard_mask[1], probs[1] <= 0.85)


def test_topk_exact_counts_per_image_with_count_and_fraction():
    logits, target = random_batch(2, n=4, h=10, w=10)
    num_valid = (target != IGNORE).flatten(1).sum(1)
    result = OhemCrossEntropy(mode="topk", top_k=7, ignore_index=IGNORE)(logits, target)
    assert result.num_kept.tolist() == [7] * 4
    assert result.hard_mask.flatten(1).sum(1).tolist() == [7] * 4
    result = OhemCrossEntropy(mode="topk", top_k=0.25, ignore_index=IGNORE)(logits, target)
    expected = [math.ceil(0.25 * int(v)) for v in num_valid]
    assert result.hard_mask.flatten(1).sum(1).tolist() == expected
    # the kept pixels are the hardest ones
    for i in range(4):
        kept_loss = result.pixel_loss[i][result.hard_mask[i]]
        dropped = result.pixel_loss[i][(~result.hard_mask[i]) & (target[i] != IGNORE)]
        assert kept_loss.min() >= dropped.max()


def test_ignored_pixels_never_selected_even_when_hardest():
    _, target = random_batch(3)
    # make the ignored pixels look hardest of all if anyone looked at them
    pixel_loss = torch.rand(target.shape)
    pixel_loss[target == IGNORE] = 100.0
    valid = target != IGNORE
    for mode in ("threshold", "topk", "none"):
        for scope in ("image", "batch"):
            sel = select_hard_pixels(pixel_loss, valid, mode=mode, min_kept="100%", top_k="100%", scope=scope)
            assert not sel.hard_mask[~valid].any()
            assert sel.num_kept.tolist() == valid.flatten(1).sum(1).tolist()


def test_per_image_selection_is_independent_of_the_rest_of_the_batch():
    logits, target = random_batch(4, n=4)
    for mode in ("threshold", "topk"):
        loss_fn = OhemCrossEntropy(mode=mode, thresh=0.5, min_kept=0.3, top_k=0.2, ignore_index=IGNORE)
        full = loss_fn(logits, target)
        for i in range(4):
            alone = loss_fn(logits[i : i + 1], target[i : i + 1])
            assert torch.equal(full.hard_mask[i], alone.hard_mask[0])
        shuffled = loss_fn(logits.flip(0), target.flip(0))
        assert torch.equal(shuffled.hard_mask.flip(0), full.hard_mask)


def test_batch_scope_pools_images_like_mmseg():
    # Image 0 all easy, image 1 all hard: batch top-k takes everything from image 1.
    probs = torch.stack([torch.full((2, 4), 0.95), torch.full((2, 4), 0.2)])
    target = torch.zeros(2, 2, 4, dtype=torch.long)
    logits = logits_for_probs(probs, target)
    batch = OhemCrossEntropy(mode="topk", top_k=4, scope="batch", ignore_index=IGNORE)(logits, target)
    assert batch.num_kept.tolist() == [0, 8]  # 4 per image x 2 images, all from the hard one
    per_image = OhemCrossEntropy(mode="topk", top_k=4, ignore_index=IGNORE)(logits, target)
    assert per_image.num_kept.tolist() == [4, 4]


def test_gradient_is_zero_outside_the_kept_mask():
    logits, target = random_batch(5)
    logits.requires_grad_()
    result = OhemCrossEntropy(mode="topk", top_k=0.3, ignore_index=IGNORE)(logits, target)
    result.loss.backward()
    grad_norm = logits.grad.abs().sum(1)  # (N, H, W)
    assert torch.all(grad_norm[~result.hard_mask] == 0)
    assert torch.all(grad_norm[result.hard_mask] > 0)


def test_nothing_to_keep_gives_zero_connected_loss():
    logits, target = random_batch(6)
    logits.requires_grad_()
    all_ignored = torch.full_like(target, IGNORE)
    for loss_fn in (
        OhemCrossEntropy(mode="threshold", min_kept=100, ignore_index=IGNORE),
        OhemCrossEntropy(mode="topk", ignore_index=IGNORE),
    ):
        result = loss_fn(logits, all_ignored)
        assert result.loss.item() == 0.0 and result.loss.requires_grad
        result.loss.backward()
        assert torch.all(logits.grad == 0)
        logits.grad = None
    # saturated probabilities, threshold keeps nothing and min_kept is 0
    target = torch.zeros(1, 2, 2, dtype=torch.long)
    easy = logits_for_probs(torch.full((1, 2, 2), 0.999), target).requires_grad_()
    result = OhemCrossEntropy(mode="threshold", thresh=0.7, min_kept=0, ignore_index=IGNORE)(easy, target)
    assert result.num_kept.sum() == 0 and result.loss.item() == 0.0 and not torch.isnan(result.loss)
    result.loss.backward()
    assert easy.grad is not None


def test_ties_are_broken_by_pixel_index():
    pixel_loss = torch.ones(1, 2, 5)
    valid = torch.ones(1, 2, 5, dtype=torch.bool)
    valid[0, 0, 0] = False
    sel = select_hard_pixels(pixel_loss, valid, mode="topk", top_k=3)
    assert sel.hard_mask.flatten().nonzero().flatten().tolist() == [1, 2, 3]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_selection_is_in_fp32_for_half_precision_logits(dtype):
    # Target logits one half-precision step apart (exact in `dtype`): their fp32 losses are all
    # distinct and rise with the pixel index, but a loss computed in `dtype` rounds them into
    # ties, which the index tie-break would resolve towards the wrong (lower) pixels.
    num_pixels, num_classes = 16, 8
    logits = torch.zeros(1, num_classes, 1, num_pixels)
    logits[0, 0, 0] = -(0.5 + torch.arange(num_pixels) * torch.finfo(dtype).eps / 2)
    logits = logits.to(dtype)
    target = torch.zeros(1, 1, num_pixels, dtype=torch.long)
    loss_fn = OhemCrossEntropy(mode="topk", top_k=3, ignore_index=IGNORE)
    fp32_mask = loss_fn(logits.float(), target).hard_mask
    assert fp32_mask.flatten().nonzero().flatten().tolist() == [13, 14, 15]
    assert torch.equal(loss_fn(logits, target).hard_mask, fp32_mask)
    # the test can fail: losses computed in `dtype` would choose other pixels
    half_loss = F.cross_entropy(logits, target, reduction="none")
    half_mask = select_hard_pixels(half_loss, target >= 0, mode="topk", top_k=3).hard_mask
    assert half_loss.dtype == dtype and not torch.equal(half_mask, fp32_mask)


def test_warmup_ramps_kept_fraction_from_all_to_target():
    logits, target = random_batch(7, h=20, w=20)
    loss_fn = OhemCrossEntropy(mode="topk", top_k=0.1, warmup_steps=100, ignore_index=IGNORE)
    fractions = [loss_fn(logits, target, step=s).kept_fraction.mean().item() for s in (0, 50, 100, 500)]
    assert fractions[0] == pytest.approx(1.0)
    assert fractions[1] == pytest.approx(0.5, abs=0.02)
    assert fractions[2] == pytest.approx(0.1, abs=0.02) and fractions[3] == fractions[2]
    assert keep_floor_at(None, 100) == 0.0 and keep_floor_at(25, 100) == 0.75


def test_bad_labels_and_arguments_raise_clear_errors():
    logits, target = random_batch(8)
    target[0, 0, 0] = 7
    with pytest.raises(ValueError, match=r"label values \[7\]"):
        OhemCrossEntropy(ignore_index=IGNORE)(logits, target)
    with pytest.raises(ValueError, match="unknown mining mode 'hardest'"):
        OhemCrossEntropy(mode="hardest")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="thresh"):
        OhemCrossEntropy(thresh=1.5)
    with pytest.raises(ValueError, match="fraction"):
        resolve_count(1.5, torch.tensor([10]))
    with pytest.raises(ValueError, match=r"top_k=0: a pixel count must be >= 1"):
        OhemCrossEntropy(mode="topk", top_k=0)
    with pytest.raises(ValueError, match=r"min_kept=1\.0: .*ambiguous; write '100%'.*or the integer 1"):
        OhemCrossEntropy(min_kept=1.0)
    with pytest.raises(ValueError, match="upsample"):
        OhemCrossEntropy()(logits, target[:, :4])


def test_amount_is_a_count_a_fraction_or_a_percentage():
    num_valid = torch.tensor([0, 7, 10, 1000])
    assert resolve_count(1, num_valid).tolist() == [0, 1, 1, 1]  # one pixel, not all of them
    assert resolve_count("100%", num_valid).tolist() == [0, 7, 10, 1000]
    assert resolve_count(0.2, num_valid).tolist() == resolve_count("20%", num_valid).tolist() == [0, 2, 2, 200]
    assert resolve_count("12.5%", num_valid).tolist() == [0, 1, 2, 125]  # rounded up
    assert resolve_count(3, num_valid, per_row_images=4).tolist() == [0, 7, 10, 12]
    assert resolve_count(0, num_valid).tolist() == resolve_count("0%", num_valid).tolist() == [0, 0, 0, 0]
    assert parse_amount(" 20 % ") == KeepAmount(None, 0.2)
    for bad, advice in (
        (1.0, r"ambiguous; write '100%' to keep every valid pixel, or the integer 1"),
        (1000.0, r"or the integer 1000 for a count"),
        (2.5, r"fraction strictly between 0 and 1; write an integer pixel count"),
        (0.0, r"write 0 for no pixels"),
        (-3, r"must be >= 0"),
        (True, r"write an integer pixel count"),
        ("20", r"a percentage is from 0% to 100%, like '20%'"),
        ("120%", r"from 0% to 100%"),
        (float("nan"), r"fraction strictly between 0 and 1"),
    ):
        with pytest.raises(ValueError, match=rf"^min_kept={re.escape(repr(bad))}: .*{advice}"):
            parse_amount(bad, name="min_kept")
    for bad in (0, "0%", 0.0):
        with pytest.raises(ValueError, match=r"^top_k="):
            parse_amount(bad, name="top_k", positive=True)


def test_core_imports_no_heavy_optional_packages():
    code = (
        "import sys, segohem.ohem; "
        "bad = [m for m in ('cv2', 'albumentations', 'segmentation_models_pytorch', 'wandb') if m in sys.modules]; "
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_topk_matches_a_stable_sort_reference_with_many_ties():
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        pixel_loss = torch.randint(0, 4, (3, 5, 7), generator=gen).float()  # many exact ties
        valid = torch.rand(3, 5, 7, generator=gen) > 0.2
        k = int(torch.randint(1, 12, (1,), generator=gen))
        sel = select_hard_pixels(pixel_loss, valid, mode="topk", top_k=k)
        for i in range(3):
            flat_loss, flat_valid = pixel_loss[i].flatten().tolist(), valid[i].flatten().tolist()
            candidates = [j for j in range(len(flat_loss)) if flat_valid[j]]
            chosen = sorted(candidates, key=lambda j: (-flat_loss[j], j))[:k]
            assert sel.hard_mask[i].flatten().nonzero().flatten().tolist() == sorted(chosen)


def test_sort_and_kthvalue_paths_choose_the_same_pixels():
    """CUDA ranks rows with a stable sort, the CPU with kthvalue: the same mask and k-th loss."""
    gen = torch.Generator().manual_seed(1)
    for trial in range(40):
        rows, width = int(torch.randint(1, 5, (1,), generator=gen)), int(torch.randint(1, 300, (1,), generator=gen))
        if trial % 2:  # many exact ties, as saturated losses late in training
            row_loss = torch.randint(0, 3, (rows, width), generator=gen).float()
        else:
            row_loss = torch.rand(rows, width, generator=gen)
        valid = torch.rand(rows, width, generator=gen) > 0.3
        valid[:, 0] = True
        row_loss = row_loss.masked_fill(~valid, -math.inf)
        num_valid = valid.sum(1)
        num_keep = (torch.rand(rows, generator=gen) * num_valid).long().clamp(min=1)
        mask_k, kth_k = _topk_rows(row_loss, num_keep, by_sort=False)
        mask_s, kth_s = _topk_rows(row_loss, num_keep, by_sort=True)
        assert torch.equal(mask_k, mask_s) and torch.equal(kth_k, kth_s)
        assert torch.equal(mask_s.sum(1), num_keep) and not (mask_s & ~valid).any()


# Operations that make the host wait for the device on CUDA: a scalar read (item, bool, float),
# or an output whose shape depends on the data.
HOST_QUESTIONS = {
    "aten._local_scalar_dense.default", "aten.is_nonzero.default", "aten.equal.default",
    "aten.nonzero.default", "aten.masked_select.default", "aten.bincount.default",
    "aten._unique2.default", "aten.unique_dim.default", "aten.unique_consecutive.default",
    "aten.repeat_interleave.Tensor",
}  # fmt: skip


class HostQuestions(TorchDispatchMode):
    """Records the operations that would stall a CUDA stream (boolean-mask indexing included)."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = str(func)
        indices = args[1] if name.startswith(("aten.index.", "aten.index_put")) and len(args) > 1 else []
        if name in HOST_QUESTIONS or any(i is not None and i.dtype == torch.bool for i in indices):
            self.asked.append(name)
        return func(*args, **(kwargs or {}))


@contextmanager
def sync_free_path() -> Iterator[None]:
    """Run the selection's CUDA path (no host decisions) on the CPU."""
    with mock.patch.object(ohem, "_sync_free", lambda tensor: True):
        yield


def asks_the_host(fn: Callable[[], Any]) -> list[str]:
    """The host-stalling operations ``fn`` runs, run once to warm up and once recorded."""
    fn()
    with HostQuestions() as recorder:
        fn()
    return recorder.asked


def all_rules() -> Iterator[dict[str, Any]]:
    for mode, scope in itertools.product(["threshold", "topk", "none"], ["image", "batch"]):
        yield dict(mode=mode, scope=scope, thresh=0.6, min_kept=0.3, top_k=0.2)


def test_the_cuda_path_asks_the_host_nothing_in_any_mode_or_scope():
    logits, target = random_batch(11, h=12, w=13)
    weight = torch.rand(target.shape)
    for rule in all_rules():
        loss_fn = OhemCrossEntropy(**rule, class_weight=[1.0, 2.0, 0.5, 1.0, 3.0], warmup_steps=10,
                                   ignore_index=IGNORE)  # fmt: skip

        def step(fn: OhemCrossEntropy = loss_fn) -> None:
            leaf = logits.clone().requires_grad_()
            fn(leaf, target, step=3, pixel_weight=weight).loss.backward()

        with sync_free_path():
            assert asks_the_host(step) == [], rule
        # the recorder can fail: the CPU path asks (label check, rows short of k)
        assert "aten._local_scalar_dense.default" in asks_the_host(step)


def test_the_cuda_path_gives_the_cpu_path_result_in_every_mode_and_scope():
    for seed, rule in itertools.product(range(4), all_rules()):
        logits, target = random_batch(seed, n=3, h=9, w=11)
        if seed % 2:  # saturated probabilities: exact ties at the k-th value
            logits = logits.round()
        loss_fn = OhemCrossEntropy(**rule, class_weight=[1.0, 2.0, 0.5, 1.0, 3.0], warmup_steps=10,
                                   ignore_index=IGNORE)  # fmt: skip
        host = loss_fn(logits, target, step=seed * 3)
        with sync_free_path():
            device = loss_fn(logits, target, step=seed * 3)
        for name, expected, actual in zip(host._fields, host, device, strict=True):
            assert torch.equal(expected, actual), (name, rule, seed)


def test_the_cuda_path_refuses_bad_labels_with_a_device_assert():
    logits, target = random_batch(8)
    target[0, 0, 0] = 7
    with sync_free_path(), pytest.raises(RuntimeError, match=r"label values outside \[0, 5\) .*ignore_index 255"):
        OhemCrossEntropy(ignore_index=IGNORE)(logits, target)
