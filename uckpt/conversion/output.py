"""The output sink and its file-system implementation: a Universal folder built under a run-unique
partial name while the run holds the output's lock, made durable, and published by one rename.

A refused run removes its partial folder; a run cut short leaves it, and the next run of the same
command resumes it. ``latest_universal`` is written beside the output as DeepSpeed does, with the
path normalised first so a trailing slash cannot produce an empty tag. The writer threads' jobs are
in :mod:`.file_writers`, the fsyncs and the resume records in :mod:`.durable`.
"""
import fcntl
import glob
import json
import os
import re
import shutil
import socket
import stat
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any, Dict, Iterable, List, Optional, Set, Tuple

from ..dsformat import constants as C
from ..dsformat.universal import check_name, looks_converted
from ..regions import Kind
from ..errors import OutputError, UckptError
from ..torchsave import direct as directio
from ..torchsave import writer as tsave
from . import durable, file_writers


def normalise(path: str) -> str:
    return os.path.abspath(os.path.normpath(path))


def _inside(child: str, parent: str) -> bool:
    child, parent = os.path.realpath(child), os.path.realpath(parent)
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


EXPORT_REPORT = "uckpt_export.json"  # written into every folder uckpt export publishes
EXPORT_NAMES = re.compile(r"^(model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json|uckpt_export\.json|"
                          r"config\.json|generation_config\.json|tokenizer\.json|tokenizer_config\.json|"
                          r"special_tokens_map\.json|tokenizer\.model|vocab\.json|merges\.txt|added_tokens\.json|"
                          r"chat_template\.jinja)$")


def looks_exported(path: str) -> bool:
    """A folder ``uckpt export`` published: its report file, and nothing but the files it writes (no
    subfolder), so a Trainer checkpoint or a downloaded model folder that happens to hold a
    ``model.safetensors`` is never taken for one."""
    if not os.path.isdir(path) or os.path.islink(path):
        return False
    entries = list(os.scandir(path))
    return (any(e.name == EXPORT_REPORT for e in entries)
            and all(e.is_file(follow_symlinks=False) and EXPORT_NAMES.match(e.name) for e in entries))


class OutputKind(Kind):
    """What an output folder holds: which existing folder ``overwrite`` may replace, and whether its
    parent gets a ``latest_universal`` naming it."""

    UNIVERSAL = "a Universal checkpoint"
    HF_EXPORT = "a Hugging Face export"

    def looks_like(self, path: str) -> bool:
        return looks_converted(path) if self is OutputKind.UNIVERSAL else looks_exported(path)


def check_paths(input_folder: str, output_folder: str, overwrite: bool, kind: "OutputKind" = None):
    """Refuse outputs that would damage the input or silently replace a previous result."""
    out, inp = normalise(output_folder), normalise(input_folder)
    if _inside(out, inp):
        raise OutputError("lies inside the input checkpoint folder", output_folder,
                          "write the Universal checkpoint beside the input, e.g. ckpts/global_step1000_universal")
    if _inside(inp, out):
        raise OutputError("contains the input checkpoint folder", output_folder,
                          "choose an output folder that does not hold the input")
    check_output(output_folder, overwrite, kind)


def check_output(output_folder: str, overwrite: bool, kind: "OutputKind" = None):
    """Refuse to replace anything but an output of the same kind, and that only with ``overwrite``."""
    kind = kind or OutputKind.UNIVERSAL
    out = normalise(output_folder)
    if os.path.lexists(out) and not overwrite:
        raise OutputError("already exists", output_folder, "pass --overwrite to replace it, or choose another folder")
    if os.path.lexists(out) and not kind.looks_like(out):
        what = "no zero/optimizer_state.pt, or native shard files inside" if kind is OutputKind.UNIVERSAL else \
            "no model.safetensors or index, or training files inside"
        raise OutputError(f"exists and is not {kind.value} ({what}); --overwrite replaces only {kind.value}",
                          output_folder, "choose another output folder, or move this one away yourself")


LOCK_SUFFIX = ".uckpt-lock"  # <output><suffix>: the file a writing run holds locked
THREADED_WRITE_BYTES = 4 << 20  # a file holding this many tensor bytes streams from a writer thread
BATCH_BYTES = 64 << 20  # serialised small files wait for at most about this many bytes


