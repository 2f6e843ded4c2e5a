"""A run directory: the files that let a run survive a crash and be compared epoch by epoch.

``config.json``
    Format version, the full resolved configuration, and one *segment* per start of the run
    (device, threads, library versions, the epoch and step it started at).
``checkpoint.pt``
    Everything needed to continue bit for bit: model and heads, optimizer, every random state, the
    position in the data and the epoch's running sums, and the per-epoch records so far. Replaced
    atomically; its payload is checksummed, so a truncated or corrupt file is detected.
``metrics.jsonl``
    One JSON object per completed epoch, appended after the checkpoint that holds the epoch (and
    rebuilt from that checkpoint on resume), so it never holds an epoch the checkpoint does not.
``model.pt``, ``summary.json``
    At the end: the trained model under the original model's parameter names, and the summary.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch

from .._errors import FwdTransError

__all__ = ["FORMAT", "RunDir", "atomic_write", "deferred_interrupts", "load_checkpoint", "save_checkpoint",
           "save_torch", "write_json"]

FORMAT = 1  # config.json's format version; bump when a run directory's layout changes
_MAGIC = b"FWDTRANS-CKPT\x01"
_HEADER = len(_MAGIC) + 32 + 8  # magic, sha256 of the payload, payload length
# what a run directory may hold besides its files: its lock, TensorBoard's folder, a study's record of a failed run
_OTHERS = (".lock", "tensorboard", "failed.json")


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: a temporary file in the same folder, synced, then renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically (the old file stays whole if serialising fails).

    Example:
        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "r.json"
        >>> write_json(path, {"a": 1}); path.read_text()
        '{\\n  "a": 1\\n}\\n'
    """
    atomic_write(path, (json.dumps(data, indent=2) + "\n").encode())


def _serialise(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def save_torch(path: str | os.PathLike, obj: Any) -> None:
    """``torch.save(obj, path)``, atomically (e.g. ``model.pt``, which ``torch.load`` reads as usual)."""
    atomic_write(path, _serialise(obj))


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """``torch.save`` ``state`` behind a header holding the payload's SHA-256 and length; atomic."""
    payload = _serialise(state)
    atomic_write(path, _MAGIC + hashlib.sha256(payload).digest() + len(payload).to_bytes(8, "little") + payload)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`, refusing a truncated or corrupt one.

    Raises:
        FwdTransError: The file is not a fwdtrans checkpoint, is truncated, or fails its checksum.
    """
    path = Path(path)
    data = path.read_bytes()
    fix = f"Fix: delete {path} to restart the run from its beginning, or restore the file from a backup."
    if not data.startswith(_MAGIC) or len(data) < _HEADER:
        raise FwdTransError(f"{path} is not a fwdtrans checkpoint (bad header: truncated or overwritten). {fix}")
    digest, size, payload = data[len(_MAGIC):len(_MAGIC) + 32], int.from_bytes(data[_HEADER - 8:_HEADER], "little"), \
        data[_HEADER:]
    if len(payload) != size:
        raise FwdTransError(f"{path} is truncated: {len(payload)} of {size} payload bytes. {fix}")
    if hashlib.sha256(payload).digest() != digest:
        raise FwdTransError(f"{path} is corrupt: its checksum does not match its contents. {fix}")
    return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=False)


@contextlib.contextmanager
def deferred_interrupts():
    """Hold Ctrl-C (SIGINT) and SIGTERM until the block ends, then deliver them: a checkpoint and
    its metrics line are written together or not at all. A no-op outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum)) for s in (signal.SIGINT,
                                                                                            signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in received[:1]:
            os.kill(os.getpid(), s)


class RunDir:
    """The files of one run directory (see the module docstring).

    Example:
        >>> import tempfile
        >>> run = RunDir(tempfile.mkdtemp())
        >>> run.append_metrics({"epoch": 1, "train_loss": 2.0}); run.read_metrics()
        [{'epoch': 1, 'train_loss': 2.0}]
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.config = self.path / "config.json"
        self.checkpoint = self.path / "checkpoint.pt"
        self.metrics = self.path / "metrics.jsonl"
        self.summary = self.path / "summary.json"
        self.model = self.path / "model.pt"

    def prepare(self) -> None:
        """Create the folder and take its lock, or refuse: the folder cannot be written, holds other files than a
        run's, or another process is training in it. The lock is released when the process ends or :meth:`release`."""
        foreign = self._foreign()
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise FwdTransError(f"--run-dir {self.path} is not a run directory: it holds {shown}. Fix: choose a new "
                                "or empty folder for --run-dir.")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._lock = open(self.path / ".lock", "w")  # noqa: SIM115 (held until release or exit)
        except OSError as e:
            raise FwdTransError(f"run directory {self.path} cannot be written ({e.strerror or e}). "
                                "Fix: choose a folder you can write to with --run-dir.") from None
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            raise FwdTransError(f"another process is training in {self.path}. Fix: wait for it to finish (or stop "
                                "it); two processes must not write one run directory.") from None

    def _foreign(self) -> list[str]:
        """What the folder holds that no run writes (entries named as ``ls -F`` would), sorted."""
        if not self.path.is_dir() or self.config.is_file():
            return []
        own = {p.name for p in (self.config, self.checkpoint, self.metrics, self.summary, self.model)}
        return sorted(p.name + ("/" if p.is_dir() else "") for p in self.path.iterdir()
                      if p.name not in own | set(_OTHERS)
                      and not (p.name.startswith(".") and p.name.endswith(".tmp")))  # atomic_write's, left by a crash

    def release(self) -> None:
        """Release the lock taken by :meth:`prepare`."""
        lock = getattr(self, "_lock", None)
        if lock is not None:
            lock.close()
            self._lock = None

    def read_config(self) -> dict | None:
        """The recorded ``config.json``, or ``None`` for a new run."""
        return _read_json(self.config, "restore it, or start the run in a new --run-dir")

    def read_summary(self) -> dict | None:
        """The recorded ``summary.json`` (a finished run), or ``None``."""
        return _read_json(self.summary, f"delete it; the same command then rewrites it from {self.checkpoint.name} "
                          "(or, without one, start the run in a new --run-dir)")

    def leftovers(self) -> list[str]:
        """The files of trained epochs in a folder without ``checkpoint.pt`` (which the run cannot resume)."""
        if self.checkpoint.is_file():
            return []
        return [p.name for p in (self.metrics, self.model, self.summary)
                if p.is_file() and (p != self.metrics or self.read_metrics())]

    def append_metrics(self, record: dict) -> None:
        """Append one epoch's record and make it durable."""
        with open(self.metrics, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def rewrite_metrics(self, records: list[dict]) -> None:
        """Replace ``metrics.jsonl`` with ``records`` (on resume: exactly the checkpoint's epochs)."""
        atomic_write(self.metrics, "".join(json.dumps(r) + "\n" for r in records).encode())

    def read_metrics(self) -> list[dict]:
        """The per-epoch records (a line cut short by a crash is ignored)."""
        if not self.metrics.is_file():
            return []
        records = []
        for line in self.metrics.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                break
        return records


def _read_json(path: Path, fix: str) -> dict | None:
    """The JSON file ``path``, ``None`` when it does not exist; one clear error when it cannot be read."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise FwdTransError(f"{path} cannot be read ({e}). Fix: {fix}.") from None
