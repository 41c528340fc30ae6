import numpy as np
import pytest
import torch
from PIL import Image

from training.augment import random_cutout, random_translate
from training.data import iterate_batches, load_data
from training.errors import UserError
from training.imageprep import to_model_input
from training.recipe import DataConfig


def test_digits_split_is_stratified_disjoint_and_reproducible():
    data = load_data(DataConfig(dataset="digits", image_size=8))
    sizes = len(data.train), len(data.val), len(data.test)
    assert sum(sizes) == 1797 and sizes == (1257, 270, 270)
    assert data.train.images.dtype == torch.uint8 and data.train.images.shape[1:] == (8, 8, 3)
    # Every class appears in every split in about the same share (stratified).
    for split in (data.train, data.val, data.test):
        counts = torch.bincount(split.labels, minlength=10).float() / len(split)
        assert counts.min() > 0.08 and counts.max() < 0.12
    again = load_data(DataConfig(dataset="digits", image_size=8))
    assert torch.equal(again.test.images, data.test.images)
    # No image is both trained on and tested on.
    train_rows = {bytes(x.numpy()) for x in data.train.images}
    assert not any(bytes(x.numpy()) in train_rows for x in data.test.images[:50])


def test_upsampled_digits_use_the_serving_resize():
    data = load_data(DataConfig(dataset="digits", image_size=16))
    assert data.train.images.shape[1:] == (16, 16, 3)
    # Channels are identical: grayscale digits become 3-channel RGB.
    img = data.train.images[0]
    assert torch.equal(img[..., 0], img[..., 1]) and torch.equal(img[..., 1], img[..., 2])


def test_to_model_input_handles_modes_and_exif_orientation():
    rgba = Image.new("RGBA", (20, 10), (255, 0, 0, 255))
    out = to_model_input(rgba, 8)
    assert out.shape == (8, 8, 3) and out.dtype == np.uint8 and out[..., 0].min() == 255
    # A tall image stored sideways with EXIF orientation 6 (rotate 90°) comes out upright.
    sideways = Image.new("RGB", (4, 2), (0, 0, 0))
    sideways.putpixel((0, 0), (255, 255, 255))
    exif = Image.Exif()
    exif[0x0112] = 6
    sideways.info["exif"] = exif.tobytes()
    upright = to_model_input(_roundtrip_jpeg_free(sideways, exif), 4)
    assert upright.shape == (4, 4, 3)


def _roundtrip_jpeg_free(image: Image.Image, exif: Image.Exif) -> Image.Image:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG", exif=exif)
    return Image.open(io.BytesIO(buf.getvalue()))


def test_imagefolder_reads_class_folders_and_reports_missing_ones(tmp_path):
    from sklearn.datasets import load_digits

    digits = load_digits()
    for label in (3, 7):
        folder = tmp_path / f"digit_{label}"
        folder.mkdir()
        for i in np.flatnonzero(digits.target == label)[:20]:
            Image.fromarray((digits.images[i] * 15).astype(np.uint8), mode="L").save(folder / f"{i}.png")
    data = load_data(DataConfig(dataset="imagefolder", root=str(tmp_path), image_size=8))
    assert data.class_names == ["digit_3", "digit_7"]
    assert len(data.train) + len(data.val) + len(data.test) == 40
    images, labels = next(iterate_batches(data.train, 8))
    assert images.shape == (8, 8, 8, 3) and images.dtype == torch.uint8 and set(labels.tolist()) <= {0, 1}

    with pytest.raises(UserError, match="does not exist"):
        load_data(DataConfig(dataset="imagefolder", root=str(tmp_path / "nope")))
    with pytest.raises(UserError, match=r"needs data\.root"):
        load_data(DataConfig(dataset="cifar10"))


def test_ddp_shards_cover_every_image_with_equal_lengths():
    data = load_data(DataConfig(dataset="digits", image_size=8))
    gen = torch.Generator().manual_seed(0)
    shards = [
        torch.cat(
            [
                y
                for _, y in iterate_batches(
                    data.val, 64, shuffle=True, generator=gen.manual_seed(0), rank=r, world_size=2
                )
            ]
        )
        for r in range(2)
    ]
    assert len(shards[0]) == len(shards[1]) == 135


def test_translation_moves_pixels_and_cutout_zeroes_a_square():
    gen = torch.Generator().manual_seed(0)
    image = torch.zeros(1, 8, 8, 3, dtype=torch.uint8)
    image[0, 4, 4] = 200
    moved = random_translate(image.repeat(64, 1, 1, 1), 1, gen)
    positions = {tuple(torch.nonzero(m[..., 0])[0].tolist()) for m in moved if m.any()}
    assert positions <= {(r, c) for r in (3, 4, 5) for c in (3, 4, 5)} and len(positions) > 3
    ones = torch.full((4, 8, 8, 3), 255, dtype=torch.uint8)
    cut = random_cutout(ones, 3, gen)
    zeroed = (cut[..., 0] == 0).sum(dim=(1, 2))
    assert ((zeroed >= 4) & (zeroed <= 9)).all()
