"""Policy versions (ACADEMY.md §3): the learned Tamiyo's weights, one immutable version each,
and the ``CHAMPION`` pointer that says which one runs.

```
<academy_dir>/policies/
  v1/                    a version (v0, the base policy, ships in the package: academy/v0/)
    policy.safetensors   the scorer's tensors
    adapter/             optional: a LoRA adapter, in the adapter library's own files
    card.json            version, parent, created, trained_on, gates, training_s, scorer, sha256
  CHAMPION               "vN\\n": the version a run uses unless it pins one (none: v0)
  .lock                  held (flock) by the one process changing the registry
<academy_dir>/replay.sqlite   its attempts table: every register, promote and revert
```

A version is written whole or not at all: into a dot-named temporary directory, every file
fsynced, then renamed into place, so a kill never leaves half a version under a version name;
the next writer removes such leftovers.  A version never changes once written: its card holds
the SHA-256 of the tensor file (and of every adapter file), so later damage is a load error,
and a champion that does not load is not run: :meth:`PolicyRegistry.champion` falls back to
the newest good version below it and says so in one line.

``CHAMPION`` moves only by :meth:`~PolicyRegistry.promote` and :meth:`~PolicyRegistry.revert`,
each recorded as an attempt in the replay buffer with the champion it replaced (its
``parent``); revert undoes the newest move still in effect, so v0 → v1 → v2, revert, revert
comes back to v0, not to v1 twice.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from tolaria.academy.replay import REPLAY_FILE, ReplayBuffer
from tolaria.atomic import fsync_dir, read_whole, write_atomic
from tolaria.errors import PolicyVersionError, ReplayError

POLICY_FILE = "policy.safetensors"
CARD_FILE = "card.json"
ADAPTER_DIR = "adapter"
CHAMPION_FILE = "CHAMPION"
LOCK_FILE = ".lock"
#: The base policy: written by ``tolaria academy pretrain``, shipped inside the package.
BUILTIN_V0 = Path(__file__).with_name("v0")
#: What every card holds.  The registry writes version, created and the checksums itself;
#: whoever trained the policy supplies the rest (``gates`` may be left out: none were run).
CARD_FIELDS = ("version", "parent", "created", "trained_on", "gates", "training_s", "scorer",
               "sha256")
_SUPPLIED_FIELDS = ("parent", "trained_on", "training_s", "scorer")
_NAME = re.compile(r"v(0|[1-9][0-9]*)")
#: How a writer killed mid-write leaves its temporary files (a version directory here, a
#: CHAMPION from :func:`tolaria.atomic.write_atomic`): dot-named, with ``.tmp-<pid>``.
_LEFTOVER = re.compile(r"\..+\.tmp-\d+")


def version_number(name: str) -> int:
    """``"v3"`` -> 3; anything that is not a version name is one line naming it."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise PolicyVersionError(f"{name!r} is not a policy version name (v0, v1, ...)")
    return int(name[1:])


@dataclass(frozen=True)
class PolicyVersion:
    """One version, verified against its card's checksums."""

    name: str
    path: Path
    card: dict
    tensors: dict[str, torch.Tensor] = field(repr=False, compare=False)

    @property
    def adapter(self) -> Path | None:
        """The LoRA adapter's directory, when this version has one."""
        return self.path / ADAPTER_DIR if "adapter_sha256" in self.card else None


