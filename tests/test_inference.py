"""Whole and sliding-window inference, flip and multi-scale test-time augmentation, and their wiring."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from segohem.config import EvalConfig, load_config
from segohem.engine import inference
from segohem.engine.inference import (
    eval_logits,
    infer_logits,
    slide_windows,
    valid_sizes,
    window_counts,
    working_size_of,
)

NUM_CLASSES = 5


def conv_model(kernel: int = 3, *, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    padding = kernel // 2
    return nn.Sequential(
        nn.Conv2d(3, 6, kernel, padding=padding), nn.ReLU(), nn.Conv2d(6, NUM_CLASSES, kernel, padding=padding)
    ).eval()


def symmetric_conv_model() -> nn.Module:
    """3x3 convolutions whose kernels are mirror-symmetric left to right: flip-equivariant."""
    model = conv_model(3)
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, nn.Conv2d):
                layer.weight.copy_((layer.weight + layer.weight.flip(-1)) / 2)
    return model


class DivisibleOnly(nn.Module):
    """Wraps a model and refuses inputs whose sides are not multiples of ``divisor`` (as a Unet does)."""

    def __init__(self, model: nn.Module, divisor: int) -> None:
        super().__init__()
        self.model, self.divisor = model, divisor

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        assert images.shape[-2] % self.divisor == 0 and images.shape[-1] % self.divisor == 0, images.shape
        return self.model(images)


class Recorder(nn.Module):
    """Returns ones and keeps every input it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.inputs: list[torch.Tensor] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.inputs.append(images.clone())
        return images.new_ones(images.shape[0], NUM_CLASSES, *images.shape[-2:])


def images_of(num: int, height: int, width: int, *, seed: int = 1) -> torch.Tensor:
    return torch.randn(num, 3, height, width, generator=torch.Generator().manual_seed(seed))


def test_slide_with_one_window_covering_the_image_equals_whole():
    model, images = conv_model(), images_of(2, 12, 20)
    whole = infer_logits(model, images, num_classes=NUM_CLASSES)
    assert whole.shape == (2, NUM_CLASSES, 12, 20) and whole.dtype == torch.float32
    torch.testing.assert_close(whole, model(images), rtol=0, atol=0)
    for stride in [(12, 20), (5, 7)]:
        slide = infer_logits(model, images, num_classes=NUM_CLASSES, mode="slide", crop=(12, 20), stride=stride)
        torch.testing.assert_close(slide, whole)


def test_window_positions_and_counts_follow_mmseg():
    # height 10, crop 4, stride 3: rows start at 0, 3, 6; width 7, crop 4, stride 2: 0, 2, then 3 (at the border)
    assert slide_windows(10, 7, crop=(4, 4), stride=(3, 2)) == [(t, left) for t in (0, 3, 6) for left in (0, 2, 3)]
    rows = torch.tensor([1, 1, 1, 2, 1, 1, 2, 1, 1, 1.0])
    cols = torch.tensor([1, 1, 2, 3, 2, 2, 1.0])
    torch.testing.assert_close(window_counts(10, 7, crop=(4, 4), stride=(3, 2)), rows[:, None] * cols[None, :])
    assert slide_windows(8, 8, crop=(8, 8), stride=(3, 3)) == [(0, 0)]


@pytest.mark.parametrize(("height", "width", "crop", "stride"), [(10, 7, (4, 4), (3, 2)), (13, 17, (8, 6), (5, 6))])
def test_each_pixel_is_averaged_over_exactly_the_windows_that_cover_it(height, width, crop, stride):
    """A model returning ones gives exactly one everywhere only if each pixel's sum is divided by its
    count; the windows the model actually saw give the count map independently of `window_counts`."""
    recorder = Recorder()
    flat_index = torch.arange(height * width, dtype=torch.float32).reshape(1, 1, height, width).expand(1, 3, -1, -1)
    logits = infer_logits(recorder, flat_index, num_classes=NUM_CLASSES, mode="slide", crop=crop, stride=stride,
                          batch_windows=2)  # fmt: skip
    torch.testing.assert_close(logits, torch.ones(1, NUM_CLASSES, height, width), rtol=0, atol=0)
    seen = torch.cat(recorder.inputs)[:, 0].long()  # (windows, crop H, crop W) flat pixel indices
    assert seen.shape[1:] == crop
    counts = torch.bincount(seen.flatten(), minlength=height * width).reshape(height, width).float()
    assert counts.min() >= 1
    torch.testing.assert_close(counts, window_counts(height, width, crop=crop, stride=stride), rtol=0, atol=0)


def test_a_pointwise_model_slides_to_the_whole_image_result_at_any_size():
    """With 1x1 convolutions every window predicts a pixel alike: any crop and stride equal whole,
    including sizes no divisor or stride divides and images smaller than the crop (padded, then cropped)."""
    model = conv_model(1)
    for height, width, crop, stride in [(13, 17, (8, 8), (5, 6)), (5, 9, (8, 8), (4, 4)), (11, 30, (16, 8), (16, 3))]:
        images = images_of(2, height, width)
        slide = infer_logits(DivisibleOnly(model, 8), images, num_classes=NUM_CLASSES, mode="slide", crop=crop,
                             stride=stride, size_divisor=8)  # fmt: skip
        assert slide.shape == (2, NUM_CLASSES, height, width)
        torch.testing.assert_close(slide, model(images), rtol=1e-5, atol=1e-6)


