"""Input conversion: every supported form in, [-1, 1] batches out; bad input -> ValueError."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from invint_hub.images import MAX_PIXELS, open_image, to_batch, to_pil


@pytest.mark.parametrize("channels", [1, 3])
def test_odd_images_are_converted(odd_image_files, channels):
    for name, path in odd_image_files.items():
        x = to_batch(path, 32, channels)
        assert x.shape == (1, channels, 32, 32), name
        assert x.min() >= -1 and x.max() <= 1, name


def test_bad_files_raise_value_error(bad_image_files):
    expected = {"not_an_image": "not a readable image", "empty": "empty", "truncated": "could not be decoded",
                "huge_header": "too large"}
    for name, path in bad_image_files.items():
        with pytest.raises(ValueError, match=expected[name]):
            to_batch(path, 32, 1)


def test_missing_file_and_wrong_types():
    with pytest.raises(ValueError, match="not found"):
        to_batch("/nonexistent/x.png", 32, 1)
    with pytest.raises(ValueError, match="cannot read"):
        to_batch(3.14, 32, 1)
    with pytest.raises(ValueError, match="no images"):
        to_batch([], 32, 1)
    with pytest.raises(ValueError, match="empty"):
        to_batch(b"", 32, 1)


def test_pixel_limit_and_zero_size(monkeypatch):
    import invint_hub.images as images

    monkeypatch.setattr(images, "MAX_PIXELS", 99)  # a 10x10 image is then "too large", without a huge allocation
    with pytest.raises(ValueError, match="too large: 10x10"):
        open_image(Image.new("L", (10, 10)))
    monkeypatch.setattr(images, "MAX_PIXELS", MAX_PIXELS)
    assert open_image(Image.new("L", (10, 10))).size == (10, 10)
    with pytest.raises(ValueError, match="zero size"):
        open_image(Image.new("L", (0, 5)))


def test_tensors_and_arrays():
    assert to_batch(torch.zeros(28, 28), 32, 1).shape == (1, 1, 32, 32)
    assert to_batch(torch.zeros(3, 28, 28), 32, 1).shape == (1, 1, 32, 32)
    assert to_batch(torch.zeros(5, 1, 28, 28), 32, 3).shape == (5, 3, 32, 32)
    u8 = torch.full((1, 1, 32, 32), 255, dtype=torch.uint8)
    assert torch.allclose(to_batch(u8, 32, 1), torch.ones(1, 1, 32, 32))
    assert to_batch(np.zeros((28, 28, 3), dtype=np.uint8), 32, 1).shape == (1, 1, 32, 32)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        to_batch(torch.full((1, 1, 8, 8), 2.0), 32, 1)
    with pytest.raises(ValueError, match="NaN"):
        to_batch(torch.full((1, 1, 8, 8), float("nan")), 32, 1)
    with pytest.raises(ValueError, match="dimensions"):
        to_batch(torch.zeros(1, 1, 1, 8, 8), 32, 1)
    with pytest.raises(ValueError, match="empty"):
        to_batch(torch.zeros(0, 1, 8, 8), 32, 1)


def test_round_trip_pixels():
    img = Image.fromarray(np.arange(1024, dtype=np.uint8).reshape(32, 32) % 251)
    x = to_batch(img, 32, 1)
    back = np.asarray(to_pil(x)[0])
    assert np.array_equal(back, np.asarray(img))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    assert torch.equal(to_batch(buf.getvalue(), 32, 1), x)
