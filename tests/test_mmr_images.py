"""Image loading matches what cv2.imread + BGR→RGB gives the PyTorch code, for every format."""

import cv2
import numpy as np
import pytest
from PIL import Image

from m2sa_jax.data import images
from m2sa_jax.data.types import BadRecord


def cv2_rgb(path):
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


@pytest.fixture
def rgb():
    return np.random.default_rng(0).integers(0, 256, (20, 30, 3), np.uint8)


def test_formats_match_opencv(tmp_path, rgb):
    rng = np.random.default_rng(1)
    files = {}
    Image.fromarray(rgb).save(tmp_path / "rgb.png"); files["rgb"] = "rgb.png"
    Image.fromarray(rgb[..., 0]).save(tmp_path / "gray.png"); files["gray"] = "gray.png"
    Image.fromarray(np.dstack([rgb, rgb[..., :1]]), "RGBA").save(tmp_path / "rgba.png"); files["rgba"] = "rgba.png"
    Image.fromarray(rgb).convert("P").save(tmp_path / "pal.png"); files["palette"] = "pal.png"
    Image.fromarray(rgb[..., 0]).convert("LA").save(tmp_path / "la.png"); files["la"] = "la.png"
    cv2.imwrite(str(tmp_path / "g16.png"), rng.integers(0, 65536, (20, 30), np.uint16)); files["gray16"] = "g16.png"
    cv2.imwrite(str(tmp_path / "c16.png"), rng.integers(0, 65536, (20, 30, 3), np.uint16)); files["rgb16"] = "c16.png"
    Image.fromarray(rgb).save(tmp_path / "q.jpg", quality=90); files["jpeg"] = "q.jpg"
    for kind, name in files.items():
        got = images.load_rgb(str(tmp_path / name))
        assert got.dtype == np.uint8 and got.shape == (20, 30, 3), kind
        np.testing.assert_array_equal(got, cv2_rgb(tmp_path / name), err_msg=kind)


def test_cmyk_within_one_level_of_opencv(tmp_path, rgb):
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    got = images.load_rgb(str(tmp_path / "cmyk.jpg"))
    assert np.abs(got.astype(int) - cv2_rgb(tmp_path / "cmyk.jpg")).max() <= 1


def test_exif_orientation_applied_like_opencv(tmp_path, rgb):
    image = Image.fromarray(rgb)
    exif = image.getexif()
    exif[0x0112] = 6                      # rotate 90° clockwise on display
    image.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    got = images.load_rgb(str(tmp_path / "rot.jpg"))
    assert got.shape == (30, 20, 3)
    np.testing.assert_array_equal(got, cv2_rgb(tmp_path / "rot.jpg"))
    assert images.image_size(str(tmp_path / "rot.jpg")) == (30, 20)


def test_missing_and_corrupt_files_name_the_file(tmp_path):
    with pytest.raises(BadRecord) as e:
        images.load_rgb(str(tmp_path / "nope.jpg"))
    assert e.value.reason == "missing_image" and "nope.jpg" in str(e.value)
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(BadRecord) as e:
        images.load_rgb(str(tmp_path / "bad.jpg"))
    assert e.value.reason == "corrupt_image" and "bad.jpg" in str(e.value)
    good = tmp_path / "trunc.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 7).save(good)
    good.write_bytes(good.read_bytes()[:60])
    with pytest.raises(BadRecord) as e:
        images.load_rgb(str(good))
    assert e.value.reason == "corrupt_image"
