"""Finding, decoding and resizing images: every awkward file is handled or refused with a reason."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from extract.images import (
    DecodedImage,
    ImageError,
    ImageListError,
    boxes_to_original,
    decode_image,
    find_images,
    prepare_image,
    read_image_list,
    resize_scale,
)
from tests.extract_fixtures import BAD_IMAGES, exif_rotated_jpeg, scene, write_image_set

MEAN = (102.9801, 115.9465, 122.7717)


def test_find_images_walks_recursively_in_id_order_and_skips_the_rest(tmp_path):
    write_image_set(tmp_path / "images")
    (tmp_path / "images" / "features").mkdir()
    Image.fromarray(scene(20, 20, 0)).save(tmp_path / "images" / "features" / "x.png")
    ids = [s.image_id for s in find_images(tmp_path / "images", exclude=[tmp_path / "images" / "features"])]
    assert ids == sorted(ids)
    assert "nested/deeper/c.JPG" in ids  # upper-case extension, two levels down
    assert not any(i.endswith(".txt") or i.startswith(".") or i.startswith("features/") for i in ids)
    assert set(BAD_IMAGES) <= set(ids)  # broken files are listed: they fail later with a reason


def test_image_list_resolves_paths_under_the_root(tmp_path):
    root = tmp_path / "images"
    write_image_set(root)
    listing = tmp_path / "list.txt"
    listing.write_text(f"# a comment\n\na.jpg\nnested/b.png\n{root / 'gray.jpg'}\na.jpg\nmissing.jpg\n")
    sources = read_image_list(listing, root)
    assert [s.image_id for s in sources] == ["a.jpg", "gray.jpg", "missing.jpg", "nested/b.png"]
    assert sources[1].path == root / "gray.jpg"
    listing.write_text(f"{tmp_path / 'elsewhere.jpg'}\n")
    with pytest.raises(ImageListError, match=r"list.txt:1: .* is not inside"):
        read_image_list(listing, root)
    listing.write_text("../up.jpg\n")
    with pytest.raises(ImageListError, match="leaves"):
        read_image_list(listing, root)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    return root, write_image_set(root)


def test_good_images_decode_to_upright_bgr_with_their_original_size(images):
    root, sizes = images
    for image_id, size in sizes.items():
        decoded = decode_image(root / image_id)
        assert decoded.original_size == size, image_id
        assert decoded.pixels.shape == (*size, 3) and decoded.pixels.dtype == np.uint8, image_id


@pytest.mark.parametrize("image_id, word", sorted(BAD_IMAGES.items()))
def test_broken_files_raise_image_error_with_a_reason(images, image_id, word):
    root, _ = images
    with pytest.raises(ImageError, match=word):
        decode_image(root / image_id)


def test_missing_file_is_an_image_error(tmp_path):
    with pytest.raises(ImageError, match="unreadable"):
        decode_image(tmp_path / "nope.jpg")


def test_colour_conversions(tmp_path):
    rgb = scene(40, 60, 1)
    # Grayscale: three equal channels.
    Image.fromarray(rgb).convert("L").save(tmp_path / "gray.png")
    gray = decode_image(tmp_path / "gray.png").pixels
    assert (gray[:, :, 0] == gray[:, :, 1]).all() and (gray[:, :, 1] == gray[:, :, 2]).all()
    # 16-bit: scaled from 0..65535, not clipped at 255.
    Image.fromarray(rgb[:, :, 0].astype(np.uint16) * 257).save(tmp_path / "deep.png")
    np.testing.assert_array_equal(decode_image(tmp_path / "deep.png").pixels[:, :, 0], rgb[:, :, 0])
    # RGBA: fully transparent pixels become white, opaque ones keep their colour; BGR order.
    rgba = np.concatenate([rgb, np.full((40, 60, 1), 255, np.uint8)], axis=2)
    rgba[:, :30, 3] = 0
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    pixels = decode_image(tmp_path / "alpha.png").pixels
    assert (pixels[:, :30] == 255).all()
    np.testing.assert_array_equal(pixels[:, 30:], rgb[:, 30:, ::-1])
    # Palette with a transparent index.
    palette = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    palette.info["transparency"] = 0
    palette.save(tmp_path / "palette.png", transparency=0)
    assert decode_image(tmp_path / "palette.png").pixels.shape == (40, 60, 3)
    # CMYK JPEG: close to the RGB it came from.
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    cmyk = decode_image(tmp_path / "cmyk.jpg").pixels[:, :, ::-1].astype(int)
    assert np.abs(cmyk - rgb).mean() < 12


def test_exif_rotation_is_applied(tmp_path):
    stored = scene(30, 50, 2)
    exif_rotated_jpeg(tmp_path / "r.jpg", stored, orientation=6)  # display = stored rotated 90° clockwise
    decoded = decode_image(tmp_path / "r.jpg")
    assert decoded.original_size == (50, 30)
    error = {k: np.abs(decoded.pixels.astype(int) - np.rot90(stored, k=k)[:, :, ::-1]).mean() for k in (-1, 1)}
    assert error[-1] < 10 and error[-1] < error[1] / 3  # clockwise, JPEG noise aside; not counter-clockwise


def test_huge_images_decode_at_reduced_scale_or_are_refused(tmp_path):
    Image.fromarray(scene(800, 1200, 3)).save(tmp_path / "big.jpg", quality=90)
    Image.fromarray(scene(800, 1200, 3)).save(tmp_path / "big.png")
    decoded = decode_image(tmp_path / "big.jpg", max_pixels=100_000, target_max_side=200)
    assert decoded.original_size == (800, 1200)  # boxes still come back in the file's pixels
    assert decoded.pixels.shape[1] < 1200 and decoded.pixels.shape[1] >= 400  # DCT-scaled, above 2x200
    with pytest.raises(ImageError, match="too large"):
        decode_image(tmp_path / "big.png", max_pixels=100_000)


def test_resize_follows_the_original_rule():
    assert resize_scale(480, 640, 600, 1000) == pytest.approx(600 / 480)  # shorter side to 600
    assert resize_scale(400, 1200, 600, 1000) == pytest.approx(1000 / 1200)  # longer side capped at 1000
    decoded = DecodedImage(np.zeros((480, 640, 3), np.uint8), (480, 640))
    prepared = prepare_image(decoded, 600, 1000, MEAN)
    assert prepared.tensor.shape == (3, 600, 800) and prepared.tensor.dtype == np.float32
    np.testing.assert_allclose(prepared.tensor[:, 0, 0], -np.asarray(MEAN), rtol=1e-6)  # BGR minus the means


def test_boxes_map_back_to_original_pixels_inside_the_image():
    boxes = np.array([[0, 0, 800, 600], [100, 50, 200, 150], [-3, 10, 900, 700]], np.float32)
    back = boxes_to_original(boxes, 1.25, (480, 640))
    np.testing.assert_allclose(back[1], [80, 40, 160, 120])
    np.testing.assert_allclose(back[0], [0, 0, 640, 480])
    assert back[:, 0::2].min() >= 0 and back[:, 0::2].max() <= 640 and back[:, 1::2].max() <= 480