def test_inputs_are_padded_to_the_divisor_and_the_padding_cropped():
    model, images = conv_model(), images_of(1, 13, 17)
    whole = infer_logits(DivisibleOnly(model, 8), images, num_classes=NUM_CLASSES, size_divisor=8)
    assert whole.shape == (1, NUM_CLASSES, 13, 17)
    torch.testing.assert_close(whole, model(F.pad(images, (0, 7, 0, 3)))[:, :, :13, :17])
    slide = infer_logits(DivisibleOnly(model, 8), images, num_classes=NUM_CLASSES, mode="slide", crop=(12, 12),
                         stride=(8, 8), size_divisor=8)  # fmt: skip
    assert slide.shape == (1, NUM_CLASSES, 13, 17) and torch.isfinite(slide).all()


def test_batching_windows_gives_the_result_of_one_window_at_a_time():
    model, images = conv_model(), images_of(2, 19, 23)
    options = dict(num_classes=NUM_CLASSES, mode="slide", crop=(8, 12), stride=(5, 7))
    one_at_a_time = infer_logits(model, images, batch_windows=1, **options)
    for batch_windows in (3, 7, 100):
        torch.testing.assert_close(infer_logits(model, images, batch_windows=batch_windows, **options), one_at_a_time)
    with pytest.raises(AssertionError):  # windows matter: this model is not pointwise
        torch.testing.assert_close(one_at_a_time, infer_logits(model, images, num_classes=NUM_CLASSES))


