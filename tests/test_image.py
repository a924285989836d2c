import pytest
import torch
from PIL import Image

from stx.errors import ImageError
from stx.image import read_image, resize, write_image


def test_round_trip_keeps_pixels_and_range(tmp_path, rng):
    image = torch.randint(0, 256, (1, 3, 20, 30), generator=rng).float() / 255
    path = write_image(image, tmp_path / "a.png")
    back = read_image(path)
    assert back.shape == (1, 3, 20, 30)
    assert torch.equal(back, image)


def test_read_resizes_long_edge_keeping_aspect(tmp_path):
    Image.new("RGB", (200, 100), (255, 0, 0)).save(tmp_path / "wide.png")
    image = read_image(tmp_path / "wide.png", size=64)
    assert image.shape == (1, 3, 32, 64)
    assert image.min() >= 0 and image.max() <= 1
    assert torch.allclose(image[0, 0], torch.ones(32, 64), atol=1e-3)


def test_missing_image_error_names_path(tmp_path):
    with pytest.raises(ImageError, match="nope.png.*does not exist"):
        read_image(tmp_path / "nope.png")


def test_corrupt_image_error_names_path(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    with pytest.raises(ImageError, match="bad.jpg.*could not be read"):
        read_image(bad)


@pytest.mark.parametrize("size", [0, 3, 100000, -5, 12.5])
def test_impossible_size_is_refused(size):
    with pytest.raises(ImageError, match="impossible"):
        resize(torch.rand(1, 3, 8, 8), size)
