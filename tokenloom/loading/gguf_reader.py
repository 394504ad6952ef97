"""A GGUF file's header: metadata, tensor table and a memory map of the tensor data.

`gguf.GGUFReader` builds numpy views for every element of every metadata array, which takes 1.6 s
for SmolLM2's 98k vocabulary strings and 7.5 s for Gemma 3's 262k; this reader walks the same
layout with `struct` (0.05 s / 0.2 s) and turns every way a file can be malformed into a
`GGUFFormatError` that names the file. The tests check it against `GGUFReader` on real files.

Files come from strangers, so every size is checked before it is used: counts and lengths against
the bytes left in the file, at most 4 dimensions per tensor (ggml's limit), arrays nested at most
`MAX_NESTING` deep and holding at most `MAX_METADATA_ELEMENTS` values in all, unique keys and tensor
names, and tensor data regions aligned, inside the file and not overlapping.

The vocabulary arrays (`LAZY_STRING_ARRAYS`) pass the same checks during the parse but are held as
`GGUFStrings`, whose Python strings are built when read: the model loader never reads them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from tokenloom.errors import GGUFFormatError, ModelNotFoundError
from tokenloom.loading.gguf_arrays import GGUFStrings

GGUF_MAGIC = b"GGUF"
_SUPPORTED_VERSIONS = (2, 3)  # v1 counted in 32 bits; llama.cpp stopped writing it in 2023
_DEFAULT_ALIGNMENT = 32

# metadata value type id -> struct format of one fixed-size value (8 = string, 9 = array)
_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_NUMPY_DTYPES = {
    0: "<u1",
    1: "<i1",
    2: "<u2",
    3: "<i2",
    4: "<u4",
    5: "<i4",
    6: "<f4",
    7: "?",
    10: "<u8",
    11: "<i8",
    12: "<f8",
}
_STRING, _ARRAY = 8, 9

MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NESTING = 8  # arrays of arrays: llama.cpp writes none; a deeper file is an attack on the parser
MAX_METADATA_ELEMENTS = 1 << 23  # all array elements together (Gemma 3: 0.8M); each becomes a Python object
_MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, the smallest value
_MIN_TENSOR_BYTES = 8 + 4 + 4 + 8  # name length, dimension count, type, offset
# String arrays held as `GGUFStrings` (checked now, built when read): the vocabulary, which only the
# tokenizer reads. Every other array is a list, as the config mapping and its checks expect.
LAZY_STRING_ARRAYS = frozenset({"tokenizer.ggml.tokens", "tokenizer.ggml.merges"})


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One entry of the tensor table."""

    name: str
    shape: tuple[int, ...]  # torch order: ggml's dimensions reversed, so rows come first
    ggml_type: int
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        return GGMLQuantizationType(self.ggml_type).name


@dataclass
class GGUFFile:
    """A parsed GGUF file. `data` maps the whole file copy-on-write, so torch views of it are writable
    without ever touching the file."""

    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: list[GGUFTensorInfo]
    data: np.ndarray  # uint8 memory map of the whole file

    def raw(self, info: GGUFTensorInfo) -> np.ndarray:
        """The tensor's bytes as stored (uint8, a view of the map)."""
        return self.data[info.offset : info.offset + info.nbytes]

    def layout(self) -> dict[str, np.ndarray]:
        """The element lengths of each lazily built array, which let `read_gguf` skip walking them."""
        return {key: value.lengths() for key, value in self.metadata.items() if isinstance(value, GGUFStrings)}


