"""Confine a process's writes to chosen directories with Linux Landlock (kernel 5.13+).

The training sandbox calls :func:`confine_writes` in its child process before it imports the
job: from then on every way of changing the filesystem -- writing, truncating, creating,
removing, renaming or linking a file -- is refused by the kernel (``PermissionError``)
outside the allowed directories, for the process and everything it starts.  Reading stays
open everywhere, so the job can import Python and read its inputs.  Landlock needs no
privileges and cannot be undone by the confined process.

Where the kernel has no Landlock (older than 5.13, or a container's seccomp filter blocks
its system calls) nothing is confined and :func:`confine_writes` says why: the sandbox then
falls back to catching writes after the fact (``sandbox.py``).
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterable
from pathlib import Path

# The system calls have these numbers on every Linux architecture (the unified table).
_CREATE_RULESET, _ADD_RULE, _RESTRICT_SELF = 444, 445, 446
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH = 1
_PR_SET_NO_NEW_PRIVS = 38

# Landlock's filesystem rights that change something (``linux/landlock.h``), by the ABI
# version that introduced them; execute, read-file and read-dir are deliberately absent.
_WRITE_FILE = 1 << 1
_WRITES_V1 = (
    _WRITE_FILE
    | 1 << 4  # remove dir
    | 1 << 5  # remove file
    | 1 << 6  # make char
    | 1 << 7  # make dir
    | 1 << 8  # make reg
    | 1 << 9  # make sock
    | 1 << 10  # make fifo
    | 1 << 11  # make block
    | 1 << 12  # make sym
)
_REFER = 1 << 13  # ABI 2: rename or link across directories
_TRUNCATE = 1 << 14  # ABI 3


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def landlock_abi() -> int:
    """The kernel's Landlock ABI version; 0 where there is none (or it is blocked)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        version = libc.syscall(_CREATE_RULESET, None, ctypes.c_size_t(0),
                               ctypes.c_uint32(_CREATE_RULESET_VERSION))
    except (OSError, AttributeError):
        return 0
    return max(version, 0)


def confine_writes(allowed: Iterable[Path], *, devices: Path | None = Path("/dev")) -> str | None:
    """Refuse every filesystem change outside ``allowed`` (and, beneath ``devices``, every
    change but writing to an existing file: ``/dev/null``, a terminal) from now on, for this
    process and its children.  Returns None when confined, else why not (one line)."""
    abi = landlock_abi()
    if abi < 1:
        return "the kernel has no Landlock (Linux 5.13+), or it is blocked here"
    writes = _WRITES_V1 | (_REFER if abi >= 2 else 0) | (_TRUNCATE if abi >= 3 else 0)
    libc = ctypes.CDLL(None, use_errno=True)
    attr = _RulesetAttr(writes)
    size = ctypes.c_size_t(ctypes.sizeof(attr))
    ruleset = libc.syscall(_CREATE_RULESET, ctypes.byref(attr), size, ctypes.c_uint32(0))
    if ruleset < 0:
        return f"landlock_create_ruleset failed: {os.strerror(ctypes.get_errno())}"
    try:
        rules = [(Path(path), writes) for path in allowed]
        if devices is not None and devices.is_dir():
            rules.append((devices, _WRITE_FILE | (_TRUNCATE if abi >= 3 else 0)))
        for path, rights in rules:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:
                beneath = _PathBeneathAttr(rights, fd)
                if libc.syscall(_ADD_RULE, ruleset, _RULE_PATH_BENEATH, ctypes.byref(beneath),
                                ctypes.c_uint32(0)) < 0:
                    return f"landlock_add_rule({path}) failed: {os.strerror(ctypes.get_errno())}"
            finally:
                os.close(fd)
        # Required to restrict oneself without privileges; it also keeps a setuid program
        # from gaining any beyond the confinement.
        if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            return f"prctl(PR_SET_NO_NEW_PRIVS) failed: {os.strerror(ctypes.get_errno())}"
        if libc.syscall(_RESTRICT_SELF, ruleset, ctypes.c_uint32(0)) < 0:
            return f"landlock_restrict_self failed: {os.strerror(ctypes.get_errno())}"
    finally:
        os.close(ruleset)
    return None