class OutputSink:
    """Where a conversion's files go: the seam between the exchange and storage. Every rank writes the
    parameters it owns and the files it was given; rank 0 then publishes the whole output at once."""

    def prepare(self, resume_key: Optional[Dict[str, Any]] = None, restart: bool = False) -> Optional[str]:
        """Rank 0, before any rank writes: make the (still invisible) output ready; returns what it
        resumed (the partial output of a run that died, matching ``resume_key``), or None."""

    def reusable(self, names: Iterable[str]) -> Set[str]:
        """Of ``names``, the parameters already written intact by the run that ``prepare`` resumed."""
        return set()

    def write_param(self, name: str, states: Dict[str, Any], complete: bool = True):
        """One parameter's folder: ``{state: payload}`` (``fp32``, ``exp_avg``, ``exp_avg_sq``, ``step``);
        ``complete=False``: a first part of it, the rest follows in later calls."""
        raise NotImplementedError

    def write_file(self, obj: Any, *parts: str):
        """Any other file of the output (model files, ``zero/optimizer_state.pt``), as ``torch.save`` writes ``obj``."""
        raise NotImplementedError

    def copy(self, src: str):
        """A file copied as it is."""
        raise NotImplementedError

    def write_torch(self, obj: Any, *parts: str):
        """Write ``obj`` with ``torch.save`` (objects of a live job that only their own pickling writes)."""
        raise NotImplementedError

    def flush(self):
        """Wait until everything this rank queued is written; raise the first failure."""

    def finish(self) -> str:
        """Rank 0, once every rank flushed: make the output visible as a whole; returns what points at it."""
        raise NotImplementedError

    def abort(self, keep: bool = False):
        """Rank 0, on failure: remove what was written (``keep``: unless a rerun can resume it)."""

    def sync(self):
        """Every rank, after :meth:`flush`: what it wrote is durable."""

    def close(self):
        """Release threads and files (every rank, success or not)."""


