"""A memory-mapped safetensors reader (numpy views, bf16 via ml_dtypes, no framework needed).

Reading through a memory map means a host only touches the bytes of the slices it asks for, so
sharded loading never materialises a full copy of the checkpoint per host.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}


class SafetensorsFile:
    """One ``.safetensors`` file: ``names()``, ``shape(name)``, ``dtype(name)``, ``get(name)``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"safetensors file not found: {self.path}")
        with open(self.path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        self.metadata = header.pop("__metadata__", {}) or {}
        self._header = header
        self._offset = 8 + n
        self._mm = None

    def _map(self):
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        return self._mm

    def names(self) -> list[str]:
        return list(self._header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._header[name]["shape"])

    def dtype_str(self, name: str) -> str:
        return self._header[name]["dtype"]

    def get(self, name: str) -> np.ndarray:
        """A read-only numpy view of the tensor (no copy until the caller slices/casts)."""
        info = self._header[name]
        if info["dtype"] not in _DTYPES:
            raise TypeError(f"{self.path}: tensor {name!r} has dtype {info['dtype']}, which prefjax cannot read")
        start, end = info["data_offsets"]
        raw = self._map()[self._offset + start:self._offset + end]
        return raw.view(_DTYPES[info["dtype"]]).reshape(info["shape"])


class SafetensorsDir:
    """All tensors of a checkpoint directory (single file or sharded with an index)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (self.folder / f).exists()]
            if missing:
                raise FileNotFoundError(f"{index} lists shard(s) that do not exist: {missing}")
        else:
            files = sorted(p.name for p in self.folder.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"no *.safetensors files in {self.folder}")
        self._files = {f: SafetensorsFile(self.folder / f) for f in files}
        self._where: dict[str, str] = {}
        for f, st in self._files.items():
            for n in st.names():
                self._where[n] = f

    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def file_of(self, name: str) -> Path:
        return self.folder / self._where[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._files[self._where[name]].shape(name)

    def dtype_str(self, name: str) -> str:
        return self._files[self._where[name]].dtype_str(name)

    def get(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise KeyError(f"tensor {name!r} not found in {self.folder}")
        return self._files[self._where[name]].get(name)
