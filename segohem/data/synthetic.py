"""A street-like synthetic segmentation dataset, generated on the fly and deterministic per seed.

Large easy regions (sky, road, buildings), cars drawn in almost the road's colour (low
contrast), thin poles, small signs and rare small people, plus an ignored band at the
bottom of some images, like the ego-vehicle hood in real driving data.
"""

from __future__ import annotations

import numpy as np

from segohem.data.presets import SYNTHETIC

SKY, BUILDING, ROAD, CAR, POLE, SIGN, PERSON = range(7)
# Each split draws its scenes from its own random stream, so test images differ from val images.
SPLIT_KEYS = {"train": 0, "val": 1, "test": 2}


def _jitter(rng: np.random.Generator, rgb: tuple[int, int, int], amount: int) -> np.ndarray:
    return np.clip(np.array(rgb) + rng.integers(-amount, amount + 1, 3), 0, 255)


def render_scene(*, seed: int, split: str, index: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (image (H, W, 3) uint8 RGB, mask (H, W) uint8) for one synthetic sample."""
    rng = np.random.default_rng([seed, SPLIT_KEYS[split], index])
    image = np.zeros((height, width, 3), np.float32)
    mask = np.zeros((height, width), np.uint8)
    horizon = int(height * rng.uniform(0.35, 0.55))
    sky_rgb, road_rgb = _jitter(rng, (110, 160, 210), 30), _jitter(rng, (100, 100, 105), 20)
    image[:horizon] = sky_rgb
    image[horizon:] = road_rgb
    mask[horizon:] = ROAD
    for _ in range(rng.integers(1, 4)):  # buildings rising from the horizon
        x0 = int(rng.integers(0, width - 8))
        x1 = min(width, x0 + int(rng.integers(width // 8, width // 2)))
        top = int(rng.integers(2, max(3, horizon - 4)))
        image[top:horizon, x0:x1] = _jitter(rng, (140, 70, 60), 40)
        mask[top:horizon, x0:x1] = BUILDING
    for _ in range(rng.integers(0, 3)):  # cars: almost the road's colour
        car_h, car_w = int(rng.integers(height // 12, height // 6)), int(rng.integers(width // 10, width // 5))
        y0 = int(rng.integers(horizon, max(horizon + 1, height - car_h)))
        x0 = int(rng.integers(0, width - car_w))
        shift = rng.choice([-1, 1]) * rng.uniform(20, 32)  # about 2 noise sigmas from the road
        image[y0 : y0 + car_h, x0 : x0 + car_w] = np.clip(road_rgb + shift, 0, 255)
        mask[y0 : y0 + car_h, x0 : x0 + car_w] = CAR
    for _ in range(rng.integers(0, 4)):  # thin poles, some carrying a sign
        x0, pole_w = int(rng.integers(2, width - 4)), int(rng.integers(1, 3))
        top, bottom = int(rng.integers(2, horizon)), int(rng.integers(horizon + 2, height))
        image[top:bottom, x0 : x0 + pole_w] = _jitter(rng, (150, 150, 150), 25)
        mask[top:bottom, x0 : x0 + pole_w] = POLE
        if rng.random() < 0.5:
            side = int(rng.integers(3, 7))
            y0, x1 = top, max(0, x0 - side // 2)
            image[y0 : y0 + side, x1 : x1 + side] = _jitter(rng, (220, 210, 40), 30)
            mask[y0 : y0 + side, x1 : x1 + side] = SIGN
    if rng.random() < 0.4:  # rare small people
        center_y = int(rng.integers(horizon, height - 4))
        center_x = int(rng.integers(3, width - 3))
        rows, cols = np.ogrid[:height, :width]
        radius_y, radius_x = rng.uniform(3, 7), rng.uniform(1.5, 3)
        body = ((rows - center_y) / radius_y) ** 2 + ((cols - center_x) / radius_x) ** 2 <= 1
        image[body] = _jitter(rng, (200, 40, 70), 40)
        mask[body] = PERSON
    image += rng.normal(0, 12, image.shape).astype(np.float32)
    if rng.random() < 0.5:  # the ego vehicle's hood: unlabelled
        mask[height - int(rng.integers(2, 6)) :] = SYNTHETIC.ignore_index
    return np.clip(image, 0, 255).astype(np.uint8), mask