class _Cursor:
    """Bounds-checked little-endian reads from the file's buffer."""

    def __init__(self, buffer: np.ndarray, path: Path, layout: dict[str, np.ndarray] | None = None) -> None:
        self.buffer = buffer
        self.layout = layout or {}  # element lengths of the lazy arrays from an earlier parse (hints)
        self.size = buffer.shape[0]
        self.view = memoryview(buffer)
        self.path = path
        self.pos = 0
        self.elements = 0  # metadata array elements read so far

    def need_items(self, count: int, item_bytes: int, what: str) -> None:
        """`count` items of at least `item_bytes` each must fit in what is left of the file."""
        if count * item_bytes > self.size - self.pos:
            raise GGUFFormatError(
                f"{self.path}: {what} claims {count} entries, more than the {self.size - self.pos} bytes left "
                "in the file can hold"
            )

    def count_elements(self, count: int, key: str) -> None:
        self.elements += count
        if self.elements > MAX_METADATA_ELEMENTS:
            raise GGUFFormatError(
                f"{self.path}: metadata array {key!r} takes the metadata past {MAX_METADATA_ELEMENTS} array "
                "elements in all (MAX_METADATA_ELEMENTS); real files hold a few hundred thousand"
            )

    def need(self, count: int, what: str) -> None:
        if self.pos + count > self.size:
            raise GGUFFormatError(
                f"{self.path}: truncated GGUF file: reading {what} needs bytes up to {self.pos + count}, "
                f"but the file has only {self.size} bytes"
            )

    def unpack(self, fmt: str, what: str) -> tuple[Any, ...]:
        width = struct.calcsize("<" + fmt)
        self.need(width, what)
        values = struct.unpack_from("<" + fmt, self.view, self.pos)
        self.pos += width
        return values

    def string(self, what: str) -> str:
        (length,) = self.unpack("Q", what)
        self.need(length, what)
        start, self.pos = self.pos, self.pos + length
        try:
            return str(self.view[start : self.pos], "utf-8")
        except UnicodeDecodeError as exc:
            raise GGUFFormatError(f"{self.path}: {what} at byte {start} is not valid UTF-8 ({exc})") from exc

    def strings(self, count: int, key: str) -> list[str]:
        """`count` strings of a metadata array: `string`'s checks, with the error text built only on failure
        (a vocabulary holds 10^5 of them)."""
        view, size, pos, out = self.view, self.size, self.pos, []
        length_of = struct.Struct("<Q").unpack_from
        for i in range(count):
            if pos + 8 > size:
                self.pos = pos
                self.need(8, f"element {i} of metadata array {key!r}")
            (length,) = length_of(view, pos)
            pos += 8
            if pos + length > size:
                self.pos = pos
                self.need(length, f"element {i} of metadata array {key!r}")
            try:
                out.append(str(view[pos : pos + length], "utf-8"))
            except UnicodeDecodeError as exc:
                raise GGUFFormatError(
                    f"{self.path}: element {i} of metadata array {key!r} at byte {pos} is not valid UTF-8 ({exc})"
                ) from exc
            pos += length
        self.pos = pos
        return out

    def value(self, value_type: int, key: str, depth: int = 0) -> Any:
        if value_type in _SCALAR_FORMATS:
            return self.unpack(_SCALAR_FORMATS[value_type], f"metadata value {key!r}")[0]
        if value_type == _STRING:
            return self.string(f"metadata value {key!r}")
        if value_type == _ARRAY:
            if depth >= MAX_NESTING:
                raise GGUFFormatError(
                    f"{self.path}: metadata array {key!r} nests arrays more than {MAX_NESTING} deep (MAX_NESTING)"
                )
            element_type, count = self.unpack("IQ", f"metadata array header {key!r}")
            if element_type in _NUMPY_DTYPES:
                dtype = np.dtype(_NUMPY_DTYPES[element_type])
                self.need_items(count, dtype.itemsize, f"metadata array {key!r}")
                self.count_elements(count, key)
                array = np.frombuffer(self.view, dtype=dtype, count=count, offset=self.pos)
                self.pos += count * dtype.itemsize
                return array.tolist()
            if element_type == _STRING:
                self.need_items(count, 8, f"metadata array {key!r}")
                self.count_elements(count, key)
                if depth == 0 and key in LAZY_STRING_ARRAYS:
                    parsed = GGUFStrings.parse(self.view, self.pos, count, self.layout.get(key))
                    if parsed is not None:
                        strings, self.pos = parsed
                        return strings
                return self.strings(count, key)  # eagerly, naming the element at fault
            if element_type == _ARRAY:
                self.need_items(count, 12, f"metadata array {key!r}")
                self.count_elements(count, key)
                return [self.value(_ARRAY, key, depth + 1) for _ in range(count)]
            raise GGUFFormatError(
                f"{self.path}: metadata array {key!r} has unknown element type {element_type}"
            )
        raise GGUFFormatError(f"{self.path}: metadata key {key!r} has unknown value type {value_type}")


def _tensor_nbytes(path: Path, name: str, shape: tuple[int, ...], ggml_type: int) -> int:
    try:
        qtype = GGMLQuantizationType(ggml_type)
        block_size, type_size = GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError) as exc:
        raise GGUFFormatError(f"{path}: tensor {name!r} has unknown ggml type {ggml_type}") from exc
    row_length = shape[-1] if shape else 1
    if row_length % block_size:
        raise GGUFFormatError(
            f"{path}: tensor {name!r} ({qtype.name}) has rows of {row_length} values, "
            f"not a multiple of the {block_size}-value block"
        )
    return prod(shape) // block_size * type_size


def open_memmap(path: Path) -> np.ndarray:
    """Memory-map a file as uint8 after checking it exists and starts with the GGUF magic."""
    path = Path(path)
    if not path.exists():
        raise ModelNotFoundError(f"GGUF file not found: {path}")
    if not path.is_file():
        raise GGUFFormatError(f"{path}: not a GGUF file (not a regular file)")
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        if len(magic) < 4 and GGUF_MAGIC.startswith(magic):
            raise GGUFFormatError(f"{path}: truncated GGUF file ({len(magic)} bytes)")
        raise GGUFFormatError(f"{path}: not a GGUF file (bad magic {magic!r}, expected {GGUF_MAGIC!r})")
    try:
        return np.memmap(path, dtype=np.uint8, mode="c")
    except (OSError, ValueError) as exc:
        raise GGUFFormatError(f"{path}: cannot map the file ({exc})") from exc


