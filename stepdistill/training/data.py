"""Step-indexed, seeded training data: micro-batch k of process r depends only on (seed, slot), where
``slot = k * num_processes + r`` is its run-wide index (:meth:`DataStart.slot`).

This is what makes resume exact without saving iterator state: a run resumed at micro-batch k simply asks for
batches k, k+1, ... again. Indexing by the run-wide slot (rather than by (rank, k)) makes the data independent of
how the slots are spread over processes: N processes with ``train.gradient_accumulation_steps = A`` consume, per
update, exactly the slots one process with ``A * N`` accumulation steps consumes (``data.batch_size`` is the
per-process micro-batch; global batch per update = ``batch_size * gradient_accumulation_steps * num_processes``).

The loop calls ``data_iter_factory(DataStart(batch_index=k, seed, rank, num_processes))`` and iterates the result;
a factory is usually built with :func:`step_indexed` from a function ``sample_fn(slot, generator) -> batch``.

Seeds: :func:`derive_seed` mixes integers with ``numpy.random.SeedSequence`` (nearby inputs give unrelated
streams). Named streams keep data, noise, augmentation and sample-grid randomness apart.

Built-in ``data.kind`` values (:func:`build_data_factory`); every batch is a dict:

* ``prompts``: ``{"conditions": [str] * B}`` drawn from a text file (one prompt per line);
* ``image_folder``: ``{"images": (B, C, R, R) in [-1, 1], "conditions": captions}`` (caption = same-name ``.txt``,
  else ""), epoch-wise shuffled by :class:`StepIndexedBatchSampler`, loaded by a DataLoader with workers;
* ``random_images``: uniform noise images in [-1, 1] and empty prompts (throughput measurements);
* ``digits``: ``stepdistill.benchmarks.digits`` train split, ``{"images", "labels", "prompts", "conditions"}``;
* others (``toy2d``): registered by their module with :func:`register_data_kind`.
"""

from __future__ import annotations

import dataclasses
import importlib
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from ..config import DataSection

__all__ = [
    "DataIterFactory",
    "DataStart",
    "StepIndexedBatchSampler",
    "StepIndexedIterator",
    "build_data_factory",
    "global_batch_index",
    "read_prompt_file",
    "derive_seed",
    "move_to_device",
    "register_data_kind",
    "seed_everything",
    "step_generator",
    "step_indexed",
]

STREAMS = {"data": 0, "noise": 1, "sample": 2, "augment": 3, "epoch": 4, "init": 5}
"""Named random streams; each mixes its id into the seed."""


def derive_seed(*keys: int) -> int:
    """A 63-bit seed from non-negative integers, mixed by ``numpy.random.SeedSequence``."""
    if any(int(k) < 0 for k in keys):
        raise ValueError(f"seed components must be non-negative integers, got {keys}")
    hi, lo = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint32)
    return (int(hi) << 32 | int(lo)) & ((1 << 63) - 1)


def step_generator(seed: int, index: int, *, rank: int = 0, stream: str = "data",
                   device: str | torch.device = "cpu") -> torch.Generator:
    """A ``torch.Generator`` that depends only on (seed, stream, rank, index)."""
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(seed, STREAMS[stream], rank, index))
    return g


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed torch (all devices), numpy and python ``random`` of process ``rank`` from (seed, rank); call it before
    building models so weight initialisation is reproducible."""
    import random

    s = derive_seed(seed, STREAMS["init"], rank)
    torch.manual_seed(s)
    np.random.seed(s % 2**32)
    random.seed(s)


def global_batch_index(batch_index: int, rank: int = 0, num_processes: int = 1) -> int:
    """Run-wide index ("slot") of micro-batch ``batch_index`` of process ``rank``: ``batch_index * N + rank``.

    Update ``u`` with accumulation ``A`` on ``N`` processes covers slots ``[u*A*N, (u+1)*A*N)`` whatever ``N`` is.
    """
    if not 0 <= rank < num_processes:
        raise ValueError(f"rank {rank} is not in 0..{num_processes - 1}")
    return int(batch_index) * int(num_processes) + int(rank)


@dataclass(frozen=True)
class DataStart:
    """Where a data iterator starts: the first micro-batch index it yields, and who asks."""

    batch_index: int = 0
    seed: int = 0
    rank: int = 0
    num_processes: int = 1

    def slot(self, batch_index: int) -> int:
        """Run-wide index of this process's micro-batch ``batch_index`` (see :func:`global_batch_index`)."""
        return global_batch_index(batch_index, self.rank, max(self.num_processes, self.rank + 1))


DataIterFactory = Callable[[DataStart], Iterable]
"""``factory(DataStart) -> iterable of batches``, the k-th yielded batch being micro-batch ``start.batch_index + k``."""


class StepIndexedIterator:
    """Yields ``sample_fn(s, step_generator(seed, s))`` with ``s = start.slot(k)`` for k = start.batch_index, ...

    (With one process ``s == k``.)"""

    def __init__(self, sample_fn: Callable[[int, torch.Generator], Any], start: DataStart):
        self.sample_fn, self.start = sample_fn, start
        self.batch_index = start.batch_index

    def __iter__(self) -> Iterator:
        return self

    def __next__(self):
        k = self.batch_index
        slot = self.start.slot(k)
        batch = self.sample_fn(slot, step_generator(self.start.seed, slot))
        self.batch_index = k + 1
        return batch


