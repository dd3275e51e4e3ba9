"""The durable checkpoint format: safetensors + JSON, checksummed, written atomically.

A checkpoint is a directory holding three files:

* ``tensors.safetensors`` -- every tensor of the snapshot, flat, under name-prefixed keys;
* ``state.json`` -- everything else; a tensor inside a nested structure is replaced by a
  reference to its key in the tensor file (see :func:`split_tensors`);
* ``manifest.json`` -- the format version and the SHA-256 and size of the two files above.

Writing (:func:`write_checkpoint_dir`) happens in a temporary directory beside the final one:
each file is written and fsynced, the manifest last, the temporary directory is fsynced, then
renamed to its final name with ``os.replace`` and the parent directory fsynced.  A crash at
any point therefore leaves either no checkpoint under the final name or a complete one.  The
tensor file is streamed straight from the tensors' memory in the standard safetensors layout
and hashed on the way, so a save never holds a serialised copy of the snapshot.

Reading (:func:`read_checkpoint_dir`) verifies the manifest's checksums before parsing and
parses only with ``json`` and ``safetensors``: nothing in a checkpoint is ever unpickled, so a
planted pickle is rejected as malformed without running any of its code.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from tolaria.atomic import fsync_dir, read_whole
from tolaria.errors import CheckpointError

FORMAT = "tolaria.checkpoint"
VERSION = 1
TENSORS_FILE = "tensors.safetensors"
STATE_FILE = "state.json"
MANIFEST_FILE = "manifest.json"

#: The key that marks a JSON object as an encoded non-JSON value (tensor, tuple, ...).
_TAG = "__tolaria__"


# ---------------------------------------------------------------------------------------
# The tree codec: nested Python state <-> (plain JSON, flat dict of tensors)
# ---------------------------------------------------------------------------------------


def split_tensors(tree: Any, prefix: str) -> tuple[Any, dict[str, torch.Tensor]]:
    """Encode a nested state (dicts, lists, tuples, scalars, tensors, NumPy arrays) as JSON.

    Returns ``(document, tensors)``: ``document`` is JSON-serialisable and decodes back to
    ``tree`` with :func:`join_tensors`; ``tensors`` maps ``prefix/<path>`` keys to the tensors
    it references.  Tuples, NumPy arrays and dicts with non-string keys are tagged so they
    come back as the same types (``torch.optim`` and ``random.getstate`` need tuples).
    Anything else raises :class:`CheckpointError` naming where it was found.
    """
    tensors: dict[str, torch.Tensor] = {}

    def tensor_ref(value: torch.Tensor, path: str, kind: str) -> dict[str, Any]:
        key = path
        suffix = 1
        while key in tensors:  # two paths may render alike ("a/b" vs a -> b)
            key = f"{path}#{suffix}"
            suffix += 1
        tensors[key] = value
        return {_TAG: kind, "key": key}

    def encode(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            return tensor_ref(value, path, "tensor")
        if isinstance(value, np.ndarray):
            try:
                return tensor_ref(torch.from_numpy(value), path, "ndarray")
            except TypeError as exc:
                raise CheckpointError(f"cannot store {path}: {exc}") from None
        if isinstance(value, np.generic):
            return value.item()
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, tuple):
            return {_TAG: "tuple", "items": [encode(v, f"{path}/{i}") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [encode(v, f"{path}/{i}") for i, v in enumerate(value)]
        if isinstance(value, dict):
            if all(isinstance(k, str) for k in value) and _TAG not in value:
                return {k: encode(v, f"{path}/{k}") for k, v in value.items()}
            return {
                _TAG: "dict",
                "items": [[encode(k, f"{path}/<key>"), encode(v, f"{path}/{k}")]
                          for k, v in value.items()],
            }
        raise CheckpointError(
            f"cannot store {path}: values of type {type(value).__name__} are not supported "
            "(use tensors, NumPy arrays, numbers, strings, lists, tuples and dicts)"
        )

    return encode(tree, prefix), tensors


def join_tensors(document: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Invert :func:`split_tensors`; a reference to a missing tensor raises CheckpointError."""

    def decode(value: Any) -> Any:
        if isinstance(value, list):
            return [decode(v) for v in value]
        if not isinstance(value, dict):
            return value
        kind = value.get(_TAG)
        if kind is None:
            return {k: decode(v) for k, v in value.items()}
        if kind in ("tensor", "ndarray"):
            key = value.get("key")
            if key not in tensors:
                raise CheckpointError(f"state refers to tensor {key!r}, which is not stored")
            return tensors[key] if kind == "tensor" else tensors[key].numpy()
        if kind == "tuple":
            return tuple(decode(v) for v in value["items"])
        if kind == "dict":
            return {decode(k): decode(v) for k, v in value["items"]}
        raise CheckpointError(f"unknown encoded value {kind!r} in state")

    return decode(document)


# ---------------------------------------------------------------------------------------
# Atomic write
# ---------------------------------------------------------------------------------------


