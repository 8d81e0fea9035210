"""Reading a GGUF file: metadata, tokenizer arrays and dequantized tensors.

Everything that can be checked before the slow tensor work is checked in
:func:`open_gguf`, so an unsupported or broken file fails up front.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ConversionError

# Tensor types whose dequantization the ``gguf`` package implements and that
# this converter has been checked with or that are plain floats.
READABLE_TENSOR_TYPES = {
    "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
}


@dataclass
class GGUFFile:
    """An opened, validated GGUF file."""

    path: str
    reader: Any
    architecture: str

    def field(self, key: str, default: Any = None) -> Any:
        """Return the scalar, string or array metadata value stored at ``key``."""
        field = self.reader.fields.get(key)
        if field is None:
            return default
        return field.contents()

    def arch_field(self, key: str, default: Any = None) -> Any:
        """Return ``<architecture>.<key>``."""
        return self.field(f"{self.architecture}.{key}", default)

    def require(self, key: str) -> Any:
        value = self.field(key)
        if value is None:
            raise ConversionError(f"{self.path}: GGUF metadata key {key!r} is missing")
        return value

    def string_array(self, key: str) -> list[str]:
        """Decode a string array field (token texts, merges) without copying twice."""
        field = self.reader.fields.get(key)
        if field is None:
            return []
        return [bytes(field.parts[i]).decode("utf-8", errors="surrogateescape") for i in field.data]

    def number_array(self, key: str) -> np.ndarray | None:
        field = self.reader.fields.get(key)
        if field is None:
            return None
        return np.array([field.parts[i][0] for i in field.data])

    def has_tensor(self, name: str) -> bool:
        return name in self._tensors

    @property
    def _tensors(self) -> dict[str, Any]:
        cache = self.__dict__.get("_tensor_cache")
        if cache is None:
            cache = {t.name: t for t in self.reader.tensors}
            self.__dict__["_tensor_cache"] = cache
        return cache

    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        """Shape of tensor ``name`` in PyTorch order (out, in)."""
        try:
            tensor = self._tensors[name]
        except KeyError:
            raise ConversionError(f"{self.path}: tensor {name!r} is missing") from None
        return tuple(int(d) for d in reversed(tensor.shape))

    def tensor(self, name: str) -> np.ndarray:
        """Dequantize tensor ``name`` to a writable float32 array in PyTorch layout (out, in)."""
        from gguf.quants import dequantize

        try:
            tensor = self._tensors[name]
        except KeyError:
            raise ConversionError(f"{self.path}: tensor {name!r} is missing") from None
        data = dequantize(tensor.data, tensor.tensor_type)
        shape = tuple(int(d) for d in reversed(tensor.shape))
        array = np.ascontiguousarray(np.asarray(data, dtype=np.float32).reshape(shape))
        # F32 tensors come back as views of the read-only memory map; the
        # quantizer scales in place, so those are copied (one tensor at a time).
        array = array if array.flags.writeable else array.copy()
        self._release(tensor)
        return array

    def _release(self, tensor: Any) -> None:
        """Drop the tensor's file pages from this process's resident memory (they stay in the page
        cache): read once, they would otherwise count against the conversion's footprint until the end."""
        mapping = getattr(self.reader.data, "_mmap", None)
        if mapping is None or not hasattr(mapping, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = int(tensor.data_offset) // mmap.PAGESIZE * mmap.PAGESIZE
        end = int(tensor.data_offset) + int(tensor.n_bytes)
        mapping.madvise(mmap.MADV_DONTNEED, start, end - start)


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """Open ``path`` and check that its tensors can be read, before any conversion."""
    from gguf import GGUFReader

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConversionError(f"GGUF file not found: {path}")
    try:
        reader = GGUFReader(path)
    except Exception as exc:  # the reader raises ValueError, IndexError, struct errors...
        raise ConversionError(
            f"cannot read GGUF file {path}: {exc.__class__.__name__}: {exc} "
            "(is the file truncated or not a GGUF file?)"
        ) from exc

    arch_field = reader.fields.get("general.architecture")
    architecture = arch_field.contents() if arch_field is not None else None
    unreadable = sorted({t.tensor_type.name for t in reader.tensors} - READABLE_TENSOR_TYPES)
    if unreadable:
        raise ConversionError(
            f"{path}: tensor type(s) {', '.join(unreadable)} cannot be read by this converter; "
            f"readable: {', '.join(sorted(READABLE_TENSOR_TYPES))}"
        )
    # A file cut short can still parse its header; check the data region is whole.
    size = os.path.getsize(path)
    for tensor in reader.tensors:
        end = int(tensor.data_offset) + int(tensor.n_bytes)
        if end > size:
            raise ConversionError(
                f"{path}: tensor {tensor.name!r} ends at byte {end} but the file has {size} bytes "
                "(the file is truncated)"
            )
    return GGUFFile(path=path, reader=reader, architecture=architecture)
