import pytest
import torch
from PIL import Image

from clipjob.config import resolve
from clipjob.errors import ConfigError
from clipjob.data.transforms import train_transform


def red_square() -> Image.Image:
    return Image.new("RGB", (64, 64), (220, 30, 30))


def test_should_keep_colours_when_no_colour_augmentation_is_asked():
    out = train_transform(32, (1.0, 1.0))(red_square())
    assert out.dtype == torch.uint8 and out.shape == (3, 32, 32)
    assert out[:, 16, 16].tolist() == [220, 30, 30]


def test_should_turn_images_grey_when_grayscale_p_is_one():
    torch.manual_seed(0)
    out = train_transform(32, (1.0, 1.0), grayscale_p=1.0)(red_square())
    r, g, b = out[:, 16, 16].tolist()
    assert r == g == b and 60 < r < 120  # ITU-R 601 luma of (220, 30, 30) = 86


def test_should_jitter_colours_on_most_images_when_color_jitter_is_set():
    torch.manual_seed(0)
    tf = train_transform(32, (1.0, 1.0), color_jitter=0.4)
    changed = sum(tf(red_square())[:, 16, 16].tolist() != [220, 30, 30] for _ in range(200))
    # applied to 80 % of images (binomial: mean 160, sd 5.7); an applied jitter almost never keeps the exact colour
    assert 130 <= changed <= 185, changed


@pytest.mark.parametrize("key, value", [("data.color_jitter", "1.5"), ("data.grayscale_p", "-0.1")])
def test_should_reject_augmentation_strengths_out_of_range(key, value):
    with pytest.raises(ConfigError, match=key):
        resolve(overrides=[f"{key}={value}"])