def write_checkpoint_dir(
    final: Path, tensors: dict[str, torch.Tensor], state: dict[str, Any]
) -> Path:
    """Write a checkpoint directory at ``final`` (which must not exist) crash-safely.

    ``tensors`` must be CPU tensors; ``state`` must be JSON-serialisable.  Returns ``final``.
    """
    final = Path(final)
    if final.exists():
        raise CheckpointError(f"{final}: refusing to overwrite an existing checkpoint")
    try:
        state_bytes = json.dumps(state, allow_nan=True, separators=(",", ":")).encode()
        header, chunks = _safetensors_layout(tensors)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{final}: cannot serialise the snapshot ({exc})") from None

    temp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    try:
        temp.mkdir(parents=True)
        files = {
            TENSORS_FILE: _write_synced(temp / TENSORS_FILE, [header, *chunks]),
            STATE_FILE: _write_synced(temp / STATE_FILE, [state_bytes]),
        }
        manifest = {"format": FORMAT, "version": VERSION, "files": files}
        _write_synced(temp / MANIFEST_FILE, [json.dumps(manifest, indent=1).encode()])  # last
        fsync_dir(temp)
        os.replace(temp, final)
    except OSError as exc:  # a full disk, a read-only or vanished directory
        shutil.rmtree(temp, ignore_errors=True)
        raise CheckpointError(f"{final}: cannot write the checkpoint ({exc})") from None
    fsync_dir(final.parent)
    return final


#: torch dtype -> safetensors dtype name (the format's spelling).
_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint64: "U64", torch.uint32: "U32", torch.uint16: "U16", torch.uint8: "U8",
    torch.bool: "BOOL",
}


def _safetensors_layout(tensors: dict[str, torch.Tensor]) -> tuple[bytes, list[memoryview]]:
    """The safetensors header and each tensor's raw bytes, without copying any tensor.

    Format: an 8-byte little-endian header length, a JSON header mapping each name to its
    dtype, shape and ``[begin, end)`` byte range in the data section (padded with spaces
    to a multiple of 8), then the tensors' bytes back to back.  ``safetensors.torch.save``
    would first copy every tensor into one buffer; writing views saves that copy (a third
    of a 10M-parameter save) and the memory it needs.
    """
    header: dict[str, Any] = {"__metadata__": {"format": FORMAT}}
    chunks = []
    offset = 0
    for name, tensor in tensors.items():
        if tensor.dtype not in _SAFETENSORS_DTYPES:
            raise TypeError(f"tensor {name!r} has dtype {tensor.dtype}, which safetensors lacks")
        flat = tensor.detach().contiguous().reshape(-1)
        size = flat.numel() * flat.element_size()
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        if size:
            # Raw bytes as a NumPy view (any dtype, bfloat16 included, seen as uint8).
            chunks.append(memoryview(flat.view(torch.uint8).numpy()))
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # keeps every tensor's data 8-byte aligned
    return len(encoded).to_bytes(8, "little") + encoded, chunks


def _write_synced(path: Path, chunks: list[bytes | memoryview]) -> dict[str, Any]:
    """Write ``chunks`` to ``path`` and fsync it; returns its manifest entry."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "wb") as file:
        for chunk in chunks:
            digest.update(chunk)
            file.write(chunk)
            size += len(chunk)  # a memoryview of uint8: len is the byte count
        file.flush()
        os.fsync(file.fileno())
    return {"sha256": digest.hexdigest(), "bytes": size}


# ---------------------------------------------------------------------------------------
# Verified read
# ---------------------------------------------------------------------------------------


def read_checkpoint_dir(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Verify and parse a checkpoint directory; returns ``(tensors, state)``.

    Every problem -- a missing file, a size or SHA-256 mismatch, a file that is not the
    JSON or safetensors it should be -- raises :class:`CheckpointError` with one line that
    names the file and the cause.
    """
    path = Path(path)
    manifest_file = path / MANIFEST_FILE
    manifest = _parse_json(manifest_file, read_whole(manifest_file, CheckpointError))
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path / MANIFEST_FILE}: not a Tolaria checkpoint manifest")
    if manifest.get("version") != VERSION:
        raise CheckpointError(
            f"{path / MANIFEST_FILE}: format version {manifest.get('version')!r} "
            f"is not supported (expected {VERSION})"
        )
    expected = manifest.get("files")
    if not isinstance(expected, dict) or set(expected) != {TENSORS_FILE, STATE_FILE}:
        raise CheckpointError(f"{path / MANIFEST_FILE}: malformed file list")

    contents = {}
    for name, entry in expected.items():
        if not isinstance(entry, dict):
            raise CheckpointError(f"{path / MANIFEST_FILE}: malformed entry for {name}")
        data = read_whole(path / name, CheckpointError)
        if len(data) != entry.get("bytes"):
            raise CheckpointError(
                f"{path / name}: size {len(data)} bytes, manifest says {entry.get('bytes')} "
                "(truncated or replaced)"
            )
        if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
            raise CheckpointError(f"{path / name}: SHA-256 does not match the manifest (corrupted)")
        contents[name] = data

    state = _parse_json(path / STATE_FILE, contents[STATE_FILE])
    if not isinstance(state, dict):
        raise CheckpointError(f"{path / STATE_FILE}: expected a JSON object")
    try:
        tensors = load_safetensors(contents[TENSORS_FILE])
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"{path / TENSORS_FILE}: not a valid safetensors file ({exc})"
        ) from None
    return tensors, state


def _parse_json(path: Path, data: bytes) -> Any:
    try:
        # json reads back the NaN/Infinity it writes: a diverged loss is a legitimate metric.
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None