def read_version(path: Path, name: str) -> PolicyVersion:
    """Read and verify the version directory ``path`` that should hold ``name``: a missing
    file, a card that is not one, a checksum that differs or tensors that do not parse is one
    :class:`PolicyVersionError` line naming the file."""
    path = Path(path)
    card_path = path / CARD_FILE
    try:
        card = json.loads(read_whole(card_path, PolicyVersionError))
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError alike
        raise PolicyVersionError(f"{card_path}: not JSON ({exc})") from None
    if not isinstance(card, dict):
        raise PolicyVersionError(f"{card_path}: not a JSON object")
    missing = [key for key in CARD_FIELDS if key not in card]
    if missing:
        raise PolicyVersionError(f"{card_path}: lacks {', '.join(missing)}")
    if card["version"] != name:
        raise PolicyVersionError(f"{card_path}: names version {card['version']!r}, not {name}")
    data = read_whole(path / POLICY_FILE, PolicyVersionError)
    expected = {POLICY_FILE: card["sha256"]}
    adapter = card.get("adapter_sha256", {})
    if not isinstance(adapter, dict):
        raise PolicyVersionError(f"{card_path}: adapter_sha256 is not an object")
    expected.update({f"{ADAPTER_DIR}/{file}": digest for file, digest in adapter.items()})
    for file, digest in expected.items():
        content = data if file == POLICY_FILE else read_whole(path / file, PolicyVersionError)
        if _sha256(content) != digest:
            raise PolicyVersionError(
                f"{path / file}: SHA-256 differs from {CARD_FILE}'s (damaged or replaced)"
            )
    try:
        tensors = load_safetensors(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise PolicyVersionError(f"{path / POLICY_FILE}: unreadable tensors ({exc})") from None
    return PolicyVersion(name=name, path=path, card=card, tensors=tensors)


def write_version(
    final: Path, tensors: dict[str, torch.Tensor], card: dict, *, adapter: Path | None = None
) -> dict:
    """Write the version directory ``final`` whole or not at all and return the card written:
    ``card`` plus ``sha256`` (and ``adapter_sha256`` when ``adapter``, a directory of adapter
    files, is given).  The registry's one write path, and the pretrain's for the package's v0.
    """
    final = Path(final)
    if final.exists():
        raise PolicyVersionError(f"{final}: already exists; a policy version is never rewritten")
    data = save_safetensors({key: t.detach().cpu().contiguous() for key, t in tensors.items()})
    card = {**card, "sha256": _sha256(data)}
    try:
        json.dumps(card, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise PolicyVersionError(f"{final}: the card is not plain JSON ({exc})") from None
    temp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    try:
        temp.mkdir(parents=True)
        if adapter is not None:
            shutil.copytree(adapter, temp / ADAPTER_DIR)
            files = sorted(p for p in (temp / ADAPTER_DIR).rglob("*") if p.is_file())
            card["adapter_sha256"] = {
                p.relative_to(temp / ADAPTER_DIR).as_posix(): _sha256(p.read_bytes())
                for p in files
            }
            for file in files:
                _fsync_file(file)
            for directory in {p.parent for p in files} | {temp / ADAPTER_DIR}:
                fsync_dir(directory)
        _write_synced(temp / POLICY_FILE, data)
        _write_synced(temp / CARD_FILE, (json.dumps(card, indent=1) + "\n").encode())
        fsync_dir(temp)
        os.replace(temp, final)
    except OSError as exc:  # a full disk, a read-only or vanished folder, an unreadable adapter
        shutil.rmtree(temp, ignore_errors=True)
        raise PolicyVersionError(f"{final}: cannot write the policy version ({exc})") from None
    fsync_dir(final.parent)
    return card


class PolicyRegistry:
    """The versions under ``<academy_dir>/policies`` plus the built-in v0 (``builtin``: the
    package's, unless ``policies/v0`` exists).  Reading never creates anything; writing
    (register, promote, revert) holds ``policies/.lock``, so concurrent writers queue --
    for ever, or at most ``lock_timeout_s`` seconds, after which the write is refused in one
    line (a run that reverts must not hang on a stuck session)."""

    def __init__(self, academy_dir: Path, *, builtin: Path | None = None,
                 lock_timeout_s: float | None = None) -> None:
        self.academy_dir = Path(academy_dir)
        self.directory = self.academy_dir / "policies"
        self.builtin = BUILTIN_V0 if builtin is None else Path(builtin)
        self.lock_timeout_s = lock_timeout_s

    # --- reading ---------------------------------------------------------------------

    def versions(self) -> list[str]:
        """The versions that load, v0 first, by number."""
        return [name for name, found in self.survey() if isinstance(found, PolicyVersion)]

    def survey(self) -> list[tuple[str, PolicyVersion | PolicyVersionError]]:
        """Every version on disk by number, each read: the version, or why it does not load."""
        names = {"v0"} if self.builtin.is_dir() else set()
        if self.directory.is_dir():
            names.update(
                p.name for p in self.directory.iterdir() if p.is_dir() and _NAME.fullmatch(p.name)
            )
        found: list[tuple[str, PolicyVersion | PolicyVersionError]] = []
        for name in sorted(names, key=version_number):
            try:
                found.append((name, self.load(name)))
            except PolicyVersionError as exc:
                found.append((name, exc))
        return found

    def path_of(self, name: str) -> Path:
        """Where version ``name`` lives (or would): v0 is the built-in unless policies/v0 exists."""
        own = self.directory / name
        return self.builtin if name == "v0" and not own.exists() else own

    def load(self, name: str) -> PolicyVersion:
        version_number(name)
        path = self.path_of(name)
        if not path.is_dir():
            where = f"the built-in {self.builtin}" if name == "v0" else str(self.directory)
            raise PolicyVersionError(f"{name}: no such policy version in {where}")
        return read_version(path, name)

    def champion(self, *, warn: Callable[[str], None] | None = None) -> PolicyVersion:
        """The version ``CHAMPION`` names (v0 when there is no ``CHAMPION``).  When it does not
        load, or ``CHAMPION`` is garbage, the newest good version below it runs instead and
        ``warn`` (default: stderr) gets one line saying what was wrong."""
        if not self._champion_file.exists():
            return self.load("v0")
        name, problem = self._pointer()
        if problem is None:
            try:
                return self.load(name)
            except PolicyVersionError as exc:
                problem = f"{self._champion_file} names {name}, which does not load: {exc}"
        # Garbage names no version: only the base policy is certainly below it.
        below = version_number(name) if name is not None else 1
        for candidate, found in reversed(self.survey()):
            if version_number(candidate) < below and isinstance(found, PolicyVersion):
                (warn or _warn_stderr)(f"{problem}; running {candidate} instead")
                return found
        raise PolicyVersionError(f"{problem}; and no good policy version below it")

    def attempts(self, limit: int | None = None) -> list[dict[str, Any]]:
        """The replay buffer's attempts (registers, promotes, reverts, nightly sessions...),
        newest first; none, and nothing created, while the academy has no replay buffer."""
        if not (self.academy_dir / REPLAY_FILE).exists():
            return []
        with ReplayBuffer.in_academy(self.academy_dir) as replay:
            return replay.attempts(limit)

    # --- writing ---------------------------------------------------------------------

    def register(
        self, tensors: dict[str, torch.Tensor], card: dict, *, adapter: Path | None = None
    ) -> PolicyVersion:
        """Write ``tensors`` (and ``adapter``, a directory of adapter files) as the next
        version vN, above every version directory there is, broken ones included: a name is
        never reused.  ``card`` supplies parent (the version it was trained from, or None),
        trained_on, training_s, scorer and optionally gates; CHAMPION does not move."""
        missing = [key for key in _SUPPLIED_FIELDS if key not in card]
        if missing:
            raise PolicyVersionError(f"a policy version's card needs {', '.join(missing)}")
        if card["parent"] is not None:
            version_number(card["parent"])
        started = time.time()
        with self._writing() as replay:
            taken = [int(p.name[1:]) for p in self.directory.iterdir() if _NAME.fullmatch(p.name)]
            name = f"v{max([0, *taken]) + 1}"
            write_version(
                self.directory / name,
                tensors,
                {"version": name, "created": _now(), "gates": {}}
                | {key: value for key, value in card.items() if key not in ("version", "created")},
                adapter=adapter,
            )
            _record(
                replay, f"{self.directory / name} is written",
                version=name, parent=card["parent"], kind="register", outcome="registered",
                detail={"trained_on": card["trained_on"]}, started=started,
            )
        return self.load(name)

    def promote(self, name: str, *, reason: str) -> None:
        """CHAMPION := ``name``, which must load (otherwise one line saying why not)."""
        started = time.time()
        with self._writing() as replay:
            self.load(name)
            current, _ = self._pointer()
            if current != name:
                self._move(replay, name, current, "promote", {"reason": reason}, started)

    def revert(self, *, reason: str, warn: Callable[[str], None] | None = None,
               only_from: str | None = None) -> str | None:
        """CHAMPION := the champion before the current one; returns its name.  A previous
        champion that no longer loads is passed over (``warn`` hears of it) for the one
        before it.  ``only_from``: revert only while CHAMPION names that version, checked
        under the lock (two runs blaming one version revert it once); None when it does not."""
        started = time.time()
        with self._writing() as replay:
            current, _ = self._pointer()
            if only_from is not None and current != only_from:
                return None
            earlier = _champions(replay.attempts())
            skipped = []
            while earlier:
                target = earlier.pop()
                if target == current:
                    continue
                try:
                    self.load(target)
                    break
                except PolicyVersionError as exc:
                    skipped.append(str(exc))
            else:
                passed = f" (passed over: {'; '.join(skipped)})" if skipped else ""
                raise PolicyVersionError(
                    f"nothing to revert to: no champion before {current or 'the current one'} "
                    f"on record in {self.directory}{passed}"
                )
            if skipped:
                (warn or _warn_stderr)(f"revert passed over: {'; '.join(skipped)}")
            self._move(replay, target, current, "revert", {"reason": reason, "skipped": skipped},
                       started)
            return target

    # --- internals -------------------------------------------------------------------

    @property
    def _champion_file(self) -> Path:
        return self.directory / CHAMPION_FILE

    def _pointer(self) -> tuple[str | None, str | None]:
        """``(name CHAMPION holds, None)``, ``("v0", None)`` with no CHAMPION, or
        ``(None, what is wrong with it)``."""
        try:
            text = self._champion_file.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return "v0", None
        except (OSError, UnicodeDecodeError) as exc:
            return None, f"{self._champion_file}: unreadable ({exc})"
        if not _NAME.fullmatch(text):
            return None, f"{self._champion_file}: {text[:40]!r} is not a version name"
        return text, None

    def _move(
        self, replay: ReplayBuffer, name: str, previous: str | None, kind: str, detail: dict,
        started: float,
    ) -> None:
        # CHAMPION first, the record after: a kill between the two leaves a champion newer
        # than the record, which revert still undoes correctly (its target is on record).
        try:
            write_atomic(self._champion_file, f"{name}\n")
        except OSError as exc:
            raise PolicyVersionError(f"{self._champion_file}: cannot write ({exc})") from None
        _record(
            replay, f"{self._champion_file} names {name}",
            version=name, parent=previous, kind=kind, outcome=_MOVES[kind], detail=detail,
            started=started,
        )

    @contextmanager
    def _writing(self) -> Iterator[ReplayBuffer]:
        """The registry's lock, its leftovers removed, and the replay buffer opened before
        anything changes: a buffer that cannot be used refuses the write, not its record."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            lock = open(self.directory / LOCK_FILE, "a")  # noqa: SIM115 -- held below
        except OSError as exc:
            raise PolicyVersionError(f"{self.directory}: cannot write ({exc})") from None
        with lock:
            self._lock(lock)  # released when the file closes
            for leftover in self.directory.iterdir():  # no other writer runs: all are dead
                if _LEFTOVER.fullmatch(leftover.name):
                    if leftover.is_dir():
                        shutil.rmtree(leftover, ignore_errors=True)
                    else:
                        leftover.unlink(missing_ok=True)
            with ReplayBuffer.in_academy(self.academy_dir) as replay:
                yield replay

    def _lock(self, lock: Any) -> None:
        if self.lock_timeout_s is None:
            fcntl.flock(lock, fcntl.LOCK_EX)
            return
        deadline = time.monotonic() + self.lock_timeout_s
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise PolicyVersionError(
                        f"{self.directory / LOCK_FILE}: another writer held it for more than "
                        f"{self.lock_timeout_s:g} s"
                    ) from None
                time.sleep(0.05)


#: Attempt kinds that move CHAMPION, and the outcome each records.
_MOVES = {"promote": "promoted", "revert": "reverted"}


def _champions(attempts: list[dict[str, Any]]) -> list[str]:
    """The champions on record (``attempts`` newest first, as the replay buffer gives them),
    oldest first, each the one before the next: a promote stacks its version; a revert goes
    back down to the version it restored."""
    stack: list[str] = []
    for move in reversed(attempts):
        if move["kind"] not in _MOVES:
            continue
        if not stack and move["parent"] is not None:
            stack.append(move["parent"])
        if move["kind"] == "revert":
            while stack and stack[-1] != move["version"]:
                stack.pop()
        if not stack or stack[-1] != move["version"]:
            stack.append(move["version"])
    return stack


def _record(replay: ReplayBuffer, done: str, **attempt: Any) -> None:
    """Record an attempt after what it did (``done``); a record that fails says both."""
    try:
        replay.record_attempt(**attempt, finished=time.time())
    except ReplayError as exc:
        raise PolicyVersionError(f"{done}, but it is not on record: {exc}") from None


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as file:
        os.fsync(file.fileno())


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _warn_stderr(message: str) -> None:
    print(f"tolaria: warning: {message}", file=sys.stderr)
