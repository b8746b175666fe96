"""Writing files so that readers never see half of one: the temporary-sibling-then-rename pattern.

Every file gpt-train writes in place (bins, JSON state, charts) goes through `atomic_path`:
written under a temporary name beside its destination, renamed over it only when complete,
removed if the write fails. Files get the mode a plain `open` would give them (0666 less the
umask); tempfile's 0600 would make datasets and model folders private to their writer.

Not here: whole folders committed at once (gpt_train.checkpoint, gpt_train.prepare stage them).
"""
import json
import os
import tempfile


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


def write_json(path, obj, **options):
    """`obj` as indented JSON in `path`, through atomic_path."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, **options)
        f.write("\n")
