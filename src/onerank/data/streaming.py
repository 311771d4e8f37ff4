"""Training input streamed from Parquet: the encoded train split as a dataset of many files, read one row group at a
time through a shuffle buffer, so the train split never has to fit in memory.

Layout of an *encoded Parquet dataset* (``write_encoded_parquet``; any tool can write it): files ``part-*.parquet``,
each row one impression, with the columns of an ``EncodedSplit`` (``categorical.<field>`` int codes,
``dense.<field>`` float32, ``labels.<task>`` float32, ``label_mask.<task>`` bool, ``histories.<sequence>`` fixed-size
lists of item codes, ``user`` and ``request`` int64). A request's impressions are contiguous and never span two row
groups. ``save_streaming_dataset`` writes a whole dataset for streaming: the encoded valid / test splits and the
vocabularies in the usual cache format under ``encoded/`` (train left empty) and the train split under ``train/``;
``--dataset encoded --data-dir DIR`` trains from it.

``StreamingBatchLoader`` yields the same ``Batch`` objects as ``BatchLoader``. Its order is not the in-memory order:
each epoch visits the row groups in an order drawn from ``(seed, epoch)`` and shuffles rows (or whole requests)
within a buffer of ``buffer_rows`` impressions; it is deterministic for a given seed, file set, buffer size and
world size, which is what makes a mid-epoch resume exact (the interrupted epoch's first batches are re-read and
skipped). Under DDP, row groups are dealt to ranks by size and ranks stop an epoch together when the first one runs
out (the few rows left on the other ranks wait for the next epoch, which deals the row groups differently).

**Where the files live**: a local folder, or a URI read through ``pyarrow.fs`` (``file://``, ``s3://``, ``gs://``,
``hdfs://``; credentials from the usual environment: AWS_* variables or ``~/.aws``, Google's application default
credentials) or, for any other scheme, through ``fsspec`` (``az://``, ``memory://``, ... with that scheme's package).
``--dataset encoded --data-dir s3://bucket/prefix`` reads the train split from the bucket and copies ``encoded/`` (the
vocabularies and the valid / test splits) to the local cache once. **Prefetch**: a background thread decodes the next
``prefetch`` batches (Parquet decoding, the shuffle buffer) while the current one trains; the batches and their order are
the same with or without it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import queue
import shutil
import tempfile
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from onerank.data.batching import Batch, BatchLoader, TensorSplit
from onerank.data.dataset import EncodedDataset, EncodedSplit
from onerank.data.schema import SchemaError

log = logging.getLogger(__name__)

COLUMN_GROUPS = ("categorical", "dense", "labels", "label_mask", "histories")
MANIFEST = "_onerank_parquet.json"


# ---------------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------------
def _columns(split: EncodedSplit) -> dict[str, np.ndarray]:
    n = len(split)
    cols: dict[str, np.ndarray] = {}
    for group in COLUMN_GROUPS:
        for name, arr in getattr(split, group).items():
            cols[f"{group}.{name}"] = arr
    cols["user"] = split.user if split.user is not None else np.arange(n, dtype=np.int64)
    cols["request"] = split.request if split.request is not None else np.arange(n, dtype=np.int64)
    return cols


def _arrow(arr: np.ndarray) -> pa.Array:
    if arr.ndim == 2:
        return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(arr).reshape(-1)), arr.shape[1])
    return pa.array(arr)


def _request_aligned_cuts(request: np.ndarray, every: int) -> list[int]:
    """Row offsets about ``every`` rows apart that never cut a request: 0, ..., n."""
    n = len(request)
    if n == 0:
        return [0]
    starts = np.flatnonzero(np.diff(request, prepend=request[:1] - 1))
    cuts = [0]
    for target in range(every, n, every):
        at = int(starts[np.searchsorted(starts, target)]) if target <= starts[-1] else n
        if at > cuts[-1]:
            cuts.append(at)
    if cuts[-1] != n:
        cuts.append(n)
    return cuts


def write_encoded_parquet(
    split: EncodedSplit, directory: str | Path, rows_per_file: int = 1_000_000, row_group_rows: int = 65_536,
    key: str | None = None,
) -> Path:
    """Write ``split`` as ``directory/part-*.parquet`` (atomically: a temporary sibling renamed at the end);
    ``key`` (recorded in the manifest) says which data it holds."""
    if rows_per_file < 1 or row_group_rows < 1:
        raise ValueError(f"rows_per_file and row_group_rows must be >= 1, got {rows_per_file}, {row_group_rows}")
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        cols = _columns(split)
        request = cols["request"]
        file_cuts = _request_aligned_cuts(request, rows_per_file)
        for index, (a, b) in enumerate(zip(file_cuts[:-1], file_cuts[1:])):
            group_cuts = [a + c for c in _request_aligned_cuts(request[a:b], row_group_rows)]
            writer = None
            for lo, hi in zip(group_cuts[:-1], group_cuts[1:]):
                table = pa.table({k: _arrow(v[lo:hi]) for k, v in cols.items()})
                if writer is None:
                    writer = pq.ParquetWriter(tmp / f"part-{index:05d}.parquet", table.schema)
                writer.write_table(table, row_group_size=hi - lo)
            if writer is not None:
                writer.close()
        (tmp / MANIFEST).write_text(json.dumps({"format": 1, "rows": len(split), "key": key}))
        _swap_in(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _swap_in(tmp: Path, directory: Path) -> None:
    """Replace ``directory`` by the fully written ``tmp`` (a rename: readers never see a half-written folder)."""
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)


def _empty_like(split: EncodedSplit) -> EncodedSplit:
    return EncodedSplit.from_arrays({k: v[:0] for k, v in split.arrays().items()})


def save_streaming_dataset(
    ds: EncodedDataset, directory: str | Path, rows_per_file: int = 1_000_000, row_group_rows: int = 65_536
) -> Path:
    """``directory/encoded`` (vocabularies, valid and test, an empty train split) + ``directory/train`` (Parquet)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        replace(ds, train=_empty_like(ds.train)).save(tmp / "encoded")
        write_encoded_parquet(ds.train, tmp / "train", rows_per_file, row_group_rows)
        _swap_in(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def load_streaming_dataset(
    data_dir: str | Path | None, cache_root: str | Path | None = None, **options
) -> EncodedDataset:
    """A dataset written by ``save_streaming_dataset``: valid / test in memory, the train split left on disk (or in
    object storage: ``data_dir`` may be a URI, see the module doc)."""
    if options:
        raise SchemaError(f"encoded dataset: takes no options, got {sorted(options)}")
    if data_dir is None:
        raise FileNotFoundError("encoded dataset: pass --data-dir, the folder written by save_streaming_dataset")
    if is_uri(data_dir):
        encoded, train = _remote_encoded(str(data_dir), cache_root), str(data_dir).rstrip("/") + "/train"
    else:
        directory = Path(data_dir)
        encoded, train = directory / "encoded", str(directory / "train")
        if not (encoded / "manifest.json").exists() or not (directory / "train").is_dir():
            raise FileNotFoundError(f"encoded dataset: {directory} lacks encoded/manifest.json or train/")
    ds = EncodedDataset.load(encoded)
    ds.info["train_parquet"] = train
    ds.info["train_rows"] = ParquetSource(train).num_rows
    return ds


def is_uri(location: str | Path) -> bool:
    return isinstance(location, str) and "://" in location


def filesystem(location: str | Path) -> tuple[pafs.FileSystem, str]:
    """The file system that holds ``location`` and the path in it: local paths and ``file://``, ``s3://``, ``gs://``,
    ``hdfs://`` through ``pyarrow.fs``; any other scheme through ``fsspec``."""
    if not is_uri(location):
        return pafs.LocalFileSystem(), str(Path(location).absolute())
    try:
        return pafs.FileSystem.from_uri(str(location))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as arrow_error:
        import fsspec

        try:
            fs, path = fsspec.core.url_to_fs(str(location))
        except (ImportError, ValueError) as exc:
            raise FileNotFoundError(f"{location}: neither pyarrow ({arrow_error}) nor fsspec ({exc}) can open it") \
                from None
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def _remote_encoded(uri: str, cache_root: str | Path | None) -> Path:
    """``encoded/`` of a dataset in object storage, copied once to the local cache (keyed by the URI and the bytes of
    its manifest, so a rewritten dataset is copied again)."""
    from onerank.data.dataset import default_cache_root

    fs, root = filesystem(uri)
    try:
        with fs.open_input_stream(f"{root.rstrip('/')}/encoded/manifest.json") as stream:
            manifest = stream.read()
    except (OSError, pa.ArrowException) as exc:
        raise FileNotFoundError(f"encoded dataset: cannot read {uri}/encoded/manifest.json ({exc})") from None
    key = hashlib.sha256(uri.encode() + b"\0" + manifest).hexdigest()[:16]
    local = Path(cache_root if cache_root is not None else default_cache_root()) / f"remote-encoded-{key}"
    if not (local / "manifest.json").exists():
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{local.name}.", dir=local.parent))
        try:
            pafs.copy_files(f"{root.rstrip('/')}/encoded", str(tmp), source_filesystem=fs,
                            destination_filesystem=pafs.LocalFileSystem())
            _swap_in(tmp, local)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return local


# ---------------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Fragment:
    """One row group of one file, or part ``part`` of ``parts`` of it (whole requests): the unit of shuffling and
    of sharding over ranks."""

    path: str  # within the source's file system
    row_group: int
    num_rows: int
    part: int = 0
    parts: int = 1


class ParquetSource:
    """The row groups of an encoded Parquet dataset: a folder of ``*.parquet`` files (a local path or a URI, see the
    module doc), or a list of files."""

    def __init__(self, path: str | Path | list[str | Path]) -> None:
        where = path[0] if isinstance(path, (list, tuple)) and path else path
        self.fs, root = filesystem(where if isinstance(where, (str, Path)) else str(where))
        if isinstance(path, (list, tuple)):
            files = sorted(filesystem(p)[1] for p in path)
        else:
            info = self.fs.get_file_info(root)
            if info.type == pafs.FileType.Directory:
                found = self.fs.get_file_info(pafs.FileSelector(root))
                files = sorted(f.path for f in found if f.is_file and f.path.endswith(".parquet"))
            else:
                files = [root] if info.type == pafs.FileType.File else []
        if not files:
            raise FileNotFoundError(f"no Parquet files in {path}")
        self.fragments: list[Fragment] = []
        self._metadata: dict[str, pq.FileMetaData] = {}
        for f in files:
            meta = self._metadata[f] = self._file(f).metadata
            self.fragments += [Fragment(f, i, meta.row_group(i).num_rows) for i in range(meta.num_row_groups)]
        self.schema = self._file(files[0]).schema_arrow
        missing = [c for c in ("user", "request") if c not in self.schema.names]
        if missing or not any(n.startswith("labels.") for n in self.schema.names):
            raise SchemaError(f"{files[0]}: not an encoded Parquet dataset (no labels.* or {missing} columns)")

    def _file(self, path: str) -> pq.ParquetFile:
        # the footer read at start is reused: one request less per row group in object storage
        return pq.ParquetFile(self.fs.open_input_file(path), metadata=self._metadata.get(path))

    @property
    def num_rows(self) -> int:
        return sum(f.num_rows for f in self.fragments)

    def read(self, fragment: Fragment) -> dict[str, np.ndarray]:
        table = self._file(fragment.path).read_row_group(fragment.row_group)
        out = {}
        for name in table.column_names:
            column = table.column(name).combine_chunks()
            if pa.types.is_fixed_size_list(column.type):
                out[name] = column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), column.type.list_size)
            else:
                out[name] = column.to_numpy(zero_copy_only=False)
        if fragment.parts == 1:
            return out
        # a contiguous block of the row group's requests
        request = out["request"]
        starts = np.append(np.flatnonzero(np.diff(request, prepend=request[:1] - 1)), len(request))
        count = len(starts) - 1
        lo, hi = -(-fragment.part * count // fragment.parts), -(-(fragment.part + 1) * count // fragment.parts)
        return {k: v[starts[lo]: starts[hi]] for k, v in out.items()}

    def split(self, parts: int) -> list[Fragment]:
        """Every row group cut into ``parts`` fragments (read whole, then cut: for data sets with fewer row groups
        than ranks)."""
        return [
            Fragment(f.path, f.row_group, -(-f.num_rows // parts), part, parts)
            for f in self.fragments for part in range(parts)
        ]


def _split_from_columns(cols: dict[str, np.ndarray]) -> EncodedSplit:
    return EncodedSplit.from_arrays({k: v for k, v in cols.items() if k.split(".", 1)[0] in (*COLUMN_GROUPS, "user",
                                                                                            "request")})


def _take(cols: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[rows] for k, v in cols.items()}


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Row groups one after the other; request ids are offset so that no two parts share one (a request never
    spans row groups, so adjacent parts must not merge their requests)."""
    out: dict[str, list[np.ndarray]] = {k: [] for k in parts[0]}
    offset = 0
    for part in parts:
        for k, v in part.items():
            out[k].append(v)
        request = part["request"]
        if len(request):
            out["request"][-1] = request - request.min() + offset
            offset += int(request.max() - request.min()) + 1
    return {k: np.concatenate(v) if len(v) > 1 else v[0] for k, v in out.items()}


class StreamingBatchLoader:
    """Batches of about ``batch_size`` impressions from an encoded Parquet dataset (see the module docstring).

    ``batch_size`` is the global batch: under DDP each of ``world_size`` ranks takes its share of it, as
    ``BatchLoader`` does. ``all_ranks(flag) -> bool`` (``training.distributed.all_ranks``) makes ranks stop an epoch
    together; without it a rank simply reads its row groups to the end.
    """

    def __init__(
        self,
        source: ParquetSource | str | Path,
        batch_size: int,
        item_table: dict[str, np.ndarray],
        item_id: str | None,
        shuffle: bool = True,
        seed: int = 0,
        by_request: bool = False,
        rank: int = 0,
        world_size: int = 1,
        buffer_rows: int = 262_144,
        all_ranks: Callable[[bool], bool] | None = None,
        prefetch: int = 2,
    ) -> None:
        if batch_size < world_size:
            raise ValueError(f"batch_size {batch_size} is smaller than the number of ranks {world_size}")
        self.source = source if isinstance(source, ParquetSource) else ParquetSource(source)
        lo = -(-rank * batch_size // world_size)
        hi = -(-(rank + 1) * batch_size // world_size)
        self.local_batch = hi - lo
        self.item_table = item_table
        self.item_id = item_id
        self.shuffle = shuffle
        self.seed = seed
        self.by_request = by_request
        self.rank = rank
        self.world_size = world_size
        self.buffer_rows = max(int(buffer_rows), self.local_batch)
        self.all_ranks = all_ranks
        self.prefetch = int(prefetch)

    # ---- plan --------------------------------------------------------------------------------------------------------
    def _generator(self, epoch: int) -> np.random.Generator:
        return np.random.default_rng([int(self.seed), int(epoch), int(self.rank)])

    def assignment(self, epoch: int) -> list[list[Fragment]]:
        """Each rank's row groups this epoch: shuffled by (seed, epoch), then dealt greedily to the rank holding the
        fewest rows so far, so the shards differ by at most about one row group. With fewer than 4 row groups per
        rank, row groups are cut into parts (whole requests) so that every rank gets a share."""
        fragments = list(self.source.fragments)
        if len(fragments) < 4 * self.world_size and self.world_size > 1:
            fragments = self.source.split(-(-4 * self.world_size // len(fragments)))
        if self.shuffle:
            order = np.random.default_rng([int(self.seed), int(epoch)]).permutation(len(fragments))
            fragments = [fragments[i] for i in order]
        shards: list[list[Fragment]] = [[] for _ in range(self.world_size)]
        rows = [0] * self.world_size
        for fragment in fragments:
            r = min(range(self.world_size), key=lambda k: (rows[k], k))
            shards[r].append(fragment)
            rows[r] += fragment.num_rows
        return shards

    def __len__(self) -> int:
        """Batches per epoch (an estimate with whole-request batches: they hold a varying number of rows)."""
        shards = self.assignment(0)
        rows = min(sum(f.num_rows for f in shard) for shard in shards)
        return max(1, -(-rows // self.local_batch))

    # ---- batches -----------------------------------------------------------------------------------------------------
    def _drain(
        self, cols: dict[str, np.ndarray], rng: np.random.Generator, keep: int
    ) -> tuple[Iterator[Batch], dict[str, np.ndarray] | None]:
        """Shuffle the buffer's units (rows, or whole requests) and cut batches until at most ``keep`` rows are
        left; return (the batches, gathered lazily, and the rest of the buffer)."""
        request = cols["request"]
        # requests renumbered 0..R-1 in row order (each request's rows are contiguous), as TensorSplit expects
        cols = {**cols, "request": np.cumsum(np.diff(request, prepend=request[:1] - 1) != 0) - 1}
        split = TensorSplit(_split_from_columns(cols), self.item_table, self.item_id)
        loader = BatchLoader(split, self.local_batch, shuffle=self.shuffle, seed=int(rng.integers(2**31)),
                             by_request=self.by_request)
        plan = loader._plan(0)
        used, emitted = 0, 0
        for units in plan:
            if split.n - used <= keep:
                break
            used += int(split.request_sizes[units].sum()) if self.by_request else len(units)
            emitted += 1
        batches = itertools.islice(loader.epoch(0), emitted)
        if used == split.n:
            return batches, None
        rest = torch.cat(plan[emitted:])
        if self.by_request:
            sizes = split.request_sizes[rest]
            offsets = torch.cumsum(sizes, 0) - sizes
            rest = torch.repeat_interleave(split.request_starts[rest] - offsets, sizes) + torch.arange(int(sizes.sum()))
        return batches, _take(cols, rest.numpy())

    def _local_batches(self, epoch: int) -> Iterator[Batch]:
        rng = self._generator(epoch)
        pending: list[dict[str, np.ndarray]] = []  # row groups read since the last drain (concatenated once)
        rows = 0
        for fragment in self.assignment(epoch)[self.rank]:
            cols = self.source.read(fragment)
            pending.append(cols)
            rows += len(cols["request"])
            if rows >= self.buffer_rows:
                batches, rest = self._drain(_concat(pending), rng, keep=self.buffer_rows // 2)
                pending = [rest] if rest is not None else []
                rows = len(rest["request"]) if rest is not None else 0
                yield from batches
        if rows:
            batches, _ = self._drain(_concat(pending), rng, keep=0)
            yield from batches

    def epoch(self, epoch: int = 0, start_step: int = 0) -> Iterator[Batch]:
        """This rank's batches of ``epoch``; ``start_step`` re-reads and skips the first batches (exact resume)."""
        local = self._local_batches(epoch)
        if self.prefetch > 0:
            local = ahead(local, self.prefetch)
        step = 0
        while True:
            batch = next(local, None)
            if self.all_ranks is not None and not self.all_ranks(batch is not None):
                return
            if batch is None:
                return
            if step >= start_step:
                yield batch
            step += 1

    def __iter__(self) -> Iterator[Batch]:
        return self.epoch(0)


def ahead(batches: Iterator[Batch], depth: int) -> Iterator[Batch]:
    """``batches`` produced by a background thread, at most ``depth`` ahead of the consumer, in the same order. Parquet
    decoding and the buffer's copies run in pyarrow's and numpy's C code with the GIL released most of the time, so
    they overlap the training step. An error in the thread is raised here; a consumer that stops early stops it."""
    items: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for batch in batches:
                if not put(batch):
                    return
            put(done)
        except BaseException as exc:  # handed to the consumer, raised there
            put(exc)

    thread = threading.Thread(target=produce, name="onerank-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = items.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


def parquet_labels(source: str | Path, tasks: list[str]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(labels, label masks) per task of a whole encoded Parquet dataset, read column by column (no other column)."""
    import pyarrow.dataset as pads

    fs, path = filesystem(source)
    table = pads.dataset(path, filesystem=fs, format="parquet").to_table(
        columns=[f"labels.{t}" for t in tasks] + [f"label_mask.{t}" for t in tasks]
    )
    return (
        {t: table.column(f"labels.{t}").to_numpy() for t in tasks},
        {t: table.column(f"label_mask.{t}").to_numpy() for t in tasks},
    )


# ---------------------------------------------------------------------------------------------------------------------
# When to stream
# ---------------------------------------------------------------------------------------------------------------------
def split_nbytes(split: EncodedSplit) -> int:
    """Bytes of a split once converted to training tensors (64-bit codes, 32-bit floats)."""
    total = 0
    for key, arr in _columns(split).items():
        width = 4 if key.startswith(("dense.", "labels.")) else 1 if key.startswith("label_mask.") else 8
        total += arr.size * width
    return total


def stream_source_for(
    ds: EncodedDataset, mode: str, threshold_mb: float, out_dir: str | Path | None
) -> str | Path | None:
    """Where the train split streams from, or None to train in memory.

    ``mode``: ``on``, ``off`` or ``auto`` (stream when the split's tensors would exceed ``threshold_mb``). A dataset
    whose train split is on disk already (``--dataset encoded``) always streams. Otherwise the in-memory split is
    written once to ``OUT/train-parquet`` (reused when it holds the same data: see ``train_split_key``) and streamed from there;
    without an output folder, to a new temporary folder that the caller removes when done.
    """
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"train.streaming must be auto, on or off, got {mode!r}")
    on_disk = ds.info.get("train_parquet")
    if on_disk:
        if mode == "off":
            raise ValueError(f"dataset {ds.name!r} keeps its train split on disk ({on_disk}); it can only stream")
        return on_disk if is_uri(on_disk) else Path(on_disk)
    if mode == "off" or (mode == "auto" and split_nbytes(ds.train) <= threshold_mb * 2**20):
        return None
    if out_dir is None:
        out_dir = tempfile.mkdtemp(prefix="onerank-stream-")
    target = Path(out_dir) / "train-parquet"
    key = train_split_key(ds)
    manifest = target / MANIFEST
    if manifest.exists() and _manifest(manifest).get("key") == key:
        return target
    log.info("writing the train split (%d rows) to %s for streaming", len(ds.train), target)
    # at least ~64 row groups (the unit of shuffling and sharding), of at most 65,536 rows
    row_group_rows = min(65_536, max(1_024, -(-len(ds.train) // 64)))
    return write_encoded_parquet(ds.train, target, row_group_rows=row_group_rows, key=key)


def train_split_key(ds: EncodedDataset) -> str:
    """What a Parquet copy of the train split is reused by: the dataset's cache key (its sources and options), or,
    for a dataset built in memory, a hash of the split's contents. Never the row count: two datasets of one size
    (e.g. synthetic data with another ``task_correlation``) hold other labels."""
    if ds.info.get("cache_key"):
        return f"cache:{ds.info['cache_key']}"
    digest = hashlib.sha256()
    for name, arr in sorted(ds.train.arrays().items()):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(arr).tobytes())
    return f"content:{digest.hexdigest()[:16]}"


def _manifest(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # damaged: rewritten, never trusted


__all__ = [
    "Fragment", "ParquetSource", "StreamingBatchLoader", "ahead", "filesystem", "is_uri", "load_streaming_dataset",
    "parquet_labels",
    "save_streaming_dataset", "split_nbytes", "stream_source_for", "write_encoded_parquet",
]
