"""Datasets as uint8 NHWC images at the recipe's size, split into train / val / test.

Every picture goes through `imageprep.prepare` with the dataset's `Preprocessing`, the same function
and the same spec (via the manifest) the gateway uses, so a served image is prepared exactly like a
training image. Normalisation lives inside the model.
"""

from __future__ import annotations

import inspect
import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL
import torch
from PIL import Image
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset

from kdcontract.capture import capture_files, is_object_store, read_capture
from kdcontract.client_forms import encode, random_form, render_image
from kdcontract.digits import digits_gray, labelled_positions, split_indices
from kdcontract.errors import UserError
from kdcontract.imageprep import prepare
from kdcontract.manifest import DigitFraming, Preprocessing
from training.array_cache import cache_key, cached_array
from training.recipe import DataConfig

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
UNLABELLED = -1  # the label of a transfer image: only the teacher's soft targets teach from it


class InMemoryImages(Dataset):
    """Images already prepared as one uint8 tensor [N, H, W, 3]; batches are slices, not collates.

    `client_forms`, when set, holds K more pictures of each image [N, K, H, W, 3]: the image as
    clients send it, prepared as the gateway prepares it (`client_forms.random_form`).
    """

    label_keys: np.ndarray | None = None  # a capture's: the API key id each label came from

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, client_forms: torch.Tensor | None = None):
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 [N,H,W,3], got {images.dtype} {tuple(images.shape)}")
        self.images, self.labels, self.client_forms = images, labels, client_forms

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]

    def subset(self, indices: np.ndarray) -> InMemoryImages:
        idx = torch.as_tensor(indices, dtype=torch.long)
        forms = self.client_forms[idx] if self.client_forms is not None else None
        return InMemoryImages(self.images[idx], self.labels[idx], forms)

    def unlabelled(self) -> InMemoryImages:
        return InMemoryImages(self.images, torch.full_like(self.labels, UNLABELLED), self.client_forms)

    def concat(self, other: InMemoryImages) -> InMemoryImages:
        """Both sets in one; an image without client-form pictures stands in for its own."""

        def forms(part: InMemoryImages, k: int) -> torch.Tensor:
            if part.client_forms is not None:
                return part.client_forms
            return part.images.unsqueeze(1).expand(-1, k, -1, -1, -1)

        k = max((p.client_forms.shape[1] for p in (self, other) if p.client_forms is not None), default=0)
        return InMemoryImages(
            torch.cat([self.images, other.images]),
            torch.cat([self.labels, other.labels]),
            torch.cat([forms(self, k), forms(other, k)]) if k else None,
        )


class ImageFiles(Dataset):
    """Image files decoded lazily (for folders too large to hold in memory)."""

    def __init__(self, files: list[Path], labels: list[int], spec: Preprocessing):
        self.files, self.labels, self.spec = files, torch.as_tensor(labels), spec

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        with Image.open(self.files[index]) as image:
            pixels = prepare(image, self.spec)
        return torch.from_numpy(pixels.copy()), self.labels[index]


def holds_unlabelled(dataset: Dataset) -> bool:
    """Whether any image of `dataset` is unlabelled (label -1); True when it cannot tell."""
    if isinstance(dataset, ConcatDataset):
        return any(holds_unlabelled(part) for part in dataset.datasets)
    labels = getattr(dataset, "labels", None)
    return not isinstance(labels, torch.Tensor) or bool((labels == UNLABELLED).any())


@dataclass
class SplitData:
    train: Dataset
    val: Dataset
    test: Dataset
    class_names: list[str]
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    description: str
    preprocessing: Preprocessing  # what the manifest tells the gateway: how a picture becomes an input
    # Unlabelled training images (labels UNLABELLED) only distilling stages see: the training split's
    # images whose labels a few-labels recipe drops, and the recipe's `distill.transfer` folder.
    transfer: InMemoryImages | None = None
    num_workers: int = 0  # DataLoader workers for datasets decoded lazily (image folders)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    as_float = images.float().div_(255)
    mean = as_float.mean(dim=(0, 1, 2))
    std = as_float.std(dim=(0, 1, 2)).clamp_min(1e-3)
    return tuple(round(v, 4) for v in mean.tolist()), tuple(round(v, 4) for v in std.tolist())


def preprocessing(cfg: DataConfig, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)) -> Preprocessing:
    """The dataset's preparation spec; digits are framed as their data was made (`DigitFraming`)."""
    framing = DigitFraming() if cfg.dataset == "digits" else None
    return Preprocessing(image_size=cfg.image_size, mean=list(mean), std=list(std), digit=framing)