def read_gguf(path: Path, layout: dict[str, np.ndarray] | None = None) -> GGUFFile:
    """Parse a GGUF file's header and map its data. Raises `GGUFFormatError` / `ModelNotFoundError`.

    `layout` (`GGUFFile.layout()` of an earlier parse of the file) spares walking the vocabulary arrays
    where it still fits the file, which is checked; it never changes the result."""
    path = Path(path)
    data = open_memmap(path)
    try:
        return _parse(path, data, layout)
    except GGUFFormatError:
        raise
    except (struct.error, ValueError, OverflowError, MemoryError) as exc:
        raise GGUFFormatError(f"{path}: corrupt GGUF header ({exc})") from exc


def _parse(path: Path, data: np.ndarray, layout: dict[str, np.ndarray] | None = None) -> GGUFFile:
    cursor = _Cursor(data, path, layout)
    cursor.pos = 4
    (version,) = cursor.unpack("I", "version")
    if version not in _SUPPORTED_VERSIONS:
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        detail = " (a big-endian file)" if swapped in _SUPPORTED_VERSIONS else ""
        raise GGUFFormatError(f"{path}: unsupported GGUF version {version}{detail}; supported: 2, 3")
    tensor_count, kv_count = cursor.unpack("QQ", "header counts")
    cursor.need_items(kv_count, _MIN_KV_BYTES, "the header's metadata count")
    cursor.need_items(tensor_count, _MIN_TENSOR_BYTES, "the header's tensor count")
    metadata: dict[str, Any] = {}
    for _ in range(kv_count):
        key = cursor.string("metadata key")
        if key in metadata:
            raise GGUFFormatError(f"{path}: metadata key {key!r} appears twice")
        (value_type,) = cursor.unpack("I", f"type of metadata key {key!r}")
        metadata[key] = cursor.value(value_type, key)

    entries = []
    names: set[str] = set()
    for _ in range(tensor_count):
        name = cursor.string("tensor name")
        if name in names:
            raise GGUFFormatError(f"{path}: tensor {name!r} appears twice in the tensor table")
        names.add(name)
        (num_dims,) = cursor.unpack("I", f"dimension count of tensor {name!r}")
        if num_dims > MAX_DIMS:
            raise GGUFFormatError(
                f"{path}: tensor {name!r} has {num_dims} dimensions; GGUF tensors have at most {MAX_DIMS}"
            )
        dims = cursor.unpack(f"{num_dims}Q", f"dimensions of tensor {name!r}")
        if any(d >= 1 << 63 for d in dims):
            raise GGUFFormatError(f"{path}: tensor {name!r} has a dimension of 2^63 or more: {list(dims)}")
        ggml_type, offset = cursor.unpack("IQ", f"type and offset of tensor {name!r}")
        entries.append((name, tuple(reversed(dims)), ggml_type, offset))

    alignment = _alignment(path, metadata)
    data_start = -(-cursor.pos // alignment) * alignment

    tensors = []
    for name, shape, ggml_type, offset in entries:
        nbytes = _tensor_nbytes(path, name, shape, ggml_type)
        if offset % alignment:
            raise GGUFFormatError(
                f"{path}: tensor {name!r} starts at data offset {offset}, not a multiple of the "
                f"{alignment}-byte alignment"
            )
        info = GGUFTensorInfo(name, shape, ggml_type, data_start + offset, nbytes)
        if info.offset + nbytes > cursor.size:
            raise GGUFFormatError(
                f"{path}: truncated GGUF file: tensor {name!r} ends at byte {info.offset + nbytes}, "
                f"but the file has only {cursor.size} bytes"
            )
        tensors.append(info)
    _refuse_overlaps(path, tensors)
    return GGUFFile(path, version, metadata, tensors, data)


def _alignment(path: Path, metadata: dict[str, Any]) -> int:
    alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
    if isinstance(alignment, bool) or not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise GGUFFormatError(f"{path}: general.alignment must be a power of two, got {alignment!r}")
    return alignment


def _refuse_overlaps(path: Path, tensors: list[GGUFTensorInfo]) -> None:
    """Two tensors sharing bytes would alias each other's weights: a damaged or crafted table."""
    previous: GGUFTensorInfo | None = None
    for info in sorted((t for t in tensors if t.nbytes), key=lambda t: t.offset):
        if previous is not None and info.offset < previous.offset + previous.nbytes:
            raise GGUFFormatError(
                f"{path}: the data of tensors {previous.name!r} (bytes {previous.offset}-"
                f"{previous.offset + previous.nbytes}) and {info.name!r} (from byte {info.offset}) overlap"
            )
        previous = info