def step_indexed(sample_fn: Callable[[int, torch.Generator], Any]) -> DataIterFactory:
    """A data factory from ``sample_fn(slot, generator) -> batch`` (``slot``: run-wide micro-batch index)."""
    return lambda start: StepIndexedIterator(sample_fn, start)


class StepIndexedBatchSampler(torch.utils.data.Sampler):
    """Infinite batch sampler over a map-style dataset of ``num_items``, resumable at any batch index.

    Epoch e is a permutation of all items drawn from (seed, e), the same on every rank; run-wide slot ``s``
    (:meth:`DataStart.slot`; ``s = e * E + j`` with ``E = num_items // batch_size`` batches per epoch, the remainder
    dropped) is slice ``j`` of it. Ranks hold different slots, so within an epoch they see disjoint items, and the
    order does not depend on the number of processes.
    """

    def __init__(self, num_items: int, batch_size: int, start: DataStart):
        if num_items < batch_size * start.num_processes:
            raise ValueError(f"the dataset has {num_items} items, fewer than batch_size x processes = "
                             f"{batch_size} x {start.num_processes}; lower data.batch_size or add data")
        per_epoch = num_items // batch_size
        self.num_items, self.batch_size, self.start, self.per_epoch = num_items, batch_size, start, per_epoch
        self._perm: tuple[int, torch.Tensor] | None = None

    def indices(self, k: int) -> list[int]:
        """Dataset indices of this rank's micro-batch ``k``."""
        epoch, j = divmod(self.start.slot(k), self.per_epoch)
        if self._perm is None or self._perm[0] != epoch:
            g = step_generator(self.start.seed, epoch, stream="epoch")
            self._perm = (epoch, torch.randperm(self.num_items, generator=g))
        lo = j * self.batch_size
        return self._perm[1][lo: lo + self.batch_size].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        k = self.start.batch_index
        while True:
            yield self.indices(k)
            k += 1


def move_to_device(batch: Any, device: torch.device | str) -> Any:
    """Tensors inside dicts, lists, tuples, namedtuples and dataclasses moved to ``device``; anything else as is."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return type(batch)((k, move_to_device(v, device)) for k, v in batch.items())
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(move_to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(v, device) for v in batch)
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        changes = {f.name: move_to_device(getattr(batch, f.name), device) for f in dataclasses.fields(batch) if f.init}
        return dataclasses.replace(batch, **changes)
    return batch


# ----------------------------------------------------------------------------------------------- built-in kinds
_DATA_KINDS: dict[str, Callable[["DataSection"], DataIterFactory]] = {}


def register_data_kind(kind: str, builder: Callable[["DataSection"], DataIterFactory]) -> None:
    """Register ``builder(data_section) -> DataIterFactory`` for ``data.kind == kind``."""
    _DATA_KINDS[kind] = builder


def build_data_factory(data: "DataSection") -> DataIterFactory:
    """The data factory for ``cfg.data``; kinds not built in are looked up in ``stepdistill.benchmarks.<kind>``."""
    if data.kind not in _DATA_KINDS:
        try:
            importlib.import_module(f"stepdistill.benchmarks.{data.kind}")
        except ModuleNotFoundError as exc:
            if exc.name != f"stepdistill.benchmarks.{data.kind}":
                raise
    if data.kind not in _DATA_KINDS:
        raise ValueError(f"data.kind {data.kind!r} has no data builder: stepdistill.benchmarks.{data.kind} must call "
                         f"stepdistill.training.data.register_data_kind({data.kind!r}, builder). "
                         f"Built-in kinds: {', '.join(sorted(_DATA_KINDS))}")
    return _DATA_KINDS[data.kind](data)


def read_prompt_file(path: str | Path) -> list[str]:
    """The non-empty, stripped lines of a UTF-8 prompt file (a UTF-8 BOM is allowed).

    A file that is not UTF-8 is refused with the line number and byte offset of the first bad byte; an empty (or
    whitespace-only) file is refused too, both naming the file.
    """
    path = Path(path)
    if not path.is_file():
        hint = " (it is a directory)" if path.is_dir() else ""
        raise FileNotFoundError(f"data.path {path} does not exist{hint}; give a text file with one prompt per line")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        bad = raw[exc.start:exc.end].hex(" ")
        raise ValueError(f"prompt file {path} is not valid UTF-8: line {line}, byte offset {exc.start} "
                         f"(byte 0x{bad}: {exc.reason}); re-save it as UTF-8, e.g. "
                         f"iconv -f latin1 -t utf-8 {path} > fixed.txt") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        what = "is empty" if not raw else "has only blank lines"
        raise ValueError(f"prompt file {path} {what}: give one prompt per line (data.path, data.kind=prompts)")
    return prompts


def _prompts(data: "DataSection") -> DataIterFactory:
    prompts = read_prompt_file(data.path)

    def sample(k: int, g: torch.Generator) -> dict:
        picks = torch.randint(len(prompts), (data.batch_size,), generator=g).tolist()
        return {"conditions": [prompts[i] for i in picks]}

    return step_indexed(sample)


def _random_images(data: "DataSection") -> DataIterFactory:
    shape = (data.batch_size, data.channels, data.resolution, data.resolution)

    def sample(k: int, g: torch.Generator) -> dict:
        return {"images": torch.rand(shape, generator=g) * 2 - 1, "conditions": [""] * data.batch_size}

    return step_indexed(sample)


def _digits(data: "DataSection") -> DataIterFactory:
    from ..benchmarks.digits.data import load_split, sample_batch

    split = load_split("train")
    if data.resolution not in (None, split.images.shape[-1]):
        raise ValueError(f"data.resolution={data.resolution}: digits are {split.images.shape[-1]}x"
                         f"{split.images.shape[-1]}; leave data.resolution unset")

    def factory(start: DataStart):
        seed = derive_seed(start.seed, 0)

        def sample(slot: int, _g: torch.Generator) -> dict:
            b = sample_batch(split, slot, data.batch_size, seed=seed)
            return {"images": b.images, "labels": b.labels, "prompts": b.prompts,
                    "conditions": b.prompts if data.conditioning == "prompt" else b.labels}

        return StepIndexedIterator(sample, start)

    return factory


_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def _probe_image(path: Path) -> str | None:
    """Why ``path`` is not a usable image (None if its header reads fine). Only the header is read."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            width, height = im.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        return f"{type(exc).__name__}: {exc}"
    if width < 1 or height < 1:
        return f"image is {width}x{height}"
    return None