def test_flip_of_a_flip_equivariant_model_changes_nothing():
    images = images_of(2, 10, 14)
    model = symmetric_conv_model()
    plain = infer_logits(model, images, num_classes=NUM_CLASSES)
    # columns 0-7 and 6-13: a window grid that is its own mirror image
    for mode_options in [{}, {"mode": "slide", "crop": (8, 8), "stride": (4, 6)}]:
        flipped = infer_logits(model, images, num_classes=NUM_CLASSES, flip=True, **mode_options)
        base = infer_logits(model, images, num_classes=NUM_CLASSES, **mode_options)
        # several views return log mean probabilities: log_softmax of the single view's logits
        torch.testing.assert_close(flipped, base.log_softmax(1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(infer_logits(model, images, num_classes=NUM_CLASSES, flip=True), plain.log_softmax(1))


def test_flip_averages_the_probabilities_of_the_image_and_its_mirror():
    model, images = conv_model(), images_of(1, 10, 14)
    expected = ((model(images).softmax(1) + model(images.flip(-1)).flip(-1).softmax(1)) / 2).log()
    flipped = infer_logits(model, images, num_classes=NUM_CLASSES, flip=True)
    torch.testing.assert_close(flipped, expected)
    assert not torch.allclose(flipped, model(images).log_softmax(1), atol=1e-3)  # this model is not symmetric


def test_one_scale_of_one_is_whole_and_several_scales_average_probabilities():
    model, images = conv_model(), images_of(2, 16, 24)
    whole = infer_logits(model, images, num_classes=NUM_CLASSES)
    torch.testing.assert_close(infer_logits(model, images, num_classes=NUM_CLASSES, scales=(1.0,)), whole)
    half = F.interpolate(model(F.interpolate(images, size=(8, 12), mode="bilinear")), size=(16, 24), mode="bilinear")
    expected = ((whole.softmax(1) + half.softmax(1)) / 2).log()
    multi = infer_logits(model, images, num_classes=NUM_CLASSES, scales=(1.0, 0.5))
    torch.testing.assert_close(multi, expected)
    assert multi.shape == (2, NUM_CLASSES, 16, 24) and torch.isfinite(multi).all()
    odd = infer_logits(DivisibleOnly(model, 4), images_of(1, 13, 17), num_classes=NUM_CLASSES, scales=(0.75, 1.25),
                       flip=True, mode="slide", crop=(8, 8), stride=(6, 6), size_divisor=4)  # fmt: skip
    assert odd.shape == (1, NUM_CLASSES, 13, 17) and torch.isfinite(odd).all()
    torch.testing.assert_close(odd.exp().sum(1), torch.ones(1, 13, 17))


def test_logits_of_another_size_are_resized_and_a_wrong_class_count_is_named():
    model = nn.Conv2d(3, NUM_CLASSES, 2, stride=2).eval()
    assert infer_logits(model, images_of(1, 8, 12), num_classes=NUM_CLASSES).shape == (1, NUM_CLASSES, 8, 12)
    with pytest.raises(ValueError, match=r"expected \(N, 7, H, W\)"):
        infer_logits(model, images_of(1, 8, 12), num_classes=7)


def test_eval_logits_runs_each_image_on_its_own_region_of_a_padded_batch():
    model = conv_model()
    padded = torch.zeros(2, 3, 16, 24)
    padded[0, :, :13, :17] = images_of(1, 13, 17, seed=3)[0]
    padded[1, :, :16, :20] = images_of(1, 16, 20, seed=4)[0]
    cfg = EvalConfig(mode="slide", crop=[8, 8], stride=[5, 5], batch_windows=3)
    logits = eval_logits(model, padded, cfg=cfg, num_classes=NUM_CLASSES, size_divisor=8,
                         valid_hw=[(13, 17), (16, 20)])  # fmt: skip
    assert logits.shape == (2, NUM_CLASSES, 16, 24)
    for index, (height, width) in enumerate([(13, 17), (16, 20)]):
        own = infer_logits(model, padded[index : index + 1, :, :height, :width], num_classes=NUM_CLASSES,
                           mode="slide", crop=(8, 8), stride=(5, 5))  # fmt: skip
        torch.testing.assert_close(logits[index : index + 1, :, :height, :width], own)
    # plain whole-image inference runs on the padded batch as the eval transform prepared it
    torch.testing.assert_close(
        eval_logits(model, padded, cfg=EvalConfig(), num_classes=NUM_CLASSES, size_divisor=8, valid_hw=[(13, 17)] * 2),
        model(padded),
    )


def test_valid_sizes_and_working_size():
    source_hw = torch.tensor([[360, 480], [359, 470]])
    assert valid_sizes(source_hw, None) == [(360, 480), (359, 470)]
    assert valid_sizes(source_hw, (180, 240)) == [(180, 240)] * 2
    assert working_size_of(load_config().data) is None
    assert working_size_of(load_config(None, ["data.resize=[48, 64]"]).data) == (48, 64)


@pytest.fixture
def recorded_modes(monkeypatch):
    """The ``mode`` of every `infer_logits` call made through `eval_logits`."""
    modes: list[str] = []
    original = inference.infer_logits

    def spy(*args, **kwargs):
        modes.append(kwargs["mode"])
        return original(*args, **kwargs)

    monkeypatch.setattr(inference, "infer_logits", spy)
    return modes


@pytest.fixture(scope="module")
def tiny_checkpoint(module_tmp_factory):
    from segohem.cli import run_train

    from .conftest import tiny_config

    tmp_path = module_tmp_factory("run")
    run_train(tiny_config(tmp_path, "train.max_steps=1", "data.image_size=[40, 56]", "train.num_panels=1"),
              resume_from=None)  # fmt: skip
    return tmp_path / "tiny" / "last.pt"


SLIDE = ["eval.mode=slide", "eval.crop=[32, 32]", "eval.stride=[16, 16]", "train.progress=false"]


def test_eval_predict_and_mine_use_the_eval_section(tiny_checkpoint, tmp_path, recorded_modes):
    import cv2
    import numpy as np

    from segohem.cli.commands import run_eval, run_mine, run_predict

    whole = run_eval(tiny_checkpoint, split="val", overrides=["train.progress=false"], output=None)
    assert recorded_modes == []  # plain whole-image inference never slides
    window_is_image = ["eval.mode=slide", "eval.crop=[64, 64]", "eval.stride=[64, 64]", "train.progress=false"]
    assert run_eval(tiny_checkpoint, split="val", overrides=window_is_image, output=None) == whole
    assert set(recorded_modes) == {"slide"}
    recorded_modes.clear()
    slid = run_eval(tiny_checkpoint, split="val", overrides=[*SLIDE, "eval.flip=true"], output=None)
    assert recorded_modes and set(recorded_modes) == {"slide"} and len(slid["iou"]) == 7
    recorded_modes.clear()
    inputs = tmp_path / "in"
    inputs.mkdir()
    cv2.imwrite(str(inputs / "a.png"), np.full((37, 45, 3), 120, np.uint8))
    assert run_predict(tiny_checkpoint, input_dir=inputs, output_dir=tmp_path / "out", overrides=SLIDE) == 0
    assert recorded_modes == ["slide"]
    assert cv2.imread(str(tmp_path / "out" / "a.png"), cv2.IMREAD_UNCHANGED).shape == (37, 45)
    recorded_modes.clear()
    run_mine(tiny_checkpoint, split="val", output=tmp_path / "mined.sqlite", overrides=SLIDE)
    assert recorded_modes and set(recorded_modes) == {"slide"}


def test_validation_and_panels_during_training_use_the_eval_section(tmp_path, recorded_modes):
    from segohem.cli import run_train

    from .conftest import tiny_config

    cfg = tiny_config(tmp_path, "train.max_steps=1", "data.image_size=[40, 56]", "train.num_panels=1",
                      "bank.enabled=false", *SLIDE)  # fmt: skip
    run_train(cfg, resume_from=None)
    # validation: 4 images in one batch (one call); the panel: one image (one call)
    assert recorded_modes == ["slide", "slide"]
