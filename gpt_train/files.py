"""Writing files so that readers never see half of one: the temporary-sibling-then-rename pattern.

Every file gpt-train writes in place (bins, JSON state, charts) goes through `atomic_path`:
written under a temporary name beside its destination, renamed over it only when complete,
removed if the write fails. Files get the mode a plain `open` would give them (0666 less the
umask); tempfile's 0600 would make datasets and model folders private to their writer.

Not here: whole folders committed at once (gpt_train.checkpoint, gpt_train.prepare stage them).
"""
import errno
import hashlib
import json
import os
import resource
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor

from safetensors import SafetensorError

from gpt_train.errors import first_line

# What a write that the machine refused looks like, errno by errno; anything else is not ours to explain.
WRITE_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
                errno.EFBIG: "a file reached the size limit (ulimit -f)", errno.EROFS: "the file system is read-only",
                errno.EACCES: "permission denied", errno.EPERM: "permission denied", errno.EIO: "an I/O error"}
# torch.save reports a refused write without an errno, in words like these (or basic_ios::clear).
TORCH_WRITE_MESSAGES = ("inline_container.cc", "PytorchStreamWriter", "basic_ios::clear", "file write failed")
WRITE_FAILURES = (OSError, RuntimeError, SafetensorError)
FULL_BELOW_BYTES = 64 << 10  # free space under this when a write fails: the disk filled up
HASH_CHUNK = 16 << 20
HASH_THREADS = 8


def default_mode():
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def give_default_mode(folder):
    """chmod every file under folder as `open` would have created it (libraries write some 0600)."""
    mode = default_mode()
    for root, _, names in os.walk(folder):
        for name in names:
            os.chmod(os.path.join(root, name), mode)


class atomic_path:
    """A temporary sibling of `path` that replaces it only if the block succeeds.

        with atomic_path("out/loss.png") as tmp:
            figure.savefig(tmp)
    """

    def __init__(self, path):
        self.path = path
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        # NAME.<random>.tmp: torch.save refuses names that start with a dot; the Hub push skips *.tmp
        fd, self.tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=os.path.basename(path) + ".",
                                        suffix=".tmp")
        os.close(fd)
        os.chmod(self.tmp, default_mode())

    def __enter__(self):
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            os.replace(self.tmp, self.path)
        elif os.path.exists(self.tmp):
            os.remove(self.tmp)
        return False


def describe_write_failure(error, folder):
    """Why writing into `folder` failed, in a few words, or None if `error` is no refused write
    (a bug, to be raised as it is). Look before removing what the failed write left: that frees
    the space whose lack caused it."""
    if isinstance(error, OSError):
        return WRITE_ERRNOS.get(error.errno) and f"{WRITE_ERRNOS[error.errno]} ({first_line(error)})"
    # torch names the errno only in words ("open file failed with strerror: Read-only file system")
    for number, reason in WRITE_ERRNOS.items():
        if os.strerror(number) in str(error):
            return f"{reason} ({first_line(error)})"
    if _read_only(folder):
        return f"{WRITE_ERRNOS[errno.EROFS]} ({first_line(error)})"
    if _free_bytes(folder) < FULL_BELOW_BYTES:
        return f"the disk is full ({first_line(error)})"
    size_limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if size_limit != resource.RLIM_INFINITY:  # the likely cause where one is set
        return f"{WRITE_ERRNOS[errno.EFBIG]}, {size_limit:,} bytes ({first_line(error)})"
    if isinstance(error, SafetensorError) or any(m in str(error) for m in TORCH_WRITE_MESSAGES):
        return f"a write failed ({first_line(error)})"
    return None


def _read_only(folder):
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _free_bytes(folder):
    try:
        stats = os.statvfs(folder)
    except OSError:
        return float("inf")
    return stats.f_bavail * stats.f_frsize


def write_json(path, obj, **options):
    """`obj` as indented JSON in `path`, through atomic_path."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, **options)
        f.write("\n")


def manifest(folder, names=None):
    """{relative path: {"size", "sha256"}} of every file under folder (or of the files `names`,
    relative to it). Files are hashed in parallel: hashlib lets go of the GIL on large buffers."""
    if names is None:
        paths = [os.path.join(root, n) for root, _, found in os.walk(folder) for n in found]
    else:
        paths = [os.path.join(folder, n) for n in names]
    with ThreadPoolExecutor(max_workers=min(HASH_THREADS, len(paths) or 1)) as pool:
        digests = list(pool.map(sha256, paths))
    return {os.path.relpath(path, folder).replace(os.sep, "/"): {"size": os.path.getsize(path), "sha256": digest}
            for path, digest in zip(paths, digests, strict=True)}


def remove_path(path):
    """Remove a file, a link or a folder tree; a link (also one to a folder) is unlinked, never
    followed, so nothing outside the removed path goes."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)  # removes links inside, without following them
    else:
        os.remove(path)


def file_problem(path, expected):
    """None if the file at `path` is the one `expected` ({"size", "sha256"}) describes, else what differs."""
    if not os.path.isfile(path):
        return "is missing"
    size = os.path.getsize(path)
    if size != expected["size"]:
        return f"has {size} bytes, the checkpoint wrote {expected['size']}"
    # checkpoints written before every file had a digest are checked by size where they have none
    if "sha256" in expected and sha256(path) != expected["sha256"]:
        return "does not match the file the checkpoint wrote (sha256 differs)"
    return None


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