class _ImageFolder(torch.utils.data.Dataset):
    """Images under a folder (recursive, sorted), converted and resized to what training needs.

    Every image, whatever its size or mode, is converted to ``L`` (channels=1) or ``RGB`` (channels=3; an alpha
    channel is dropped, palette images are expanded), its shorter side resized (bicubic, up or down) to
    ``resolution`` and centre-cropped to a square. Files with an image suffix whose header cannot be read (not an
    image, empty, unsupported) are *skipped and counted*: ``self.skipped`` lists ``(path, reason)`` and one warning
    names them; a folder with no readable image is an error. A file whose header reads but whose pixel data is
    truncated fails when loaded, with an error naming the file.
    """

    def __init__(self, root: Path, resolution: int, channels: int):
        if not root.is_dir():
            raise FileNotFoundError(f"data.path {root} is not a folder of images")
        candidates = sorted(p for p in root.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES and p.is_file())
        if not candidates:
            raise ValueError(f"data.path {root} has no images ({', '.join(sorted(_IMAGE_SUFFIXES))})")
        self.files: list[Path] = []
        self.skipped: list[tuple[Path, str]] = []
        for path in candidates:
            reason = _probe_image(path)
            if reason is None:
                self.files.append(path)
            else:
                self.skipped.append((path, reason))
        if self.skipped:
            listed = "; ".join(f"{p.relative_to(root)} ({r})" for p, r in self.skipped[:5])
            more = f"; and {len(self.skipped) - 5} more" if len(self.skipped) > 5 else ""
            message = (f"data.path {root}: skipped {len(self.skipped)} of {len(candidates)} files that are not "
                       f"readable images: {listed}{more}")
            if not self.files:
                raise ValueError(f"{message}. No readable image is left; check the folder")
            warnings.warn(message, stacklevel=3)
        from torchvision import transforms

        self.mode = "L" if channels == 1 else "RGB"
        self.transform = transforms.Compose([
            transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(resolution),
            transforms.ToTensor(),
            transforms.Normalize([0.5] * channels, [0.5] * channels),
        ])

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        from PIL import Image

        path = self.files[i]
        try:
            with Image.open(path) as im:
                if im.mode == "P" and "transparency" in im.info:
                    im = im.convert("RGBA")
                image = self.transform(im.convert(self.mode))
        except (OSError, SyntaxError, ValueError) as exc:
            raise ValueError(f"image {path} could not be decoded ({type(exc).__name__}: {exc}); the file is truncated "
                             f"or corrupt: delete or re-export it") from None
        caption = path.with_suffix(".txt")
        return {"images": image, "conditions": caption.read_text().strip() if caption.is_file() else ""}


def _image_folder(data: "DataSection") -> DataIterFactory:
    dataset = _ImageFolder(Path(data.path), data.resolution, data.channels)

    def factory(start: DataStart) -> Iterator[dict]:
        sampler = StepIndexedBatchSampler(len(dataset), data.batch_size, start)
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=data.num_workers)
        for k, batch in enumerate(loader, start=start.batch_index):
            if data.random_flip:
                g = step_generator(start.seed, start.slot(k), stream="augment")
                flip = torch.rand(len(batch["images"]), generator=g) < 0.5
                batch["images"][flip] = batch["images"][flip].flip(-1)
            yield batch

    return factory


for _kind, _builder in {"prompts": _prompts, "random_images": _random_images, "digits": _digits,
                        "image_folder": _image_folder}.items():
    register_data_kind(_kind, _builder)
