"""Reading raw sources: the user's local files (.txt, .json/.jsonl, .parquet; globs and folders)
or a Hub dataset, through `datasets`, for every reader of raw text: the preparers, the chat
preparer and the training stream. Each reader words its own errors; what is wrong with a bad
file is found here, naming the file and the line.

Not here: writing bins (gpt_train.prepare), streaming them into batches (gpt_train.stream).
"""
import contextlib
import glob
import json
import os

from huggingface_hub.utils import logging as hub_logging

from gpt_train.errors import UserError, first_line

LOADERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
QUIET_BELOW_BYTES = 100 << 20  # local corpora smaller than this prepare in seconds: no progress bars


@contextlib.contextmanager
def progress_bars(source):
    """datasets' progress bars (and ours) only for a corpus that takes a while: a Hub dataset or
    local files of QUIET_BELOW_BYTES or more; a small one would print a bar per phase and split."""
    from datasets.utils import logging as datasets_logging  # deferred with datasets (see _load)

    files = local_files(source) if source else []
    quiet = bool(files) and sum(os.path.getsize(f) for f in files) < QUIET_BELOW_BYTES
    shown = datasets_logging.is_progress_bar_enabled()
    if quiet:
        datasets_logging.disable_progress_bar()
    try:
        yield
    finally:
        if quiet and shown:
            datasets_logging.enable_progress_bar()


def load_source(cfg, column_setting):
    """(cfg.source's records with the column the setting `column_setting` names alone, the output
    folder, the local files: none for a Hub dataset), for every preparer."""
    files = local_files(cfg.source)
    out_dir = cfg.out_dir or os.path.join("data", cfg.name or _default_name(cfg.source, files))
    corpus = _load(cfg, files)
    column = getattr(cfg, column_setting)
    if column not in corpus.column_names:
        raise UserError(f"{cfg.source} has no column {column!r} (columns: {', '.join(corpus.column_names)}): pass "
                        f"--{column_setting}=NAME")
    corpus = corpus.select_columns([column])
    if files:
        _check_utf8(corpus, cfg.source, files)
    return corpus, out_dir, files


def _check_utf8(corpus, source, files):
    """Text that is not UTF-8 (a file saved in Latin-1) named by file and line now: pyarrow keeps
    such bytes when it loads JSON lines, and they fail only when a record is read, mid-preparation."""
    import pyarrow as pa

    try:
        for chunk in corpus.data.table.column(0).chunks:
            chunk.validate(full=True)  # checks every string's UTF-8, nested ones (messages) too
    except pa.ArrowInvalid as e:
        kind = loader_for(files)
        raise UserError(f"could not read {source} as {kind}: {first_bad_file(files, kind) or first_line(e)}") from None


def local_files(source):
    """The files `source` names, or [] if it names a Hub dataset."""
    parts = [p.strip() for p in source.split(",") if p.strip()]
    if not any(os.path.splitext(p)[1].lower() in LOADERS or os.path.exists(p) or any(c in p for c in "*?[")
               for p in parts):
        return []
    files = []
    for part in parts:
        found = sorted(glob.glob(part)) if any(c in part for c in "*?[") else [part]
        for path in found:
            if os.path.isdir(path):
                files += sorted(os.path.join(path, n) for n in os.listdir(path)
                                if os.path.splitext(n)[1].lower() in LOADERS)
            elif not os.path.isfile(path):
                raise UserError(f"data file {path} not found")
            else:
                files.append(path)
    if not files:
        raise UserError(f"no .txt, .json, .jsonl or .parquet files match {source}")
    return files


def loader_for(files):
    kinds = {LOADERS.get(os.path.splitext(f)[1].lower()) for f in files}
    if None in kinds:
        bad = next(f for f in files if os.path.splitext(f)[1].lower() not in LOADERS)
        raise UserError(f"{bad}: unsupported file type; use .txt, .json, .jsonl or .parquet")
    if len(kinds) > 1:
        raise UserError(f"mixed file types in one source ({', '.join(sorted(kinds))}): prepare them separately")
    return kinds.pop()