def load_digits_images(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 handwritten 8x8 digits as uint8 RGB at `size` (ships with the package)."""
    gray, labels = digits_gray()
    spec = preprocessing(DataConfig(dataset="digits", image_size=size))
    key = cache_key(gray.tobytes(), f"{gray.shape} {spec.model_dump_json()}", *_rendering_code(_prepare_all))
    images = cached_array("digits", key, lambda: _prepare_all(gray, spec))
    return torch.from_numpy(images), torch.tensor(labels, dtype=torch.long)


def _prepare_all(gray: np.ndarray, spec: Preprocessing) -> np.ndarray:
    return np.stack([prepare(Image.fromarray(img, mode="L"), spec) for img in gray])


def _rendering_code(function) -> list[str | bytes]:
    """What a cached picture depends on besides its inputs: the function that made it, the modules that
    render and prepare images, and the libraries under them."""
    modules = [Path(inspect.getsourcefile(f)).read_bytes() for f in (render_image, prepare)]
    return [inspect.getsource(function), f"numpy {np.__version__} pillow {PIL.__version__}", *modules]


def client_form_pictures(digits: np.ndarray, per_image: int, spec: Preprocessing, seed: int) -> torch.Tensor:
    """[N, per_image, H, W, 3]: each 8x8 digit rendered as random clients send it, then prepared as served.

    Computed once per machine (`array_cache`): the key covers the digits, the settings, and the code
    and library versions that render and prepare them.
    """
    key = cache_key(
        np.ascontiguousarray(digits).tobytes(),
        f"{digits.shape} {digits.dtype} {per_image} {seed} {spec.model_dump_json()}",
        *_rendering_code(_render_client_forms),
    )
    pictures = cached_array("client_forms", key, lambda: _render_client_forms(digits, per_image, spec, seed))
    return torch.from_numpy(pictures)


def _render_client_forms(digits: np.ndarray, per_image: int, spec: Preprocessing, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    pictures = np.empty((len(digits), per_image, spec.image_size, spec.image_size, 3), dtype=np.uint8)
    for i, digit in enumerate(digits):
        for k in range(per_image):
            form = random_form(rng)
            picture = render_image(digit, form)
            if form.encoding == "JPEG":  # its artefacts are part of what the gateway sees; PNG is lossless
                picture = Image.open(io.BytesIO(encode(picture, form)))
            pictures[i, k] = prepare(picture, spec)
    return pictures


DRIFT_FORMS_PER_IMAGE = 3


def validation_as_served(cfg: DataConfig, val_images: np.ndarray) -> np.ndarray:
    """The validation images as the gateway sees them, for a version's drift reference: for the digits, each
    in DRIFT_FORMS_PER_IMAGE random client forms (clients send pictures at every size and polarity, of which
    the model is less sure than of the 8x8 originals: a reference measured on the originals flags ordinary
    traffic); for other datasets, as they are."""
    if cfg.dataset != "digits":
        return val_images
    _, labels = load_digits_images(cfg.image_size)
    _, val_idx, _ = split_indices(labels.numpy(), cfg.split, with_test=True)
    forms = client_form_pictures(
        digits_gray()[0][val_idx], DRIFT_FORMS_PER_IMAGE, preprocessing(cfg), cfg.split_seed + 1
    )
    return forms.numpy().reshape(-1, *val_images.shape[1:])


def _load_digits(cfg: DataConfig, client_forms: bool = False) -> SplitData:
    images, labels = load_digits_images(cfg.image_size)
    train_idx, val_idx, test_idx = split_indices(labels.numpy(), cfg.split, with_test=True)
    full = InMemoryImages(images, labels)
    train = full.subset(train_idx)
    if client_forms and cfg.augment.client_forms:
        train.client_forms = client_form_pictures(
            digits_gray()[0][train_idx], cfg.augment.client_forms, preprocessing(cfg), cfg.split_seed
        )
    mean, std = _channel_stats(train.images)  # of every training image: labels are not needed for it
    train, transfer = labelled_split(train, cfg)
    return SplitData(
        train=train,
        val=full.subset(val_idx),
        test=full.subset(test_idx),
        class_names=[str(d) for d in range(10)],
        image_size=cfg.image_size,
        mean=mean,
        std=std,
        description=f"sklearn digits, {len(labels)} images, split seed {cfg.split_seed}"
        + (f", {len(train)} training labels kept" if transfer is not None else ""),
        preprocessing=preprocessing(cfg, mean, std),
        transfer=transfer,
    )


def labelled_split(train: InMemoryImages, cfg: DataConfig) -> tuple[InMemoryImages, InMemoryImages | None]:
    """The training images that keep their labels (a stratified `labelled_fraction`, at least one per
    class) and the rest as unlabelled transfer images (None when every label is kept)."""
    if cfg.labelled_fraction >= 1.0:
        return train, None
    kept = labelled_positions(train.labels.numpy(), cfg.labelled_fraction, cfg.split_seed)
    return train.subset(np.flatnonzero(kept)), train.subset(np.flatnonzero(~kept)).unlabelled()


def _require_root(cfg: DataConfig) -> Path:
    if not cfg.root:
        raise UserError(f"dataset {cfg.dataset!r} needs data.root (a folder); set it in the recipe or as an override")
    root = Path(cfg.root).expanduser()
    if not root.is_dir() and not (cfg.dataset == "cifar10" and cfg.download):
        raise UserError(f"dataset folder {root} does not exist; point data.root at it")
    return root


def _load_cifar10(cfg: DataConfig) -> SplitData:
    from torchvision.datasets import CIFAR10

    root = _require_root(cfg)
    try:
        train_set = CIFAR10(str(root), train=True, download=cfg.download)
        test_set = CIFAR10(str(root), train=False, download=cfg.download)
    except RuntimeError as exc:
        raise UserError(
            f"CIFAR-10 not found under {root}: put cifar-10-batches-py there or set data.download=true"
        ) from exc

    spec = preprocessing(cfg)

    def prepared(ds) -> InMemoryImages:
        pixels = np.stack([prepare(Image.fromarray(x), spec) for x in ds.data])
        return InMemoryImages(torch.from_numpy(pixels), torch.as_tensor(ds.targets, dtype=torch.long))

    full_train, test = prepared(train_set), prepared(test_set)
    train_idx, val_idx, _ = split_indices(full_train.labels.numpy(), cfg.split, with_test=False)
    train = full_train.subset(train_idx)
    mean, std = _channel_stats(train.images)
    train, transfer = labelled_split(train, cfg)
    return SplitData(
        train=train,
        val=full_train.subset(val_idx),
        test=test,
        class_names=list(train_set.classes),
        image_size=cfg.image_size,
        mean=mean,
        std=std,
        description=f"CIFAR-10 from {root}",
        preprocessing=preprocessing(cfg, mean, std),
        transfer=transfer,
    )


SHOWN_FILES = 5  # unreadable files named in a report


def folder_report(root: Path) -> dict:
    """An image folder as `check-data` reports it, every file opened: images per class (and the largest class
    over the smallest), the files that are not images Pillow can read (the first few named), and the images'
    widths and heights (min, median, max): what a training run would trip over, found on a CPU first."""
    per_class, unreadable, widths, heights = {}, [], [], []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(p for p in class_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        per_class[class_dir.name] = len(files)
        for path in files:
            try:
                with Image.open(path) as image:
                    image.verify()
                    widths.append(image.width)
                    heights.append(image.height)
            except Exception:  # any decoding failure is what this report is for
                unreadable.append(str(path))

    def spread(values: list[int]) -> list[int]:
        return [min(values), int(np.median(values)), max(values)] if values else []

    counts = [n for n in per_class.values() if n]
    return {
        "images_per_class": per_class,
        "largest_over_smallest_class": round(max(counts) / min(counts), 2) if counts else None,
        "unreadable": len(unreadable),
        "unreadable_files": unreadable[:SHOWN_FILES],
        "width_min_median_max": spread(widths),
        "height_min_median_max": spread(heights),
    }


def _load_imagefolder(cfg: DataConfig) -> SplitData:
    root = _require_root(cfg)
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir())
    if len(class_dirs) < 2:
        raise UserError(f"{root} must hold one sub-folder per class (found {len(class_dirs)})")
    files, labels = [], []
    for label, class_dir in enumerate(class_dirs):
        found = sorted(p for p in class_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise UserError(f"class folder {class_dir} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        files += found
        labels += [label] * len(found)
    label_array = np.asarray(labels)
    train_idx, val_idx, test_idx = split_indices(label_array, cfg.split, with_test=True)
    full = ImageFiles(files, labels, preprocessing(cfg))
    # Normalisation statistics from a sample of training images keeps start-up fast on big folders.
    sample = np.random.default_rng(cfg.split_seed).choice(train_idx, size=min(512, len(train_idx)), replace=False)
    mean, std = _channel_stats(torch.stack([full[int(i)][0] for i in sample]))
    return SplitData(
        train=Subset(full, train_idx.tolist()),
        val=Subset(full, val_idx.tolist()),
        test=Subset(full, test_idx.tolist()),
        class_names=[d.name for d in class_dirs],
        image_size=cfg.image_size,
        mean=mean,
        std=std,
        description=f"image folder {root}, {len(files)} images",
        preprocessing=preprocessing(cfg, mean, std),
        num_workers=cfg.num_workers,
    )


LOADERS = {"digits": _load_digits, "cifar10": _load_cifar10, "imagefolder": _load_imagefolder}


def load_data(cfg: DataConfig, client_forms: bool = False) -> SplitData:
    """The dataset's splits. `client_forms`: also render the recipe's client-form pictures of the
    training digits (several seconds; only training draws from them, not export or evaluation)."""
    if cfg.dataset == "digits":  # the recipe refuses client forms for any other dataset
        return _load_digits(cfg, client_forms)
    return LOADERS[cfg.dataset](cfg)


def iterate_batches(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    client_form_share: float = 0.0,
    repeat: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of (uint8 [B,H,W,3], int64 [B]). With world_size > 1, each rank gets its own shard.
    `repeat` passes over the dataset make one iteration (each pass in its own order when shuffled).

    Shards have equal length (the permutation is padded by wrapping) so DDP ranks stay in step. With
    `client_form_share` and a dataset holding client forms, that share of each batch (drawn with
    `generator`) is one of the image's client-form pictures instead of the image itself.
    """
    n = len(dataset)
    passes = [torch.randperm(n, generator=generator) if shuffle else torch.arange(n) for _ in range(repeat)]
    order = torch.cat(passes)
    n = len(order)
    if world_size > 1:
        per_rank = -(-n // world_size)
        order = torch.cat([order, order[: per_rank * world_size - n]])[rank::world_size]
    if shuffle and len(order) % batch_size == 1 and len(order) > 1:
        # A training batch of one image cannot be normalised (BatchNorm needs two values per channel in
        # training mode: a 1x1 feature map of one image fails). Seen with a re-distillation set whose size
        # the traffic decides. The odd image is left out of this pass; the next pass shuffles anew.
        order = order[:-1]
    if isinstance(dataset, InMemoryImages):
        forms = dataset.client_forms if client_form_share > 0 else None
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            images = dataset.images[idx]
            if forms is not None:
                swap = torch.rand(len(idx), generator=generator) < client_form_share
                pick = torch.randint(0, forms.shape[1], (len(idx),), generator=generator)
                images = torch.where(swap.view(-1, 1, 1, 1), forms[idx, pick], images)
            yield images, dataset.labels[idx]
        return
    loader = DataLoader(Subset(dataset, order.tolist()), batch_size=batch_size, num_workers=num_workers, shuffle=False)
    yield from loader


def load_capture(location: str, spec: Preprocessing, class_names: list[str]) -> InMemoryImages:
    """The images a gateway captured (`kdcontract.capture`) in a directory or under `s3://bucket/prefix`,
    labelled where feedback labelled them and UNLABELLED elsewhere. Files that are not whole segments
    are skipped, each named in a warning."""
    where = location if is_object_store(location) else str(Path(location).expanduser())
    if not is_object_store(location) and not Path(where).is_dir():
        raise UserError(f"capture directory {where} does not exist")
    try:
        captured = read_capture(capture_files(location))
    except Exception as exc:
        if not is_object_store(location):
            raise
        # botocore's errors (no such bucket, no credentials, endpoint unreachable) as one line.
        raise UserError(f"capture {location} could not be read: {exc}") from exc
    for name, why in captured.skipped:
        print(f"[data] warning: capture file {where.rstrip('/')}/{name} skipped: {why}", flush=True)
    if len(captured.images) == 0:
        raise UserError(f"capture {where} holds no readable capture segment")
    if captured.class_names != class_names:
        raise UserError(f"capture classes {captured.class_names} are not the recipe's {class_names}")
    if captured.images.shape[1:] != (spec.image_size, spec.image_size, 3):
        raise UserError(
            f"capture images are {captured.images.shape[1:]}, the recipe prepares "
            f"{(spec.image_size, spec.image_size, 3)}"
        )
    print(
        f"[data] capture {where}: {len(captured.images)} images, {captured.labelled} with feedback labels, "
        f"{len(captured.skipped)} files skipped",
        flush=True,
    )
    images = InMemoryImages(
        torch.from_numpy(captured.images.copy()), torch.from_numpy(captured.labels.astype(np.int64))
    )
    images.label_keys = captured.label_keys  # which API key sent each label (training.label_trust judges them)
    return images


def load_transfer_folder(folder: str, spec: Preprocessing) -> InMemoryImages:
    """Every image under `folder` (any depth), prepared like the dataset's, as unlabelled images."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise UserError(f"distill.transfer folder {root} does not exist")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"distill.transfer folder {root} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    pixels = np.empty((len(files), spec.image_size, spec.image_size, 3), dtype=np.uint8)
    for i, path in enumerate(files):
        try:
            with Image.open(path) as image:
                pixels[i] = prepare(image, spec)
        except (OSError, ValueError) as exc:
            raise UserError(f"distill.transfer image {path} cannot be read: {exc}") from exc
    return InMemoryImages(torch.from_numpy(pixels), torch.full((len(files),), UNLABELLED, dtype=torch.long))
