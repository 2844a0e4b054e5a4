"""Tensor types: an element dtype and a shape whose dims may be symbolic.

A dim is an ``int`` (static), a ``str`` (a named symbolic dim, e.g. ``"batch"``)
or ``None`` (unknown). A shape of ``None`` means the rank itself is unknown.
Text form: ``f32[8,64]``, ``f32[batch,64]``, ``f32[?,64]``, ``f32[*]`` (unknown
rank), ``f32[]`` (a scalar).
"""
from __future__ import annotations

import enum
import json
import re
import math
from dataclasses import dataclass
from typing import Union

import numpy as np
import onnx
from onnx import helper as onnx_helper

from .errors import HetflowError

Dim = Union[int, str, None]
_SIZE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")

# The largest tensor hetflow accepts (2**40 elements: at most 2**44 bytes, far from a 64-bit overflow of a
# byte count or an arena offset). Types are checked when they are made, whoever makes them.
MAX_ELEMENTS = 2 ** 40


class ShapeError(HetflowError, ValueError):
    """A shape no tensor can have: a negative dim, or more than ``MAX_ELEMENTS`` elements. The message names
    the dim and the shape; whoever knows the value (a frontend, a parser) adds its name."""


class DType(enum.Enum):
    """Element types, keyed by their ONNX TensorProto number; the value is the short text name."""

    f32 = "f32"
    f64 = "f64"
    f16 = "f16"
    bf16 = "bf16"
    i8 = "i8"
    i16 = "i16"
    i32 = "i32"
    i64 = "i64"
    u8 = "u8"
    u16 = "u16"
    u32 = "u32"
    u64 = "u64"
    bool = "bool"
    str = "str"
    c64 = "c64"
    c128 = "c128"
    f8e4m3fn = "f8e4m3fn"
    f8e4m3fnuz = "f8e4m3fnuz"
    f8e5m2 = "f8e5m2"
    f8e5m2fnuz = "f8e5m2fnuz"
    u4 = "u4"
    i4 = "i4"
    f4e2m1 = "f4e2m1"

    @property
    def onnx(self) -> int:
        return _TO_ONNX[self]

    @property
    def numpy(self) -> np.dtype:
        return np.dtype(onnx_helper.tensor_dtype_to_np_dtype(self.onnx))

    @property
    def itemsize(self) -> float:
        """Bytes per element (fractional for 4-bit types, 8 for strings as a pointer)."""
        if self in (DType.u4, DType.i4, DType.f4e2m1):
            return 0.5
        if self is DType.str:
            return 8
        return self.numpy.itemsize

    @property
    def is_float(self) -> bool:
        return self in _FLOATS

    @staticmethod
    def from_onnx(elem_type: int) -> "DType":
        try:
            return _FROM_ONNX[elem_type]
        except KeyError:
            name = onnx.TensorProto.DataType.Name(elem_type) if elem_type in onnx.TensorProto.DataType.values() else str(elem_type)
            raise ValueError(f"unsupported ONNX element type {name}") from None

    @staticmethod
    def from_numpy(dtype) -> "DType":
        dtype = np.dtype(dtype)
        if dtype.kind in ("U", "S", "O"):
            return DType.str
        try:
            return _FROM_ONNX[onnx_helper.np_dtype_to_tensor_dtype(dtype)]
        except (KeyError, ValueError, TypeError):
            raise ValueError(f"unsupported numpy dtype {dtype}") from None


