import pytest
import torch
from PIL import Image

from clipjob.config import resolve
from clipjob.errors import ConfigError
from torchvision.transforms import v2 as T

from clipjob.data.transforms import BILINEAR, Augment, StyleJitter, outline, train_transform


def red_square() -> Image.Image:
    return Image.new("RGB", (64, 64), (220, 30, 30))


def test_should_keep_colours_when_no_colour_augmentation_is_asked():
    out = train_transform(32, (1.0, 1.0))(red_square())
    assert out.dtype == torch.uint8 and out.shape == (3, 32, 32)
    assert out[:, 16, 16].tolist() == [220, 30, 30]


def test_should_turn_images_grey_when_grayscale_p_is_one():
    torch.manual_seed(0)
    out = train_transform(32, (1.0, 1.0), Augment(grayscale_p=1.0))(red_square())
    r, g, b = out[:, 16, 16].tolist()
    assert r == g == b and 60 < r < 120  # ITU-R 601 luma of (220, 30, 30) = 86


def test_should_jitter_colours_on_most_images_when_color_jitter_is_set():
    torch.manual_seed(0)
    tf = train_transform(32, (1.0, 1.0), Augment(color_jitter=0.4))
    changed = sum(tf(red_square())[:, 16, 16].tolist() != [220, 30, 30] for _ in range(200))
    # applied to 80 % of images (binomial: mean 160, sd 5.7); an applied jitter almost never keeps the exact colour
    assert 130 <= changed <= 185, changed


@pytest.mark.parametrize("scale", [(0.6, 1.0), (0.08, 1.0), (0.9, 1.0)])
def test_should_crop_exactly_as_torchvision_for_the_same_seed(scale):
    # the lean crop must draw torchvision's boxes from the same RNG state and resize with its kernel: the
    # pictures are compared bit for bit, on square, wide, tall and tiny sources (tall/wide ones past the aspect
    # range and small scales reach the centred fallback box)
    gen = torch.Generator().manual_seed(1)
    sizes = [(72, 72), (40, 120), (150, 30), (5, 7), (64, 64)]
    pictures = [Image.fromarray(torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=gen).numpy())
                for h, w in sizes]
    reference = T.Compose([T.ToImage(), T.RandomResizedCrop(32, scale=scale, ratio=(3 / 4, 4 / 3), interpolation=BILINEAR,
                                                         antialias=True)])
    ours = train_transform(32, scale)
    for seed in range(40):
        for pic in pictures:
            torch.manual_seed(seed)
            want = reference(pic)
            torch.manual_seed(seed)
            got = ours(pic)
            assert torch.equal(got, want.as_subclass(torch.Tensor)), (seed, pic.size)
            torch.manual_seed(seed)
            assert torch.equal(ours(T.functional.pil_to_tensor(pic)), got)  # a decoded tensor gives the same


def flag() -> torch.Tensor:
    """White 20x20 with a red 10x10 square in the middle (uint8, 3 x H x W)."""
    img = torch.full((3, 20, 20), 255, dtype=torch.uint8)
    img[:, 5:15, 5:15] = torch.tensor([220, 30, 30], dtype=torch.uint8)[:, None, None]
    return img


def test_should_trace_colour_edges_in_black_when_outlining():
    thin, thick = outline(flag(), 1), outline(flag(), 2)
    black = (thin == 0).all(0)
    assert black[5, 5:15].all() and black[5:15, 5].all()  # the square's top and left edges
    assert not black[10, 10] and not black[0, 0] and thin[:, 10, 10].tolist() == [220, 30, 30]
    assert (thick == 0).all(0).sum() > black.sum()  # 2 px lines cover more


def test_should_recolour_only_the_white_background():
    torch.manual_seed(0)
    out = StyleJitter(background_p=1.0)(flag())
    assert out[:, 10, 10].tolist() == [220, 30, 30]
    assert out[:, 0, 0].tolist() != [255, 255, 255] and (out[:, 0, 0] >= 170).all()
    assert torch.equal(StyleJitter()(flag()), flag())  # off by default


@pytest.mark.parametrize("key, value", [("data.color_jitter", "1.5"), ("data.grayscale_p", "-0.1"),
                                        ("data.outline_p", "2"), ("data.background_p", "-1")])
def test_should_reject_augmentation_strengths_out_of_range(key, value):
    with pytest.raises(ConfigError, match=key):
        resolve(overrides=[f"{key}={value}"])


def test_should_make_a_line_drawing_of_about_a_third_of_outlined_pictures():
    torch.manual_seed(0)
    jitter = StyleJitter(outline_p=1.0)
    drawings = 0
    for _ in range(90):
        out = jitter(flag())
        colours = {tuple(out[:, y, x].tolist()) for y in range(20) for x in range(20)}
        assert (0, 0, 0) in colours  # every outlined picture has its black lines
        drawings += colours <= {(0, 0, 0), (255, 255, 255)}
    assert 8 <= drawings <= 52, drawings  # binomial(90, 1/3): mean 30, sd 4.5; 5 sd either side
