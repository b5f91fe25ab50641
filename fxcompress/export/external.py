"""ONNX weights on disk instead of in a ModelProto: export and write without holding them twice.

A ModelProto with its weights inside holds every weight once more than the model it came from,
and serializing it (to write a file or open an ONNX Runtime session) makes one more copy. Here
the exporter's weights go straight from the torch tensors to one data file beside the model
(ONNX external data: each initializer names the file, an offset and a length), the ModelProto
keeps only the graph, ONNX Runtime memory-maps that file, and the final file is written from the
data file one tensor at a time:

* under the 2 GB protobuf limit, one self-contained ``.onnx`` file, its bytes streamed in
  protobuf's wire format (a message is the concatenation of its fields, and an initializer may
  come after the graph's other fields), never serialized whole;
* over it, ``model.onnx`` plus ``model.onnx.data`` in the same folder (what ``onnx.load`` and
  ONNX Runtime read), the data file compacted to the tensors the graph still reads.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx
from onnx import external_data_helper, helper

from fxcompress.export.atomic import write_atomically

#: Initializers at least this large go to the data file (shape constants stay in the graph).
EXTERNAL_BYTES = 1024
#: Protobuf cannot parse a single message over 2 GiB: larger models are written as two files.
PROTOBUF_LIMIT = 2 * 1024**3

_GRAPH_FIELD = 7        # ModelProto.graph
_INITIALIZER_FIELD = 5  # GraphProto.initializer
_RAW_DATA_FIELD = 9     # TensorProto.raw_data
_CHUNK = 16 * 1024**2   # bytes copied at a time from the data file


def is_external(tensor: onnx.TensorProto) -> bool:
    """Whether ``tensor``'s bytes live in an external data file."""
    return tensor.data_location == onnx.TensorProto.EXTERNAL


def _external_info(tensor: onnx.TensorProto) -> tuple[str, int, int]:
    info = {e.key: e.value for e in tensor.external_data}
    return info["location"], int(info.get("offset", 0)), int(info["length"])


def read_bytes(tensor: onnx.TensorProto, base_dir: str | os.PathLike) -> bytes:
    """The raw bytes of an external ``tensor`` (its location is relative to ``base_dir``)."""
    location, offset, length = _external_info(tensor)
    with open(Path(base_dir) / location, "rb") as f:
        f.seek(offset)
        data = f.read(length)
    if len(data) != length:
        raise ValueError(f"external data of '{tensor.name}' is truncated ({len(data)} of {length} bytes)")
    return data


def to_array(tensor: onnx.TensorProto, base_dir: str | os.PathLike | None = None) -> np.ndarray:
    """``tensor`` as a numpy array, read from its data file when external; the tensor itself is
    left as it is (``onnx.numpy_helper.to_array`` would load the bytes into it for good)."""
    if not is_external(tensor):
        return onnx.numpy_helper.to_array(tensor)
    if base_dir is None:
        raise ValueError(f"'{tensor.name}' has external data and no folder to read it from")
    dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
    return np.frombuffer(read_bytes(tensor, base_dir), dtype=dtype).reshape(tuple(tensor.dims))


