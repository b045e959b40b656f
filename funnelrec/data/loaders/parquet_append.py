"""Appending rows to a Parquet file without decoding the rows it already holds.

A Parquet file is its row groups' bytes followed by a footer (Thrift compact protocol)
that lists each row group with the absolute file offsets of its pages. `append_file`
writes a new file made of the old file's row-group bytes (copied by the kernel, which
shares them instead where the file system can), the new rows' row-group bytes, and one
footer listing both: the new row groups' offsets are shifted by where their bytes now
start. The cost is a byte copy of the old file plus encoding the new rows only.

Only the footer is parsed here, generically (every field is kept as read); the offsets
shifted are the row group's `file_offset`, and in each column chunk its `file_offset`,
page-index offsets and the metadata's data, index, dictionary page and bloom filter
offsets. Encrypted files are refused (the dataset never writes them).
"""

from __future__ import annotations

import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from funnelrec.errors import DataError

MAGIC = b"PAR1"

# Thrift compact protocol type codes.
_STOP, _TRUE, _FALSE, _BYTE, _I16, _I32, _I64, _DOUBLE, _BINARY = 0, 1, 2, 3, 4, 5, 6, 7, 8
_LIST, _SET, _MAP, _STRUCT = 9, 10, 11, 12

# Field ids (parquet.thrift) of the offsets to shift.
_FILE_ROW_GROUPS, _FILE_NUM_ROWS, _FILE_ENCRYPTION = 4, 3, 8
_GROUP_COLUMNS, _GROUP_FILE_OFFSET, _GROUP_ORDINAL = 1, 5, 7
_CHUNK_OFFSETS = (2, 4, 6)  # file_offset, offset_index_offset, column_index_offset
_CHUNK_META = 3
_META_OFFSETS = (9, 10, 11, 14)  # data, index, dictionary page; bloom filter


@dataclass
class _Field:
    id: int
    type: int
    value: Any


@dataclass
class _List:
    type: int  # element type
    items: list[Any]


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def byte(self) -> int:
        b = self.data[self.pos]
        self.pos += 1
        return b

    def varint(self) -> int:
        shift = result = 0
        while True:
            b = self.byte()
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                return result
            shift += 7

    def zigzag(self) -> int:
        n = self.varint()
        return (n >> 1) ^ -(n & 1)

    def value(self, kind: int) -> Any:
        if kind in (_TRUE, _FALSE):  # a bool in a list: one byte
            return self.byte() == _TRUE
        if kind == _BYTE:
            return struct.unpack("b", bytes([self.byte()]))[0]
        if kind in (_I16, _I32, _I64):
            return self.zigzag()
        if kind == _DOUBLE:
            v = struct.unpack("<d", self.data[self.pos : self.pos + 8])[0]
            self.pos += 8
            return v
        if kind == _BINARY:
            n = self.varint()
            v = self.data[self.pos : self.pos + n]
            self.pos += n
            return v
        if kind in (_LIST, _SET):
            header = self.byte()
            size, elem = header >> 4, header & 0x0F
            if size == 15:
                size = self.varint()
            return _List(elem, [self.value(elem) for _ in range(size)])
        if kind == _STRUCT:
            return self.struct()
        raise ValueError(f"unsupported Thrift type {kind}")  # maps: not in a Parquet footer

    def struct(self) -> list[_Field]:
        fields: list[_Field] = []
        last = 0
        while True:
            header = self.byte()
            kind = header & 0x0F
            if kind == _STOP:
                return fields
            delta = header >> 4
            fid = last + delta if delta else self.zigzag()
            last = fid
            value = kind == _TRUE if kind in (_TRUE, _FALSE) else self.value(kind)
            fields.append(_Field(fid, kind, value))


class _Writer:
    def __init__(self) -> None:
        self.out = bytearray()

    def varint(self, n: int) -> None:
        while n > 0x7F:
            self.out.append((n & 0x7F) | 0x80)
            n >>= 7
        self.out.append(n)

    def zigzag(self, n: int) -> None:
        self.varint((n << 1) ^ (n >> 63))

    def value(self, kind: int, v: Any) -> None:
        if kind in (_TRUE, _FALSE):
            self.out.append(_TRUE if v else _FALSE)
        elif kind == _BYTE:
            self.out += struct.pack("b", v)
        elif kind in (_I16, _I32, _I64):
            self.zigzag(v)
        elif kind == _DOUBLE:
            self.out += struct.pack("<d", v)
        elif kind == _BINARY:
            self.varint(len(v))
            self.out += v
        elif kind in (_LIST, _SET):
            n = len(v.items)
            if n < 15:
                self.out.append((n << 4) | v.type)
            else:
                self.out.append(0xF0 | v.type)
                self.varint(n)
            for item in v.items:
                self.value(v.type, item)
        elif kind == _STRUCT:
            self.struct(v)
        else:
            raise ValueError(f"unsupported Thrift type {kind}")

    def struct(self, fields: list[_Field]) -> None:
        last = 0
        for f in fields:
            kind = (_TRUE if f.value else _FALSE) if f.type in (_TRUE, _FALSE) else f.type
            delta = f.id - last
            if 0 < delta <= 15:
                self.out.append((delta << 4) | kind)
            else:
                self.out.append(kind)
                self.zigzag(f.id)
            if kind not in (_TRUE, _FALSE):
                self.value(kind, f.value)
            last = f.id
        self.out.append(_STOP)