def _default_name(source, files):
    if files:
        return os.path.splitext(os.path.basename(files[0]))[0]
    return source.rstrip("/").split("/")[-1]


def load_data(source, subset, files, **options):
    """datasets' `load_dataset` of a source: `files` (local) by their kind, else the Hub id and its
    subset; its train split, streamed with streaming=True. Its errors are the caller's to word."""
    from datasets import load_dataset  # deferred (~2 s): `gpt-prepare --help` and convert's meta.pkl need none

    if files:
        kind = loader_for(files)
        # A .txt file is one document (a book, a play), not one document per line.
        return load_dataset(kind, data_files=files, split="train", **options,
                            **({"sample_by": "document"} if kind == "text" else {}))
    hub_logging.set_verbosity_error()  # its per-request retry warnings would bury the one-line error
    return load_dataset(source, subset or None, split="train", **options)


def _load(cfg, files):
    try:
        return load_data(cfg.source, cfg.subset, files, **({} if files else {"num_proc": cfg.num_proc}))
    except UserError:
        raise
    except Exception as e:
        if files:  # malformed json/parquet: name the file problem in one line
            kind = loader_for(files)
            raise UserError(f"could not read {cfg.source} as {kind}: "
                            f"{first_bad_file(files, kind) or first_line(e)}") from None
        # no network, unknown name, gated dataset: all end here
        subset = f" (subset {cfg.subset!r})" if cfg.subset else ""
        raise UserError(f"could not load the Hub dataset {cfg.source!r}{subset} ({first_line(e)}); check the name, "
                        "the subset and the network, or pass local files with --source=PATH") from None


def first_bad_file(files, kind):
    """What is wrong with the first of `files` that cannot be read as `kind`, naming it (datasets'
    own error names neither the file nor the cause), or None."""
    for path in files:
        if kind == "parquet":
            import pyarrow.parquet as pq
            try:
                pq.read_metadata(path)
            except Exception as e:
                return f"{path} is not a parquet file ({first_line(e)})"
            continue
        lines_problem = None
        with open(path, "rb") as f:
            for number, line in enumerate(f, 1):
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError as e:
                    return (f"{path} is not UTF-8 text (line {number}, byte {line[e.start]:#04x}): convert it, "
                            "e.g. iconv -f latin1 -t utf-8, or leave it out")
                if kind == "json" and text.strip() and lines_problem is None:
                    try:
                        json.loads(text)
                    except ValueError as e:
                        lines_problem = f"{path} line {number} is not a JSON object ({e})"
        if lines_problem and not _one_json_document(path):  # a .json file may be one document, not lines
            return lines_problem
    return None


def _one_json_document(path):
    try:
        with open(path, encoding="utf-8") as f:
            json.load(f)
        return True
    except ValueError:
        return False


def record_place(source, files, row):
    """Where the `row`-th record (0-based, in the order datasets loads `files`) is, in the words a
    user finds it by: 'FILE line N' for JSON lines, 'FILE record N' for a JSON array or a parquet
    row, 'record N of SOURCE' for a Hub dataset. Only read for a message: it counts records again."""
    if not files:
        return f"record {row + 1:,} of {source}"
    kind = loader_for(files)
    for path in files:
        if kind == "parquet":
            import pyarrow.parquet as pq
            count, lines = pq.read_metadata(path).num_rows, None
        elif kind == "json" and not _one_json_document(path):
            with open(path, "rb") as f:  # datasets skips blank lines: the row-th record is the row-th text line
                lines = [number for number, line in enumerate(f, 1) if line.strip()]
            count = len(lines)
        else:
            count, lines = _records(path, kind), None
        if row < count:
            return f"{path} line {lines[row]}" if lines else f"{path} record {row + 1:,}"
        row -= count
    return f"record {row + 1:,} past the end of {source}"


def _records(path, kind):
    if kind == "json":
        with open(path, encoding="utf-8") as f:
            document = json.load(f)
        return len(document) if isinstance(document, list) else 1
    return 1  # a .txt file is one document
