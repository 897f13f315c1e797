"""Aspect-ratio buckets and a batch sampler whose batches never mix image sizes.

Each image is encoded at the bucket size (about ``resolution**2`` pixels, sides multiples of the model's size step:
16 px for Qwen-Image, 32 px for Qwen-Image-2.1) nearest to its aspect ratio, so nothing is squashed and little is cropped. The sampler draws batches from one bucket at a time,
deterministically from (seed, batch number): the same run, or a resumed one, sees the same batches.
"""

from __future__ import annotations

import math
import random
from typing import Callable, Hashable, Iterator, Mapping, Sequence

from PIL import Image
from torch.utils.data import Sampler

from qwen_image.errors import UserError

from ..configs.sft import DEFAULT_ASPECT_RATIOS

# width / height
Units = Sequence[Sequence[int]]  # a unit = one image; its variants (e.g. flipped) are alternative row indices


DEFAULT_MULTIPLE = 16  # Qwen-Image: 8x VAE x 2x2 packing


def _round_to(x: float, multiple: int) -> int:
    return max(multiple, int(round(x / multiple)) * multiple)


def bucket_sizes(resolution: int, aspect_ratios: Sequence[float] = DEFAULT_ASPECT_RATIOS,
                 multiple: int = DEFAULT_MULTIPLE) -> list[tuple[int, int]]:
    """(height, width) per aspect ratio, with about ``resolution**2`` pixels and sides multiples of ``multiple``
    (the bundle's ``size_multiple``)."""
    sizes = []
    for ratio in aspect_ratios:
        if ratio <= 0:
            raise UserError(f"aspect ratios must be > 0, got {ratio}")
        h = _round_to(resolution / math.sqrt(ratio), multiple)
        w = _round_to(resolution * math.sqrt(ratio), multiple)
        if (h, w) not in sizes:
            sizes.append((h, w))
    return sizes


class BucketSizeFn:
    """``size_fn`` for ``encode_dataset``: the bucket nearest to an image's aspect ratio (in log space, so 2:1 and
    1:2 are equally far from 1:1). Its repr names its settings: the encoding cache fingerprint uses it."""

    def __init__(self, resolution: int, aspect_ratios: Sequence[float] = DEFAULT_ASPECT_RATIOS,
                 multiple: int = DEFAULT_MULTIPLE):
        self.resolution = int(resolution)
        self.aspect_ratios = tuple(float(r) for r in aspect_ratios)
        self.multiple = int(multiple)
        self.sizes = bucket_sizes(self.resolution, self.aspect_ratios, self.multiple)

    def __call__(self, image: Image.Image) -> tuple[int, int]:
        return nearest_bucket(image.width, image.height, self.sizes)

    def __repr__(self) -> str:
        # The 16 px step is left out so caches written before the step was an option keep their key.
        step = f", multiple={self.multiple}" if self.multiple != DEFAULT_MULTIPLE else ""
        return f"BucketSizeFn({self.resolution}, {[round(r, 6) for r in self.aspect_ratios]}{step})"


def nearest_bucket(width: int, height: int, sizes: Sequence[tuple[int, int]]) -> tuple[int, int]:
    target = math.log(width / height)
    return min(sizes, key=lambda hw: abs(math.log(hw[1] / hw[0]) - target))


class _PoolStream:
    """Endless bucket-homogeneous batches from one pool: every pass shuffles each bucket's units, cuts them into
    full batches (the last one topped up from the bucket's start, or dropped with ``drop_last``), shuffles the
    batch order, and picks a variant per unit."""

    def __init__(self, buckets: Mapping[Hashable, Units], batch_size: int, seed: str, drop_last: bool):
        self.buckets = {k: [list(u) for u in v] for k, v in sorted(buckets.items(), key=lambda kv: str(kv[0])) if v}
        self.batch_size, self.seed, self.drop_last = batch_size, seed, drop_last
        if not self.buckets:
            raise ValueError("a data pool is empty")

    def batches_per_pass(self) -> int:
        n = [len(u) // self.batch_size if self.drop_last else math.ceil(len(u) / self.batch_size) for u in self.buckets.values()]
        return sum(n)

    def __iter__(self) -> Iterator[list[int]]:
        p = 0
        while True:
            rng = random.Random(f"{self.seed}/pass{p}")
            batches = []
            for units in self.buckets.values():
                order = list(range(len(units)))
                rng.shuffle(order)
                for start in range(0, len(order), self.batch_size):
                    chunk = order[start:start + self.batch_size]
                    if len(chunk) < self.batch_size:
                        if self.drop_last:
                            break
                        # Full batches keep per-step statistics even and DDP ranks in step.
                        chunk = chunk + [order[i % len(order)] for i in range(self.batch_size - len(chunk))]
                    batches.append([rng.choice(units[u]) for u in chunk])
            rng.shuffle(batches)
            if not batches:
                raise UserError(f"no full batch of {self.batch_size} in any bucket (drop_last): use a smaller batch")
            yield from batches
            p += 1


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of ``batch_size`` row indices, each from one bucket of one pool.

    ``pools``: pool key -> bucket key -> units (an image = a list of interchangeable row indices). ``choose_pool``
    (batch number -> pool key) lets a schedule switch pools (resolution phases, real/synthetic mix); without it the
    single pool is used. An "epoch" (``len``) is one pass over the first pool, rounded up to a multiple of
    ``batches_per_step`` (processes x gradient accumulation), so batch numbers map to optimizer steps exactly.
    Under Accelerate, the prepared dataloader hands rank r every n-th batch.
    """

    def __init__(
        self,
        pools: Mapping[Hashable, Mapping[Hashable, Units]],
        batch_size: int,
        seed: int = 0,
        drop_last: bool = False,
        choose_pool: Callable[[int], Hashable] | None = None,
        batches_per_step: int = 1,
    ):
        if batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {batch_size}")
        if not pools:
            raise ValueError("no data to sample from")
        self.batch_size, self.drop_last = batch_size, drop_last
        self.seed, self.epoch = seed, 0
        self.keys = list(pools)
        self.pools = pools
        self.choose_pool = choose_pool or (lambda k: self.keys[0])
        self.batches_per_step = max(1, batches_per_step)
        first = _PoolStream(pools[self.keys[0]], batch_size, f"{seed}/{self.keys[0]}", drop_last).batches_per_pass()
        self._len = max(1, math.ceil(first / self.batches_per_step)) * self.batches_per_step

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self._len

    def batch_at(self, start: int, count: int) -> list[list[int]]:
        """Batches number ``start`` .. ``start + count - 1`` of the endless sequence (replayed from 0: cheap)."""
        streams: dict = {}
        out = []
        for k in range(start + count):
            key = self.choose_pool(k)
            if key not in self.pools:
                raise ValueError(f"no data for {key!r}")
            if key not in streams:
                streams[key] = iter(_PoolStream(self.pools[key], self.batch_size, f"{self.seed}/{key}", self.drop_last))
            batch = next(streams[key])
            if k >= start:
                out.append(batch)
        return out

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batch_at(self.epoch * self._len, self._len)