def _initializers(graph: onnx.GraphProto):
    """Initializers of ``graph`` and of the subgraphs in its nodes' attributes."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _initializers(sub)


def externalize(model: onnx.ModelProto, data_file: Path) -> None:
    """Move every inline initializer of at least :data:`EXTERNAL_BYTES` to the end of
    ``data_file`` (its location: the file's name, relative to the model's folder), in place."""
    with open(data_file, "ab") as f:
        for tensor in _initializers(model.graph):
            if is_external(tensor) or not tensor.HasField("raw_data") or len(tensor.raw_data) < EXTERNAL_BYTES:
                continue
            offset = f.tell()
            f.write(tensor.raw_data)
            external_data_helper.set_external_data(tensor, data_file.name, offset, len(tensor.raw_data))
            tensor.ClearField("raw_data")


def load_inline(model: onnx.ModelProto, base_dir: str | os.PathLike) -> None:
    """Bring every external initializer's bytes back into ``model`` (for tools that need them
    inside: onnxsim, sparse storage), in place."""
    for tensor in _initializers(model.graph):
        if is_external(tensor):
            tensor.raw_data = read_bytes(tensor, base_dir)
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.DEFAULT


def external_bytes(model: onnx.ModelProto) -> int:
    """Bytes the model's external initializers take."""
    return sum(_external_info(t)[2] for t in _initializers(model.graph) if is_external(t))


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, length: int) -> bytes:
    """Tag and length of a length-delimited field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(length)


def _inline_tensor(tensor: onnx.TensorProto) -> tuple[onnx.TensorProto, int]:
    """``tensor`` without its external-data fields, and the serialized size it has once its
    ``raw_data`` (external length) is put back."""
    bare = onnx.TensorProto()
    bare.CopyFrom(tensor)
    del bare.external_data[:]
    bare.ClearField("data_location")
    length = _external_info(tensor)[2]
    return bare, bare.ByteSize() + len(_field(_RAW_DATA_FIELD, length)) + length


def write_inline(model: onnx.ModelProto, base_dir: str | os.PathLike, out: BinaryIO) -> None:
    """Write ``model`` as one self-contained ONNX file to ``out``, reading its external
    initializers from ``base_dir`` one at a time (subgraph initializers must be inline)."""
    graph = model.graph
    external = [t for t in graph.initializer if is_external(t)]
    head = onnx.ModelProto()
    head.CopyFrom(model)
    head.ClearField("graph")
    rest = onnx.GraphProto()
    rest.CopyFrom(graph)
    del rest.initializer[:]
    rest.initializer.extend(t for t in graph.initializer if not is_external(t))
    rest_bytes = rest.SerializeToString()
    sizes = [_inline_tensor(t)[1] for t in external]
    graph_length = len(rest_bytes) + sum(len(_field(_INITIALIZER_FIELD, n)) + n for n in sizes)
    out.write(head.SerializeToString())
    out.write(_field(_GRAPH_FIELD, graph_length))
    out.write(rest_bytes)
    for tensor, size in zip(external, sizes):
        bare, _ = _inline_tensor(tensor)
        length = _external_info(tensor)[2]
        out.write(_field(_INITIALIZER_FIELD, size))
        out.write(bare.SerializeToString())
        # raw_data last (a field may come after those numbered above it), copied in chunks
        out.write(_field(_RAW_DATA_FIELD, length))
        _copy_bytes(tensor, base_dir, out)


def _copy_bytes(tensor: onnx.TensorProto, base_dir: str | os.PathLike, out: BinaryIO) -> int:
    """Copy an external ``tensor``'s bytes to ``out`` a chunk at a time; the byte count."""
    location, offset, length = _external_info(tensor)
    with open(Path(base_dir) / location, "rb") as f:
        f.seek(offset)
        left = length
        while left:
            chunk = f.read(min(left, _CHUNK))
            if not chunk:
                raise ValueError(f"external data of '{tensor.name}' is truncated")
            out.write(chunk)
            left -= len(chunk)
    return length


def _copy_external(model: onnx.ModelProto, base_dir: Path, target: Path, location: str) -> None:
    """Copy the external tensors ``model`` reads into ``target`` (densely, in order) and point
    them there under ``location``, in place."""
    with open(target, "wb") as out:
        for tensor in _initializers(model.graph):
            if is_external(tensor):
                offset = out.tell()
                length = _copy_bytes(tensor, base_dir, out)
                del tensor.external_data[:]
                for key, value in (("location", location), ("offset", offset), ("length", length)):
                    entry = tensor.external_data.add()
                    entry.key, entry.value = key, str(value)


def save_external_model(model: onnx.ModelProto, base_dir: Path, path: Path) -> Path:
    """Write ``model`` (whose external initializers are in ``base_dir``) to ``path`` atomically:
    one file under the protobuf limit, else ``path`` plus ``path.name + '.data'`` beside it."""
    if model.ByteSize() + external_bytes(model) < PROTOBUF_LIMIT - 16 * 1024**2:
        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                write_inline(model, base_dir, f)
        return write_atomically(path, write)
    data_path = path.with_name(path.name + ".data")
    write_atomically(data_path, lambda tmp: _copy_external(model, base_dir, tmp, data_path.name))
    try:
        return write_atomically(path, lambda tmp: onnx.save_model(model, str(tmp)))
    except BaseException:
        data_path.unlink(missing_ok=True)  # no data file without the model that reads it
        raise


__all__ = ["EXTERNAL_BYTES", "PROTOBUF_LIMIT", "externalize", "external_bytes", "is_external", "load_inline",
           "read_bytes", "save_external_model", "to_array", "write_inline"]
