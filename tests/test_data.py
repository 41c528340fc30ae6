import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from kdcontract.digits import digits_gray
from kdcontract.errors import UserError
from kdcontract.imageprep import prepare
from kdcontract.manifest import DigitFraming, Preprocessing
from training.augment import random_cutout, random_translate
from training.data import iterate_batches, load_data
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


def test_upsampled_digits_are_prepared_as_served():
    data = load_data(DataConfig(dataset="digits", image_size=16))
    assert data.train.images.shape[1:] == (16, 16, 3)
    # Channels are identical: grayscale digits become 3-channel RGB.
    img = data.train.images[0]
    assert torch.equal(img[..., 0], img[..., 1]) and torch.equal(img[..., 1], img[..., 2])


GENERIC = Preprocessing(image_size=4, mean=[0.5] * 3, std=[0.25] * 3)
DIGITS = Preprocessing(image_size=8, mean=[0.3] * 3, std=[0.3] * 3, digit=DigitFraming())


def test_prepare_handles_modes_and_applies_exif_orientation():
    rgba = Image.new("RGBA", (20, 10), (255, 0, 0, 255))
    out = prepare(rgba, Preprocessing(image_size=8, mean=[0.5] * 3, std=[0.25] * 3))
    assert out.shape == (8, 8, 3) and out.dtype == np.uint8 and out[..., 0].min() == 255
    # Stored 8 wide x 4 high with a white 2x2 block top-left, EXIF orientation 6 (shown rotated 90° clockwise):
    # upright it is 4 x 8 with the block top-right; shrunk to 4x4 by area averaging, row 0 is white at x 2-3.
    stored = Image.new("RGB", (8, 4), (0, 0, 0))
    stored.paste((255, 255, 255), (0, 0, 2, 2))
    exif = Image.Exif()
    exif[0x0112] = 6
    upright = prepare(_roundtrip_png(stored, exif), GENERIC)
    np.testing.assert_array_equal(upright[0, :, 0], [0, 0, 255, 255])
    unrotated = prepare(_roundtrip_png(stored, Image.Exif()), GENERIC)
    assert unrotated[0, 0, 0] == 255  # without the tag the block stays left: the orientation made the difference


def _roundtrip_png(image: Image.Image, exif: Image.Exif) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, format="PNG", exif=exif)
    return Image.open(io.BytesIO(buf.getvalue()))


def test_area_resize_averages_what_each_output_pixel_covers():
    # 4x4 -> 2x2 by area: each output pixel is the mean of its 2x2 block (bilinear would not be, at this ratio).
    pixels = np.array([[0, 0, 255, 255], [0, 0, 255, 255], [0, 255, 0, 0], [255, 0, 0, 0]], dtype=np.uint8)
    out = prepare(Image.fromarray(pixels, mode="L"), Preprocessing(image_size=2, mean=[0.5] * 3, std=[0.2] * 3))
    np.testing.assert_array_equal(out[..., 0], [[0, 255], [128, 0]])


def test_digit_pictures_are_framed_as_the_training_digits():
    digit = digits_gray()[0][1700]
    assert (prepare(Image.fromarray(digit, mode="L"), DIGITS)[..., 0] == digit).all()  # native: unchanged
    # Dark ink on white, upscaled 4x by repeating pixels: inverted and area-averaged back, exactly.
    dark_large = Image.fromarray(255 - np.kron(digit, np.ones((4, 4), dtype=np.uint8)), mode="L")
    np.testing.assert_array_equal(prepare(dark_large, DIGITS)[..., 0], digit)
    # Drawn small and off-centre on a large canvas: its ink box is found and made to fill the input.
    canvas = np.zeros((200, 200), dtype=np.uint8)
    canvas[20:84, 120:184] = np.kron(digit, np.ones((8, 8), dtype=np.uint8))
    np.testing.assert_array_equal(prepare(Image.fromarray(canvas, mode="L"), DIGITS)[..., 0], digit)
    blank = prepare(Image.new("L", (50, 50), 255), DIGITS)
    assert blank.shape == (8, 8, 3) and not blank.any()


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
    ones = torch.full((256, 8, 8, 3), 255, dtype=torch.uint8)
    for side in (2, 3):  # an even side zeroes side^2 pixels too, not (side + 1)^2
        zeroed = (random_cutout(ones, side, gen)[..., 0] == 0).sum(dim=(1, 2))
        assert zeroed.max() == side * side and zeroed.min() >= 1


def test_check_data_loads_splits_and_reports_them_before_training(tmp_path, capsys):
    from tests.conftest import override_args, training_cli

    proc = training_cli(capsys, "check-data", "--recipe", "digits-fewlabels", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "data_summary.json").read_text())
    images = summary["images"]
    # Every one of sklearn's 1,797 digits lands in exactly one place; 5% of the training labels are kept.
    assert sum(images.values()) == 1797 and images["train"] == 60 and images["unlabelled"] == 1197
    assert summary["classes"] == 10
    overrides = ["data.dataset=imagefolder", "data.augment.client_forms=0", f"data.root={tmp_path / 'none'}"]
    missing = training_cli(capsys, "check-data", *override_args(overrides))
    assert missing.returncode == 2 and str(tmp_path / "none") in missing.stderr