_TO_ONNX = {
    DType.f32: onnx.TensorProto.FLOAT, DType.f64: onnx.TensorProto.DOUBLE,
    DType.f16: onnx.TensorProto.FLOAT16, DType.bf16: onnx.TensorProto.BFLOAT16,
    DType.i8: onnx.TensorProto.INT8, DType.i16: onnx.TensorProto.INT16,
    DType.i32: onnx.TensorProto.INT32, DType.i64: onnx.TensorProto.INT64,
    DType.u8: onnx.TensorProto.UINT8, DType.u16: onnx.TensorProto.UINT16,
    DType.u32: onnx.TensorProto.UINT32, DType.u64: onnx.TensorProto.UINT64,
    DType.bool: onnx.TensorProto.BOOL, DType.str: onnx.TensorProto.STRING,
    DType.c64: onnx.TensorProto.COMPLEX64, DType.c128: onnx.TensorProto.COMPLEX128,
    DType.f8e4m3fn: onnx.TensorProto.FLOAT8E4M3FN, DType.f8e4m3fnuz: onnx.TensorProto.FLOAT8E4M3FNUZ,
    DType.f8e5m2: onnx.TensorProto.FLOAT8E5M2, DType.f8e5m2fnuz: onnx.TensorProto.FLOAT8E5M2FNUZ,
    DType.u4: onnx.TensorProto.UINT4, DType.i4: onnx.TensorProto.INT4,
    DType.f4e2m1: onnx.TensorProto.FLOAT4E2M1,
}
_FROM_ONNX = {v: k for k, v in _TO_ONNX.items()}
_FLOATS = {DType.f32, DType.f64, DType.f16, DType.bf16, DType.f8e4m3fn, DType.f8e4m3fnuz,
           DType.f8e5m2, DType.f8e5m2fnuz, DType.f4e2m1}


@dataclass(frozen=True)
class TensorType:
    """The type of a tensor value: dtype plus a (possibly symbolic or unknown) shape."""

    dtype: DType
    shape: tuple[Dim, ...] | None

    def __post_init__(self):
        if self.shape is not None:
            object.__setattr__(self, "shape", tuple(self.shape))
            _check_dims(self.shape)

    @property
    def rank(self) -> int | None:
        return None if self.shape is None else len(self.shape)

    @property
    def is_static(self) -> bool:
        return self.shape is not None and all(isinstance(d, int) for d in self.shape)

    def numel(self) -> int | None:
        """The element count (a Python int: no 64-bit overflow; at most ``MAX_ELEMENTS`` by construction)."""
        if not self.is_static:
            return None
        return math.prod(self.shape)

    def nbytes(self) -> int | None:
        n = self.numel()
        return None if n is None else _bytes_of(n, self.dtype)

    def __str__(self) -> str:
        if self.shape is None:
            return f"{self.dtype.value}[*]"
        return f"{self.dtype.value}[{','.join(_dim_text(d) for d in self.shape)}]"

    @staticmethod
    def of(array: np.ndarray) -> "TensorType":
        return TensorType(DType.from_numpy(array.dtype), tuple(int(d) for d in np.shape(array)))


def _bytes_of(elements: int, dtype: DType) -> int:
    """Bytes for ``elements`` of ``dtype``, in integers (4-bit types round up to whole bytes)."""
    if dtype.itemsize == 0.5:
        return (elements + 1) // 2
    return elements * int(dtype.itemsize)


def _check_dims(shape: tuple) -> None:
    """Refuse a negative dim, and static dims whose product passes ``MAX_ELEMENTS`` (zero dims left out of
    the product: ``[0, 2**50]`` is as absurd as ``[1, 2**50]``, and its strides overflow alike)."""
    product = 1
    for index, d in enumerate(shape):
        if not isinstance(d, int):
            continue
        if d < 0:
            raise ShapeError(f"dim {index} of shape {_shape_text(shape)} is negative ({d})")
        product *= max(d, 1)
        if product > MAX_ELEMENTS:
            raise ShapeError(f"dim {index} ({d}) of shape {_shape_text(shape)} makes more than 2**40 elements, "
                             "the most hetflow accepts")


def _shape_text(shape: tuple) -> str:
    return "[" + ",".join(_dim_text(d) if isinstance(d, (int, str, type(None))) else repr(d) for d in shape) + "]"


def _dim_text(d: Dim) -> str:
    if d is None:
        return "?"
    if isinstance(d, str) and not _SIZE_NAME.match(d):
        return json.dumps(d)  # an expression over sizes ("batch*seq") is quoted in text
    return str(d)


def shape_matches(expected: tuple[Dim, ...] | None, actual: tuple[int, ...]) -> bool:
    """True when a concrete shape fits a declared one (symbolic and unknown dims match anything)."""
    if expected is None:
        return True
    if len(expected) != len(actual):
        return False
    return all(not isinstance(e, int) or e == a for e, a in zip(expected, actual))