def _get(fields: list[_Field], fid: int) -> _Field | None:
    return next((f for f in fields if f.id == fid), None)


def _shift(fields: list[_Field], ids: tuple[int, ...], by: int) -> None:
    for f in fields:
        # An offset of 0 is no position in a file (its magic is there): unset, keep it.
        if f.id in ids and isinstance(f.value, int) and f.value > 0:
            f.value += by


def _shift_group(group: list[_Field], by: int, ordinal: int) -> None:
    _shift(group, (_GROUP_FILE_OFFSET,), by)
    ordinal_field = _get(group, _GROUP_ORDINAL)
    if ordinal_field is not None:
        ordinal_field.value = ordinal
    columns = _get(group, _GROUP_COLUMNS)
    for chunk in columns.value.items if columns is not None else []:
        _shift(chunk, _CHUNK_OFFSETS, by)
        meta = _get(chunk, _CHUNK_META)
        if meta is not None:
            _shift(meta.value, _META_OFFSETS, by)


def _footer(path: Path) -> tuple[list[_Field], int]:
    """The footer of a Parquet file, parsed, and where its row-group bytes end."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(4)
        f.seek(size - 8)
        tail = f.read(8)
        length = int.from_bytes(tail[:4], "little")
        if head != MAGIC or tail[4:] != MAGIC or length + 12 > size:
            raise DataError("not a plain Parquet file (encrypted or damaged)", path=path)
        f.seek(size - 8 - length)
        raw = f.read(length)
    meta = _Reader(raw).struct()
    if _get(meta, _FILE_ENCRYPTION) is not None:
        raise DataError("an encrypted Parquet file cannot be appended to", path=path)
    return meta, size - 8 - length


def _copy_range(src: Path, dst_file: Any, start: int, length: int) -> None:
    with src.open("rb") as f:
        f.seek(start)
        remaining = length
        dst_file.flush()
        try:
            while remaining:
                n = os.copy_file_range(f.fileno(), dst_file.fileno(), remaining)
                if n == 0:
                    break
                remaining -= n
        except (AttributeError, OSError):
            pass
        if remaining:
            # Where the kernel cannot copy between these files: an ordinary copy.
            f.seek(start + length - remaining)
            dst_file.seek(0, os.SEEK_END)
            shutil.copyfileobj(_Limited(f, remaining), dst_file)
        dst_file.seek(0, os.SEEK_END)


class _Limited:
    def __init__(self, f: Any, n: int) -> None:
        self.f, self.n = f, n

    def read(self, size: int = -1) -> bytes:
        size = self.n if size < 0 else min(size, self.n)
        data: bytes = self.f.read(size)
        self.n -= len(data)
        return data


def append_file(old: Path, new: Path, out: Path) -> None:
    """Write `out`: the rows of `old` then those of `new`, two Parquet files of the same
    schema; `old`'s row groups are copied as bytes, never decoded.

    Raises `DataError` if the schemas differ.
    """
    old, new, out = Path(old), Path(new), Path(out)
    old_schema = pq.read_schema(old)
    new_schema = pq.read_schema(new)
    if not old_schema.equals(new_schema, check_metadata=False):
        raise DataError(
            f"cannot append rows of schema {new_schema} to one of schema {old_schema}", path=old
        )
    if pq.read_metadata(old).schema != pq.read_metadata(new).schema:
        raise DataError("the Parquet schemas of the two files differ", path=old)
    old_meta, old_end = _footer(old)
    new_meta, new_end = _footer(new)
    shift = old_end - len(MAGIC)  # new row-group bytes move from offset 4 to `old_end`

    groups = _get(old_meta, _FILE_ROW_GROUPS)
    added = _get(new_meta, _FILE_ROW_GROUPS)
    rows = _get(old_meta, _FILE_NUM_ROWS)
    new_rows = _get(new_meta, _FILE_NUM_ROWS)
    if groups is None or added is None or rows is None or new_rows is None:
        raise DataError("Parquet footer without row groups", path=old)
    for i, group in enumerate(added.value.items):
        _shift_group(group, shift, len(groups.value.items) + i)
    groups.value.items.extend(added.value.items)
    rows.value += new_rows.value
    writer = _Writer()
    writer.struct(old_meta)
    footer = bytes(writer.out)

    with out.open("wb") as f:
        _copy_range(old, f, 0, old_end)
        _copy_range(new, f, len(MAGIC), new_end - len(MAGIC))
        f.write(footer)
        f.write(len(footer).to_bytes(4, "little"))
        f.write(MAGIC)
    _verify(out, old, new)


def _verify(out: Path, old: Path, new: Path) -> None:
    """Read the written file back with Parquet's own reader: its row and row-group counts
    are the two files' sums, and its last row group holds the new file's last rows (the
    footer written here is what every later reader trusts)."""
    try:
        got, a, b = pq.ParquetFile(out), pq.ParquetFile(old), pq.ParquetFile(new)
        ok = (
            got.metadata.num_rows == a.metadata.num_rows + b.metadata.num_rows
            and got.metadata.num_row_groups == a.metadata.num_row_groups + b.metadata.num_row_groups
            and got.read_row_group(got.num_row_groups - 1).equals(
                b.read_row_group(b.num_row_groups - 1)
            )
        )
    except Exception as e:  # any failure to read it back means the footer is wrong
        raise DataError(f"the appended file does not read back ({e})", path=out) from None
    if not ok:
        raise DataError("the appended file does not read back as the two files' rows", path=out)