def test_a_gateway_capture_joins_the_transfer_set_with_its_feedback_labels_and_bad_files_named(tmp_path, capsys):
    from kdcontract.capture import CapturedImage, capture_digest, encode_images, encode_labels, segment_name
    from training.data import load_capture

    spec = load_data(DataConfig(dataset="digits")).preprocessing
    size = spec.image_size
    classes = [str(d) for d in range(10)]
    rng = np.random.default_rng(0)
    rows = [
        CapturedImage("r1", i, rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "student_kd", 1, 0,
                      np.full(10, 0.1, np.float32), 1.0)
        for i in range(3)
    ]  # fmt: skip
    (tmp_path / segment_name("images", 1.0, "w", 1)).write_bytes(encode_images(rows, classes))
    (tmp_path / segment_name("labels", 2.0, "w", 2)).write_bytes(encode_labels([("r1", ["4", "5", "6"], 2.0)]))
    before = capture_digest(str(tmp_path))
    (tmp_path / segment_name("images", 3.0, "w", 3)).write_bytes(b"")  # empty
    (tmp_path / segment_name("images", 4.0, "w", 4)).write_bytes(encode_images(rows, classes)[:100])  # truncated
    (tmp_path / "README.txt").write_text("not a segment")  # another format
    assert capture_digest(str(tmp_path)) != before  # a changed capture is a new distillation input
    images = load_capture(str(tmp_path), spec, classes)
    assert len(images) == 3 and images.labels.tolist() == [4, 5, 6]
    assert images.images.dtype == torch.uint8 and tuple(images.images.shape) == (3, size, size, 3)
    out = capsys.readouterr().out
    for name in (segment_name("images", 3.0, "w", 3), segment_name("images", 4.0, "w", 4), "README.txt"):
        assert f"{name} skipped" in out, out
    with pytest.raises(UserError, match="not the recipe's"):
        load_capture(str(tmp_path), spec, classes[::-1])
    with pytest.raises(UserError, match="does not exist"):
        load_capture(str(tmp_path / "missing"), spec, classes)


def test_the_loops_clients_never_send_a_held_out_image_and_send_every_other_one():
    """The loop's offline gate and comparisons run on the test split: its clients (and so its capture, which
    re-distillation trains on) must never hold one of those images."""
    from loadtest.stacks.loop import pools
    from training.recipe import load_recipe

    recipe = load_recipe("digits")
    data = load_data(recipe.data)
    traffic, held_out = pools(recipe.data.split)
    assert set(traffic.tolist()).isdisjoint(held_out.tolist())
    assert len(traffic) == len(data.train) + len(data.val) and len(held_out) == len(data.test)
    assert len(set(traffic.tolist()) | set(held_out.tolist())) == len(digits_gray()[1])


def test_a_shuffled_pass_never_ends_in_a_batch_of_one_image():
    """BatchNorm cannot train on one image: a training pass leaves the odd image out, evaluation does not."""
    from training.data import InMemoryImages

    dataset = InMemoryImages(torch.zeros((65, 8, 8, 3), dtype=torch.uint8), torch.arange(65))
    generator = torch.Generator().manual_seed(0)
    assert [len(y) for _, y in iterate_batches(dataset, 64, shuffle=True, generator=generator)] == [64]
    assert [len(y) for _, y in iterate_batches(dataset, 64)] == [64, 1]  # evaluation sees every image
    assert [len(y) for _, y in iterate_batches(dataset, 32, shuffle=True)] == [32, 32]
    assert [len(y) for _, y in iterate_batches(dataset, 30, shuffle=True)] == [30, 30, 5]


def test_check_data_reports_an_image_folders_balance_sizes_and_unreadable_files(tmp_path, capsys):
    """Issue 37: `check-data` opens every file of an image folder: images per class, sizes, and the files a
    run would trip over (named, exit 2 with one line)."""
    from conftest import training_cli

    root = tmp_path / "folder"
    for label, count, size in (("cat", 6, 64), ("dog", 3, 96)):
        (root / label).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(np.full((size, size + i, 3), 40 * i, np.uint8)).save(root / label / f"{i}.png")
    base = ["check-data", "--set", "data.dataset=imagefolder", "--set", "data.augment.client_forms=0"]
    base += ["--set", f"data.root={root}", "--set", "data.image_size=32"]
    ok = training_cli(capsys, *base)
    assert ok.returncode == 0, ok.stderr
    report = json.loads(ok.stdout[: ok.stdout.index("}\n") + 1])
    assert report["images_per_class"] == {"cat": 6, "dog": 3} and report["largest_over_smallest_class"] == 2.0
    assert report["width_min_median_max"] == [64, 68, 98] and report["height_min_median_max"] == [64, 64, 96]
    assert report["unreadable"] == 0
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")  # a PNG's signature, then no PNG
    bad = training_cli(capsys, *base)
    assert bad.returncode == 2
    broken = root / "dog" / "broken.png"
    last = bad.stderr.strip().splitlines()[-1]
    assert last == f"error: 1 file(s) under {root} are not readable images (first: {broken}); remove or fix them"