class OutputFolder(OutputSink):
    """A Universal checkpoint folder on a file system shared by the ranks.

    Built under ``<output>.uckpt-partial-<run id>``, a name no other run uses, while rank 0 holds an
    exclusive lock on the sibling ``<output>.uckpt-lock`` (``fcntl.flock``): a second conversion to
    the same output (a requeued job) stops with a clear error, or waits with ``wait_for_lock``.
    Every rank makes its files durable (:meth:`sync`) before rank 0 publishes the folder with one
    rename and fsyncs the parent; ``latest_universal`` is replaced the same way. A crash at any point
    leaves either the previous state or the complete new folder, never one that looks complete
    with short files."""

    def __init__(self, output_folder: str, io_threads: int = 4, run_id: str = "", overwrite: bool = False,
                 wait_for_lock: bool = False, kind: OutputKind = OutputKind.UNIVERSAL):
        self.kind = kind
        self.final = normalise(output_folder)
        self.run_id = run_id or os.urandom(8).hex()
        self.partial = f"{self.final}{C.PARTIAL_SUFFIX}-{self.run_id}"
        self.lock_path = self.final + LOCK_SUFFIX
        self.zero = os.path.join(self.partial, C.UNIVERSAL_ZERO_FOLDER)
        self.overwrite, self.wait_for_lock = overwrite, wait_for_lock
        self.resume = os.path.join(self.partial, durable.RESUME_FOLDER)
        self._lock_fd = None
        self._written: Dict[str, Tuple[int, int]] = {}  # path -> (bytes, records digest), once written
        self._params: List[Tuple[str, List[str]]] = []  # parameters whose files are queued, not yet recorded
        self._parts: Dict[str, List[str]] = {}  # files of parameters written a state at a time, not complete yet
        self._manifest = None  # this rank's manifest file, opened on first use
        self._threads = max(1, io_threads)
        self._pool = ThreadPoolExecutor(max_workers=self._threads, thread_name_prefix="uckpt-write")
        self._pending: List[Future] = []
        self._batch: List[Tuple[str, Dict[str, bytes]]] = []  # (folder, {path: file bytes}) not written yet
        self._batch_bytes = 0
        self.bytes_written = 0
        self.files_written = 0
        self.payload_bytes = 0  # tensor bytes of the files written, and the bytes of files copied

    # rank 0 only -------------------------------------------------------------------------
    def prepare(self, resume_key: Optional[Dict[str, Any]] = None, restart: bool = False) -> Optional[str]:
        """Take the output's lock, check the output again under it, and adopt the partial folder of a
        run that died converting the same input with the same options (``resume_key``), unless
        ``restart``; other partial folders of dead runs are removed. Returns the adopted folder's old
        name, or None when this run starts afresh."""
        self._lock()
        if os.path.lexists(self.final) and not self.overwrite:
            raise OutputError("was published by another run while this one started", self.final,
                              "pass --overwrite to replace it, or choose another folder")
        if os.path.lexists(self.final) and not self.kind.looks_like(self.final):
            raise OutputError(f"exists and is not {self.kind.value}; --overwrite replaces only {self.kind.value}",
                              self.final, "choose another output folder, or move this one away yourself")
        adopted = None
        stale = [p for p in glob.glob(glob.escape(self.final + C.PARTIAL_SUFFIX) + "*")
                 if os.path.isdir(p) and not os.path.islink(p)]  # runs that died holding this lock left them
        for old in sorted(stale, key=os.path.getmtime, reverse=True):
            if adopted is None and not restart and resume_key is not None and durable.resume_key(old) == resume_key \
                    and not durable.holds_links(old):
                os.rename(old, self.partial)
                adopted = old
            else:
                shutil.rmtree(old)
        if adopted is None:
            os.makedirs(self.zero if self.kind is OutputKind.UNIVERSAL else self.partial)
        os.makedirs(self.resume, exist_ok=True)
        if resume_key is not None:
            durable.write_json(os.path.join(self.resume, durable.RESUME_KEY_FILE), resume_key)
        return adopted

    def reusable(self, names: Iterable[str]) -> Set[str]:
        """Of ``names``, the parameters an earlier run of this partial folder recorded as complete whose
        files all still hold what was recorded: their sizes, the digests of their records, and every
        record's bytes against its CRC-32."""
        recorded: Dict[str, Dict[str, List[int]]] = {}
        for path in glob.glob(os.path.join(glob.escape(self.resume), "manifest-*.jsonl")):
            with open(path) as f:
                for line in f:
                    try:
                        entry = json.loads(line)
                        recorded[check_name(entry["param"], "parameter name")] = dict(entry["files"])
                    except (ValueError, KeyError, TypeError, UckptError):
                        continue  # a torn last line, or not ours: that parameter is written again
        return {name for name in names if name in recorded and durable.intact(self.partial, recorded[name])}

    def _lock(self):
        """Hold ``<output>.uckpt-lock`` exclusively. The holder removes the file when it lets go, so a
        waiter that wakes up holding a file no longer at that path opens the new one and tries again."""
        parent = os.path.dirname(self.final)
        try:
            os.makedirs(parent, exist_ok=True)
        except OSError as exc:  # a file where a folder must be, a read-only file system, no permission
            raise OutputError(f"cannot create the output's folder {parent} ({exc.strerror})", self.final,
                              "choose an output whose parent is (or can be made) a writable folder") from None
        while True:
            fd = self._open_lock_file()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if self.wait_for_lock else fcntl.LOCK_NB))
            except BlockingIOError:
                os.close(fd)
                raise OutputError(f"another conversion is writing this output (it holds {self.lock_path})",
                                  self.final, "wait for it to finish, pass --wait_for_lock to wait, or choose "
                                  "another folder") from None
            held, now = os.fstat(fd), _lstat(self.lock_path)
            if now is not None and (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino):
                break
            os.close(fd)  # the previous holder removed it meanwhile
        os.ftruncate(fd, 0)
        os.write(fd, f"{socket.gethostname()} pid {os.getpid()} run {self.run_id}\n".encode())
        self._lock_fd = fd

    def _open_lock_file(self) -> int:
        try:  # never through a link: a lock file planted as a link to another file would be truncated
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as exc:
            raise OutputError(f"cannot use the lock file {self.lock_path} ({exc.strerror})", self.final,
                              "remove it if no conversion is running (it must be a plain file, not a link)") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            os.close(fd)
            raise OutputError(f"the lock file {self.lock_path} is not a plain file of its own (a link?)", self.final,
                              "remove it if no conversion is running")
        return fd

    def _unlock(self):
        if self._lock_fd is not None:
            os.unlink(self.lock_path)  # still ours: we hold it (waiters then retry on a fresh file)
            os.close(self._lock_fd)
            self._lock_fd = None

    def finish(self) -> str:
        """Move the complete, synced partial folder into place and point ``latest_universal`` at it."""
        shutil.rmtree(self.resume, ignore_errors=True)
        durable.fsync_dir(self.partial)
        old = None
        if os.path.lexists(self.final) and not (self.overwrite and self.kind.looks_like(self.final)):
            # made while this run converted, by something that does not take the lock: never replaced
            raise OutputError(f"appeared while this run wrote, and is not {self.kind.value} to replace",
                              self.final, "move it away and run the command again")
        if os.path.lexists(self.final):  # an output of this kind (checked again just now), replaced
            old = f"{self.final}.uckpt-old-{self.run_id}"
            os.rename(self.final, old)
        os.rename(self.partial, self.final)
        parent, tag = os.path.split(self.final)
        durable.fsync_dir(parent)
        if old:
            shutil.rmtree(old)
        if self.kind is not OutputKind.UNIVERSAL:
            self._unlock()
            return self.final
        latest = os.path.join(parent, C.LATEST_UNIVERSAL_FILE)
        tmp = f"{latest}.uckpt-tmp-{self.run_id}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            directio.write_all(fd, memoryview(tag.encode()), 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, latest)
        durable.fsync_dir(parent)
        self._unlock()
        return latest

    def abort(self, keep: bool = False):
        """Remove the partial folder; with ``keep`` (the run was cut short, not refused: a lost rank, an
        interrupt) leave it for a rerun to resume when some parameter was recorded complete."""
        self._batch, self._batch_bytes = [], 0  # not written yet: nothing to wait for
        try:
            self.flush()
        except BaseException:  # noqa: BLE001 - already failing; the folder goes anyway
            pass
        recorded = glob.glob(os.path.join(glob.escape(self.resume), "manifest-*.jsonl"))
        if self._lock_fd is not None and not (keep and recorded):  # only the lock holder made this folder
            shutil.rmtree(self.partial, ignore_errors=True)
        self._unlock()

    def sync(self):
        """Every rank, after :meth:`flush`: this rank's files and folders reach the disk (``syncfs`` of the
        output's file system: one call, where an fsync per file would be thousands)."""
        durable.syncfs(self.partial)

    # any rank ----------------------------------------------------------------------------
    def write_file(self, obj: Any, *parts: str):
        """Write ``obj`` (as ``torch.save`` would) to ``<partial>/<parts...>``."""
        path = os.path.join(self.partial, *parts)
        self._add(os.path.dirname(path), {path: obj})

    def write_param(self, name: str, states: Dict[str, Any], complete: bool = True):
        """One parameter folder ``zero/<name>/`` with one ``<state>.pt`` per entry of ``states``; with
        ``complete=False``, the first part of it (a parameter written one state at a time): it is
        recorded for a resume only once the part that completes it is written, with all its files."""
        folder = os.path.join(self.zero, check_name(name, "parameter name"))
        files = {os.path.join(folder, state + C.STATE_FILE_SUFFIX): obj for state, obj in states.items()}
        self._parts.setdefault(name, []).extend(files)
        if complete:
            self._params.append((name, self._parts.pop(name)))
        self._add(folder, files)

    def _record_done(self):
        """Append the parameters whose files are all written to this rank's manifest (a rerun after a
        crash trusts only these, after checking them: see :meth:`reusable`)."""
        done = [(name, paths) for name, paths in self._params if all(p in self._written for p in paths)]
        if not done or not os.path.isdir(self.resume):
            return
        self._params = [(name, paths) for name, paths in self._params if not all(p in self._written for p in paths)]
        if self._manifest is None:
            self._manifest = open(os.path.join(self.resume, f"manifest-{self.run_id}-{os.getpid()}.jsonl"), "a")
        for name, paths in done:
            files = {os.path.relpath(p, self.partial): list(self._written[p]) for p in paths}
            self._manifest.write(json.dumps({"param": name, "files": files}) + "\n")
        self._manifest.flush()

    def _add(self, folder: str, files: Dict[str, Any]):
        """Large files stream from a writer thread (their time goes to ``write``, which overlaps the
        next reads). Small ones, thousands in a Universal checkpoint, are serialised here and created
        in batches by the writer threads while this thread waits (:meth:`_write_batch`)."""
        payload = sum(tsave.payload_bytes(obj) for obj in files.values())
        self.payload_bytes += payload
        if payload >= THREADED_WRITE_BYTES:
            self._pending.append(self._pool.submit(file_writers.save_files, folder, files))
            return
        images = {path: file_writers.image(obj, path) for path, obj in files.items()}
        self._batch.append((folder, images))
        self._batch_bytes += sum(len(b) for b, _ in images.values())
        if self._batch_bytes >= BATCH_BYTES:
            self._write_batch()

    def _write_batch(self):
        """Create the batched folders and files on the writer threads, this thread waiting.

        Creating a small file is a few system calls with little Python between them. Threads overlap
        the file system's latency (several ms per file on this machine's disk after a large delete),
        and with this thread idle they do not wait on the GIL behind Python work (with Python work
        beside them, writing 1,600 small parameters on 1-4 threads took 2-3x longer than inline).
        Folders are created by one thread in order (creating entries of one parent folder is serial
        in the file system anyway) while the others fill the folders already made."""
        batch, self._batch, self._batch_bytes = self._batch, [], 0
        if not batch:
            return
        made = file_writers.FolderProgress()
        futures = [self._pool.submit(file_writers.make_folders, [folder for folder, _ in batch], made)]
        writers = max(1, self._threads - 1)
        futures += [self._pool.submit(file_writers.write_images, batch, range(i, len(batch), writers), made)
                    for i in range(min(writers, len(batch)))]
        self._pending.extend(futures)
        wait(futures)

    def copy(self, src: str):
        self.payload_bytes += os.path.getsize(src)
        self._pending.append(self._pool.submit(file_writers.copy, src, self.partial))

    def write_torch(self, obj: Any, *parts: str):
        """``torch.save(obj)`` to ``<partial>/<parts...>``, now (an in-job save's own model-state dicts)."""
        import torch

        path = os.path.join(self.partial, *parts)
        try:
            torch.save(obj, path)
        except OSError as exc:
            raise OutputError(f"writing the output failed: {exc.strerror or exc}", self.final,
                              "free space on its file system (or fix its permissions) and run the command again") \
                from exc
        except Exception as exc:  # noqa: BLE001 - an object of the job that torch.save cannot pickle
            raise OutputError(f"cannot write {parts[-1]}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}",
                              self.final, "keep only picklable objects in client_state") from None
        nbytes = os.path.getsize(path)
        self.bytes_written += nbytes
        self.files_written += 1

    def flush(self):
        """Wait for every queued write, then re-raise the first failure.

        Waiting for all of them matters: a write still in flight after a failure could recreate
        the partial folder after the abort removed it.
        """
        self._write_batch()
        pending, self._pending = self._pending, []
        first = None
        for fut in pending:
            try:
                for path, nbytes, digest in fut.result():
                    self.bytes_written += nbytes
                    self.files_written += 1
                    self._written[path] = (nbytes, digest)
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                first = first or exc
        if isinstance(first, OSError):  # a full disk, a quota, a read-only or vanished folder: say so in one line
            where = f" ({first.filename})" if first.filename else ""
            raise OutputError(f"writing the output failed: {first.strerror or first}{where}", self.final,
                              "free space on its file system (or fix its permissions) and run the command again") \
                from first
        if first is not None:
            raise first
        self._record_done()

    def close(self):
        self._pool.shutdown(wait=True)
        if self._manifest is not None:
            self._manifest.close()
            self._manifest = None
        self._unlock()


def _lstat(path: str):
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
