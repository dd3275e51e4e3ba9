"""The durable checkpoint format: safetensors + JSON, checksummed, written atomically.

A checkpoint is a directory holding three files:

* ``tensors.safetensors`` -- every tensor of the snapshot, flat, under name-prefixed keys;
* ``state.json`` -- everything else; a tensor inside a nested structure is replaced by a
  reference to its key in the tensor file (see :func:`split_tensors`);
* ``manifest.json`` -- the format version and the SHA-256 and size of the two files above.

Writing (:func:`write_checkpoint_dir`) happens in a temporary directory beside the final one:
each file is written and fsynced, the manifest last, the temporary directory is fsynced, then
renamed to its final name with ``os.replace`` and the parent directory fsynced.  A crash at
any point therefore leaves either no checkpoint under the final name or a complete one.

Reading (:func:`read_checkpoint_dir`) verifies the manifest's checksums before parsing and
parses only with ``json`` and ``safetensors``: nothing in a checkpoint is ever unpickled, so a
planted pickle is rejected as malformed without running any of its code.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

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

    ``tensors`` must be contiguous CPU tensors that share no storage; ``state`` must be
    JSON-serialisable.  Returns ``final``.
    """
    final = Path(final)
    if final.exists():
        raise CheckpointError(f"{final}: refusing to overwrite an existing checkpoint")
    try:
        payload = {
            TENSORS_FILE: save_safetensors(tensors, metadata={"format": FORMAT}),
            STATE_FILE: json.dumps(state, allow_nan=True, separators=(",", ":")).encode(),
        }
    except (TypeError, ValueError, RuntimeError, SafetensorError) as exc:
        raise CheckpointError(f"{final}: cannot serialise the snapshot ({exc})") from None
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "files": {
            name: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
            for name, data in payload.items()
        },
    }
    payload[MANIFEST_FILE] = json.dumps(manifest, indent=1).encode()

    temp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    temp.mkdir(parents=True)
    for name, data in payload.items():  # dicts keep insertion order: the manifest goes last
        _write_synced(temp / name, data)
    _fsync_dir(temp)
    os.replace(temp, final)
    _fsync_dir(final.parent)
    return final


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())


def _fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable (POSIX; a no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; nothing more we can do
    finally:
        os.close(fd)


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
    manifest = _parse_json(path / MANIFEST_FILE, _read(path / MANIFEST_FILE))
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
        data = _read(path / name)
        if not isinstance(entry, dict) or len(data) != entry.get("bytes"):
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


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror})") from None


def _parse_json(path: Path, data: bytes) -> Any:
    try:
        # json reads back the NaN/Infinity it writes: a diverged loss is a legitimate metric.
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None

