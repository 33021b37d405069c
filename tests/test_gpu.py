"""CUDA only: the OHEM loss and the dictionary update never make the host wait, and the CUDA
selection chooses the CPU's pixels."""

from __future__ import annotations

import itertools
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from segohem.bank import HardPixelBank
from segohem.ohem import MINING_MODES, MINING_SCOPES, OhemCrossEntropy, select_hard_pixels

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

IGNORE, NUM_CLASSES = 255, 19
WEIGHTS = [1.0 + (c % 3) / 2 for c in range(NUM_CLASSES)]
# Rows of 3072 pixels go through torch's in-place small sort, longer ones through its segmented sort.
SIZES = [(48, 64), (64, 128)]


@contextmanager
def no_host_sync() -> Iterator[None]:
    """Any operation that makes the host wait for the GPU raises inside this block."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def random_batch(seed: int, *, height: int, width: int, n: int = 3, saturated: bool = False):
    """(logits (n, C, H, W), target (n, H, W)) on CUDA: an ignored strip, one image all ignored;
    ``saturated`` logits give many exact ties at the k-th value."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, NUM_CLASSES, height, width, generator=gen) * 3
    target = torch.randint(0, NUM_CLASSES, (n, height, width), generator=gen)
    if saturated:
        logits = logits.round().clamp(-2, 2)
    target[:, :, : width // 10] = IGNORE
    target[-1] = IGNORE
    return logits.cuda(), target.cuda()


def test_sync_debug_mode_catches_a_host_sync():
    """The check below can fail: a plain .item() raises in this mode."""
    value = torch.ones(1, device="cuda")
    with no_host_sync(), pytest.raises(RuntimeError, match="synchroniz"):
        value.item()


@pytest.mark.parametrize("size", SIZES, ids=lambda size: f"{size[0]}x{size[1]}")
@pytest.mark.parametrize(("mode", "scope"), list(itertools.product(MINING_MODES, MINING_SCOPES)))
@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16"])
def test_loss_forward_and_backward_make_no_host_sync(mode, scope, size, amp):
    logits, target = random_batch(0, height=size[0], width=size[1])
    pixel_weight = torch.rand(target.shape, device="cuda")
    loss_fn = OhemCrossEntropy(mode=mode, scope=scope, thresh=0.7, min_kept=0.3, top_k=0.2, ignore_index=IGNORE,
                               class_weight=WEIGHTS, warmup_steps=10).cuda()  # fmt: skip

    def step() -> torch.Tensor:
        leaf = logits.clone().requires_grad_()
        scores = leaf.bfloat16() if amp else leaf  # what a model under bf16 autocast returns
        result = loss_fn(scores, target, step=4, pixel_weight=pixel_weight)
        result.loss.backward()
        assert leaf.grad is not None
        return result.loss.detach()

    step()  # warm-up outside the check: allocator, kernels
    with no_host_sync():
        loss = step()
    assert torch.isfinite(loss).item()


def bank_arguments(seed: int, *, device: str) -> dict:
    gen = torch.Generator().manual_seed(seed)
    n, h, w = 4, 64, 96
    rows, cols = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    target = torch.randint(0, NUM_CLASSES, (n, h, w), generator=gen)
    target[:, :5] = IGNORE
    hw = torch.tensor([[2 * h, 2 * w], [h, w], [h + 7, w + 3], [3 * h, w]])
    scale = hw.float() / torch.tensor([h, w])
    return dict(
        sample_ids=[f"image{seed % 3}-{i}" for i in range(n)],
        hard_mask=(torch.rand(n, h, w, generator=gen) < 0.3).to(device) & (target != IGNORE).to(device),
        pixel_loss=(torch.rand(n, h, w, generator=gen) * 4).to(device), target=target.to(device),
        pred=torch.randint(0, NUM_CLASSES, (n, h, w), generator=gen).to(device),
        source_yx=(torch.stack([rows, cols]) * scale[:, :, None, None]).to(device), source_hw=hw, epoch=seed % 2,
    )  # fmt: skip


def test_bank_update_makes_no_host_sync_and_equals_the_cpu_bank():
    on_cuda, on_cpu = HardPixelBank(NUM_CLASSES, cell_size=8), HardPixelBank(NUM_CLASSES, cell_size=8)
    on_cuda.update(**bank_arguments(0, device="cuda"))  # warm-up: pinned memory, kernels
    on_cpu.update(**bank_arguments(0, device="cpu"))
    for seed in range(1, 9):  # more than max_in_flight updates, so some are folded while others fly
        arguments = bank_arguments(seed, device="cuda")
        with no_host_sync():
            on_cuda.update(**arguments)
        on_cpu.update(**bank_arguments(seed, device="cpu"))
    assert on_cuda.samples.keys() == on_cpu.samples.keys()  # reading folds what is still in flight
    for key, expected in on_cpu.samples.items():
        actual = on_cuda.samples[key]
        for name, value in vars(expected).items():
            got = getattr(actual, name)
            if name == "ema_hard_loss":  # a float32 sum, reduced in another order on the GPU
                assert got == pytest.approx(value, rel=1e-5), (key, name)
            else:
                assert np.array_equal(got, value) if isinstance(value, np.ndarray) else got == value, (key, name)
    for epoch, history in on_cpu.epochs.items():
        assert np.array_equal(on_cuda.epochs[epoch].hard, history.hard)
        assert np.array_equal(on_cuda.epochs[epoch].valid, history.valid)


@pytest.mark.parametrize("size", SIZES, ids=lambda size: f"{size[0]}x{size[1]}")
def test_cuda_selection_equals_the_cpu_selection(size):
    for seed, (mode, scope) in itertools.product(range(6), itertools.product(MINING_MODES, MINING_SCOPES)):
        logits, target = random_batch(seed, height=size[0], width=size[1], saturated=seed % 2 == 1)
        loss_fn = OhemCrossEntropy(mode=mode, scope=scope, thresh=0.7, min_kept=0.4, top_k=0.2, ignore_index=IGNORE)
        on_cuda, on_cpu = loss_fn(logits, target, step=seed), loss_fn(logits.cpu(), target.cpu(), step=seed)
        where = f"mode={mode} scope={scope} seed={seed}"
        torch.testing.assert_close(on_cuda.pixel_loss.cpu(), on_cpu.pixel_loss, msg=where)
        # the devices' losses may differ in the last bit and so pick another pixel at the k-th value
        torch.testing.assert_close(on_cuda.loss.cpu(), on_cpu.loss, rtol=1e-3, atol=1e-6, msg=where)
        # the selection itself, from the same per-pixel losses, is identical
        rule = dict(mode=mode, scope=scope, thresh=0.7, min_kept=0.4, top_k=0.2)
        pixel_loss, valid = on_cpu.pixel_loss, target.cpu() != IGNORE
        expected = select_hard_pixels(pixel_loss, valid, **rule)
        actual = select_hard_pixels(pixel_loss.cuda(), valid.cuda(), **rule)
        for name, want, got in zip(expected._fields, expected, actual, strict=True):
            if name == "prob_threshold":  # exp() of the same loss may round differently on the two devices
                torch.testing.assert_close(got.cpu(), want, rtol=1e-6, atol=0, msg=f"{name} {where}")
            else:
                assert torch.equal(got.cpu(), want), (name, where)


def test_a_bad_label_on_cuda_trips_a_device_side_assert():
    """The check cannot raise in the process it poisons: run it in a child."""
    code = textwrap.dedent("""
        import torch
        from segohem.ohem import OhemCrossEntropy
        target = torch.zeros(1, 4, 4, dtype=torch.long, device="cuda")
        target[0, 0, 0] = 7
        OhemCrossEntropy(ignore_index=255)(torch.randn(1, 3, 4, 4, device="cuda"), target)
        torch.cuda.synchronize()
        print("no error")
    """)
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert child.returncode != 0 and "no error" not in child.stdout
    assert "device-side assert" in child.stderr or "CUDA error" in child.stderr, child.stderr[-2000:]
