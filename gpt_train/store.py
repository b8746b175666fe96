"""Run folders on object storage: an out_dir (or init_from, sample.py's out_dir, a folder gpt-eval,
convert or push read) given as an fsspec URL: s3://bucket/prefix, gs://..., hf://buckets/...

A training run works in a local copy of the run folder, its working copy, with every guarantee of
a local out_dir (crash-safe commits, the lock, the checks), and publishes each committed
checkpoint to the store. A store has no atomic rename, so there the manifest is the commit:

    URL/checkpoints/<iteration>-<id>/...      every file of the checkpoint, uploaded first
    URL/checkpoints/<iteration>-<id>.json     its manifest (each object's size and sha256), last
    URL/metrics.jsonl, loss.png, training_config.json   the run's logs, replaced as they grow
    URL/.gpt-train.lease                      the one writer: created only if absent, refreshed

Readers take the newest checkpoint whose manifest exists and check every object against it. The
previous checkpoint is deleted only once the new manifest exists, so a kill at any moment of an
upload leaves a complete checkpoint; objects of an upload that never got its manifest are
deleted by the next one. A resume first brings the newest checkpoint into the working copy.
Credentials come from the store's own places (environment, profiles): nothing here writes them.

Not here: the local run folder's commit (gpt_train.checkpoint), its lock (gpt_train.run_lock).
"""
import contextlib
import datetime
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import threading
import time

from gpt_train import run_lock
from gpt_train.errors import UserError, first_line
from gpt_train.files import file_problem, manifest, remove_path, write_json
from gpt_train.out_dir import (COMMITTED_DIR, HUB_SNAPSHOT_PREFIX, LOCK, LOSS_CHART, METRICS, RUN_CONFIG,
                               SAVED_FOLDERS_OLD, STAGING_DIR, STATE_DIR, TENSORBOARD_DIR, TrainerState,
                               written_by_gpt_train)

URL = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://")
CHECKPOINTS = "checkpoints"
LEASE = ".gpt-train.lease"
MANIFEST_FORMAT = "gpt-train checkpoint manifest 1"
LOGS = (METRICS, LOSS_CHART, RUN_CONFIG)  # replaced on the store after each checkpoint and at the end
NOT_PUBLISHED = (LOCK, STAGING_DIR, COMMITTED_DIR, TENSORBOARD_DIR, *SAVED_FOLDERS_OLD)
LEASE_REFRESH_S = float(os.environ.get("GPT_TRAIN_LEASE_REFRESH_S", 20))
LEASE_STALE_S = float(os.environ.get("GPT_TRAIN_LEASE_STALE_S", 120))  # unrefreshed this long: its run is gone
SYNC_WAIT_S = 600  # how long a launched process waits for its machine's main process to bring the run over
# the packages fsspec names for the common schemes, for a one-line install hint
PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs",
            "hf": "huggingface_hub"}


def is_url(name):
    return isinstance(name, str) and bool(URL.match(name))


def cache_root():
    """Where local copies of store folders live: $GPT_TRAIN_CACHE, else ~/.cache/gpt-train."""
    default = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "gpt-train")
    return os.environ.get("GPT_TRAIN_CACHE") or default


def _key(url):
    return hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]


def working_copy(url):
    """The local folder a training run with out_dir=`url` works in."""
    return os.path.join(cache_root(), "runs", _key(url))


class Store:
    """The folder `url` on its filesystem; every failure of the store is one line naming the URL."""

    def __init__(self, url, setting="out_dir"):
        import fsspec  # deferred: a local run never needs it

        self.url, self.setting = url.rstrip("/"), setting
        scheme = URL.match(url)["scheme"]
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url)
        except ImportError as e:
            package = PACKAGES.get(scheme)
            install = f"pip install {package}" if package else f"install the fsspec filesystem for {scheme}://"
            raise UserError(f"{setting}={url!r} is on {scheme}://, whose filesystem is not installed "
                            f"({first_line(e)}): {install}") from None
        except ValueError as e:
            raise UserError(f"{setting}={url!r}: fsspec knows no {scheme}:// filesystem ({first_line(e)}); "
                            "give a local folder or a URL of an installed filesystem (s3://, gs://, ...)") from None
        self.root = self.root.rstrip("/")

    def path(self, *names):
        return "/".join([self.root, *names])

    def failed(self, doing, error):
        return UserError(f"could not {doing} {self.url} ({first_line(error)}): {_advice(error)}")

    # -- reading ---------------------------------------------------------------------------------
    def newest(self):
        """(name, manifest) of the newest checkpoint whose manifest exists, or (None, None)."""
        try:
            self.fs.invalidate_cache()
            manifests = [os.path.basename(e["name"]) for e in self.fs.ls(self.path(CHECKPOINTS), detail=True)
                         if e["type"] == "file" and e["name"].endswith(".json")]
        except Exception as e:  # a bucket that does not exist, credentials refused, the network
            if _missing_bucket(e):
                raise UserError(f"{self.setting}={self.url!r}: the bucket does not exist ({first_line(e)}): "
                                "create it first, or correct the URL") from None
            if not isinstance(e, FileNotFoundError):
                raise self.failed("list", e) from None
            manifests = []
        found = []
        for name in manifests:
            record = self._read_manifest(name)
            found.append((record["iteration"], record["written"], name[:-len(".json")], record))
        if not found:
            return None, None
        _, _, name, newest = max(found, key=lambda f: (f[0], f[1]))
        return name, newest

    def _read_manifest(self, name):
        path = self.path(CHECKPOINTS, name)
        try:
            found = json.loads(self.fs.cat_file(path))
            assert found["format"] == MANIFEST_FORMAT and isinstance(found["files"], dict)
            int(found["iteration"]), float(found["written"])
        except (ValueError, KeyError, TypeError, AssertionError) as e:
            raise UserError(f"the checkpoint manifest {self.url}/{CHECKPOINTS}/{name} is damaged ({first_line(e)}): "
                            "delete it (its checkpoint is then ignored), or restore it") from None
        except Exception as e:
            raise self.failed("read", e) from None
        return found

    def download(self, name, files, dest):
        """The objects `files` (manifest entries) of checkpoint `name` into dest, each checked against
        the manifest; a file already there with the same digest is kept. Returns the names fetched."""
        fetched = []
        for rel, expected in sorted(files.items()):
            local = os.path.join(dest, *rel.split("/"))
            if os.path.isfile(local) and file_problem(local, expected) is None:
                continue
            os.makedirs(os.path.dirname(local), exist_ok=True)
            partial = local + ".download"
            try:
                self.fs.get_file(self.path(CHECKPOINTS, name, rel), partial)
            except FileNotFoundError:
                raise UserError(f"the checkpoint {self.url}/{CHECKPOINTS}/{name} is damaged: {rel} is missing. It "
                                "cannot be read; restore it, or delete its manifest to fall back on none") from None
            except Exception as e:
                raise self.failed("download from", e) from None
            problem = file_problem(partial, expected)
            if problem:
                os.remove(partial)
                raise UserError(f"the checkpoint {self.url}/{CHECKPOINTS}/{name} is damaged: {rel} {problem}. It "
                                "cannot be read; restore it, or delete its manifest to fall back on none")
            os.replace(partial, local)
            fetched.append(rel)
        return fetched

    # -- writing ---------------------------------------------------------------------------------
    def publish(self, folder, iteration, lease):
        """Upload the committed checkpoint in `folder`: its objects, then (if this run still holds
        the lease) its manifest, then the previous checkpoints go. Returns the checkpoint's name."""
        name = f"{iteration:010d}-{secrets.token_hex(4)}"
        files, logs = _digests(folder, _published_files(folder))
        try:
            for rel in sorted(files):
                if rel in logs:
                    self.fs.pipe_file(self.path(CHECKPOINTS, name, rel), logs[rel])
                else:
                    self.fs.put_file(os.path.join(folder, *rel.split("/")), self.path(CHECKPOINTS, name, rel))
        except Exception as e:
            raise self.failed(f"upload the checkpoint at iteration {iteration:,} to", e) from None
        lease.check()  # a run that lost the lease commits nothing over its successor's
        record = {"format": MANIFEST_FORMAT, "iteration": iteration, "written": time.time(), "files": files}
        try:
            self.fs.pipe_file(self.path(CHECKPOINTS, name + ".json"), json.dumps(record, indent=1).encode())
        except Exception as e:
            raise self.failed(f"write the manifest of the checkpoint at iteration {iteration:,} to", e) from None
        self.delete_checkpoints(keep=name)
        return name

    def delete_checkpoints(self, keep=None):
        """Every checkpoint but `keep`, manifests first: a reader never finds a manifest whose objects
        are going; objects no manifest names (an upload that was cut short) go too."""
        try:
            entries = [os.path.basename(p) for p in self.fs.ls(self.path(CHECKPOINTS), detail=False)]
        except FileNotFoundError:
            return
        stems = {e[:-len(".json")] if e.endswith(".json") else e for e in entries} - {keep}
        for stem in sorted(stems):
            if stem + ".json" in entries:
                self.fs.rm_file(self.path(CHECKPOINTS, stem + ".json"))
        for stem in sorted(stems):
            if stem in entries:
                self.fs.rm(self.path(CHECKPOINTS, stem), recursive=True)

    def publish_logs(self, folder):
        for name in LOGS:
            local = os.path.join(folder, name)
            if os.path.isfile(local):
                try:
                    self.fs.put_file(local, self.path(name))
                except Exception as e:
                    raise self.failed(f"upload {name} to", e) from None

    def delete_run(self):
        """What gpt-train wrote under the URL (overwrite_output_dir); nothing else there. The names removed."""
        removed = [CHECKPOINTS] if self.fs.exists(self.path(CHECKPOINTS)) else []
        self.delete_checkpoints()
        if self.fs.exists(self.path(CHECKPOINTS)):
            self.fs.rm(self.path(CHECKPOINTS), recursive=True)
        for path in self.fs.ls(self.root, detail=False) if self.fs.exists(self.root) else []:
            name = os.path.basename(path.rstrip("/"))
            if written_by_gpt_train(name) and name not in NOT_PUBLISHED:
                self.fs.rm(path, recursive=True)
                removed.append(name)
        return sorted(set(removed))


def _published_files(folder):
    """The checkpoint's files in the working copy, relative to it: what gpt-train wrote there but
    its lock, its commit's temporary folders and TensorBoard's event files (appended to as it runs)."""
    names = []
    for entry in sorted(os.listdir(folder)):
        if not written_by_gpt_train(entry) or entry in NOT_PUBLISHED or entry.startswith(HUB_SNAPSHOT_PREFIX):
            continue
        path = os.path.join(folder, entry)
        if os.path.isdir(path):
            names += [os.path.relpath(os.path.join(root, n), folder) for root, _, found in os.walk(path) for n in found]
        else:
            names.append(entry)
    return names


def _digests(folder, names):
    """(the manifest entries of `names`, {log name: its bytes}). The logs grow while a background
    save uploads (async_save: the loop appends to metrics.jsonl and redraws loss.png meanwhile), so
    each is read once, and what is digested is what is sent. The checkpoint's own files stay as
    committed until the next save, which waits for this one: their digests are the local commit's
    (trainer_state.json's manifest), the rest (trainer_state.json itself) hashed here."""
    logs, entries = {}, {}
    for rel in [rel for rel in names if rel in LOGS]:
        with open(os.path.join(folder, rel), "rb") as f:
            logs[rel] = f.read()
        entries[rel] = {"size": len(logs[rel]), "sha256": hashlib.sha256(logs[rel]).hexdigest()}
    state = TrainerState.read_if_any(folder)
    known = state.files if state else {}
    for rel in names:
        if rel not in logs and rel in known and "sha256" in known[rel] and \
                os.path.getsize(os.path.join(folder, rel)) == known[rel].get("size"):
            entries[rel] = known[rel]
    return {**entries, **manifest(folder, [rel for rel in names if rel not in entries])}, logs


def _missing_bucket(error):
    return "NoSuchBucket" in str(error) or "bucket does not exist" in str(error).lower()


def _advice(error):
    text = str(error)
    if isinstance(error, PermissionError) or any(word in text for word in ("AccessDenied", "InvalidAccessKeyId",
                                                                          "SignatureDoesNotMatch", "credentials")):
        return "check the credentials (AWS_ACCESS_KEY_ID/AWS_PROFILE and the like) and the bucket's permissions"
    return "check the URL and that the store is reachable, then run again (a resume continues from the last checkpoint)"


class Lease:
    """The store's one-writer object, URL/.gpt-train.lease: created only where none exists (S3's
    If-None-Match: *), refreshed while the run lives, taken over only once stale. A run that finds
    it taken over (a stale lease it could not refresh in time) commits nothing more."""

    def __init__(self, store):
        self.store, self.path = store, store.path(LEASE)
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        self.holder = f"pid {os.getpid()} on {socket.gethostname()}, since {started}"
        self.token, self.etag, self.lost = secrets.token_hex(8), None, None
        self._stop = threading.Event()
        self._thread = None

    def _body(self):
        return json.dumps({"holder": self.holder, "token": self.token, "refreshed": time.time(),
                           "host": socket.gethostname(), "pid": os.getpid()}).encode()

    def take(self):
        fs = self.store.fs
        try:
            fs.pipe_file(self.path, self._body(), mode="create")
        except FileExistsError:
            self._take_over_if_stale()
        except Exception as e:
            if _missing_bucket(e):
                raise UserError(f"{self.store.setting}={self.store.url!r}: the bucket does not exist "
                                f"({first_line(e)}): create it first, or correct the URL") from None
            raise self.store.failed("write to", e) from None
        self.etag = self._etag()
        self._thread = threading.Thread(target=self._refresh, name="gpt-train-lease", daemon=True)
        self._thread.start()
        return self

    def _take_over_if_stale(self):
        held, etag = self._read()
        age = time.time() - held.get("refreshed", 0)
        if age < LEASE_STALE_S and not _gone(held):
            raise UserError(f"{self.store.url} is in use by another training run ({held.get('holder', 'unknown')}, "
                            f"seen {age:.0f} s ago): wait for it to end or stop it, or use another out_dir")
        why = "its process is gone" if _gone(held) else f"it was not refreshed for {age:.0f} s"
        print(f"note: {self.store.url}'s lease was held by {held.get('holder')}, and {why}: that run is gone, this "
              "one takes over")
        self._replace(etag)

    def _read(self):
        fs = self.store.fs
        fs.invalidate_cache(self.path)
        try:
            info = fs.info(self.path)
            body = json.loads(fs.cat_file(self.path))
        except FileNotFoundError:
            return {}, None
        except ValueError:  # unreadable: treated as stale
            return {}, None
        return body, info.get("ETag")

    def _etag(self):
        self.store.fs.invalidate_cache(self.path)
        return self.store.fs.info(self.path).get("ETag")

    def _replace(self, etag):
        """Overwrite the lease only if it is still the one read (its ETag): S3's If-Match."""
        fs = self.store.fs
        if etag and hasattr(fs, "call_s3"):
            bucket, key, _ = fs.split_path(self.path)
            try:
                fs.call_s3("put_object", Bucket=bucket, Key=key, Body=self._body(), IfMatch=etag)
            except OSError as e:  # 412: another run replaced it first
                raise UserError(f"{self.store.url} was taken by another run as this one started ({first_line(e)}): "
                                "wait for it to end or stop it, or use another out_dir") from None
        else:  # a filesystem without conditional writes: the race window is one refresh
            fs.pipe_file(self.path, self._body())

    def _refresh(self):
        while not self._stop.wait(LEASE_REFRESH_S):
            try:
                held, etag = self._read()
                if held.get("token") != self.token:
                    self.lost = held.get("holder", "another run")
                    return
                self._replace(etag)
            except Exception as e:  # a network error: the next refresh tries again before the lease goes stale
                print(f"warning: could not refresh {self.path}'s lease ({first_line(e)}); trying again")

    def check(self):
        """Raise unless this run still holds the lease."""
        if self.lost is None:
            held, _ = self._read()
            if held.get("token") != self.token:
                self.lost = held.get("holder", "nobody")
        if self.lost is not None:
            raise UserError(f"{self.store.url} was taken over by another run ({self.lost}) while this one could not "
                            "refresh its lease: this run stops; its last checkpoint is in its working copy")

    def release(self):
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=30)
        try:
            held, _ = self._read()
            if held.get("token") == self.token:
                self.store.fs.rm_file(self.path)
        except Exception:  # the store went away: the lease goes stale and is taken over
            pass


def _gone(held):
    """Whether the lease's holder ran on this machine and has ended (killed, restarted): no need to
    wait for its lease to go stale."""
    if held.get("host") != socket.gethostname() or not isinstance(held.get("pid"), int):
        return False
    try:
        os.kill(held["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


class StoreHome:
    """out_dir on a store for a training run: the working copy brought up to date with the store
    (`sync`), the run held on both (`hold`), and each checkpoint published (`after_save`)."""

    def __init__(self, url):
        self.store = Store(url)
        self.url, self.folder = self.store.url, working_copy(url)
        self.lease = None

    def sync(self):
        """The working copy made the store's newest checkpoint (or empty when it has none), on the
        machine's main process; the others wait for it. Only under the working copy's own lock: a
        run training in it here is never overwritten."""
        name, newest = self.store.newest()
        os.makedirs(self.folder, exist_ok=True)
        marker = self.folder + ".synced"
        if os.environ.get("LOCAL_RANK", "0") != "0":
            _wait_for(marker, name)
            return
        with run_lock.hold(self.folder):
            for entry in os.listdir(self.folder):  # what the store does not have goes: the store is the run
                if written_by_gpt_train(entry) and entry != TENSORBOARD_DIR and (
                        newest is None or not _in(entry, newest["files"])):
                    remove_path(os.path.join(self.folder, entry))
            if newest is not None:
                fetched = self.store.download(name, newest["files"], self.folder)
                if fetched:
                    print(f"brought the checkpoint at iteration {newest['iteration']:,} from {self.url} into "
                          f"{self.folder} ({len(fetched)} files)")
            write_json(marker, {"checkpoint": name})

    def hold(self, folder):
        """The working copy's lock, then the store's lease: one writer here and there."""
        lock = run_lock.hold(folder)
        try:
            self.lease = Lease(self.store).take()
        except BaseException:
            lock.release()
            raise
        return _Held(lock, self.lease)

    def check_processes(self, processes):
        """Every process writes its part of the training state into its machine's working copy,
        which only the main machine publishes: one machine for now."""
        local = int(os.environ.get("LOCAL_WORLD_SIZE", processes.num_processes))
        if processes.num_processes > local:
            raise UserError(f"out_dir={self.url!r} is on a store, which gpt-train trains into from one machine "
                            f"({processes.num_processes} processes, {local} on this one): for several machines, "
                            "give an out_dir on a filesystem they all see (docs/scaling.md)")

    @contextlib.contextmanager
    def naming(self):
        """Errors name the URL the user gave, not the working copy."""
        try:
            yield
        except UserError as e:
            raise type(e)(str(e).replace(self.folder, self.url)) from None

    def opened(self, folder, replace):
        if replace and _main_process():
            removed = self.store.delete_run()
            if removed:
                print(f"overwrite_output_dir: removed the previous run in {self.url}: {', '.join(removed)}")

    def after_save(self, folder, iteration):
        if not _main_process():  # the main process writes the model folder; the rest is on the same disk
            return
        name = self.store.publish(folder, iteration, self.lease)
        self.store.publish_logs(folder)
        print(f"uploaded the checkpoint at iteration {iteration:,} to {self.url}/{CHECKPOINTS}/{name}")

    def finish(self, folder, iteration):
        if _main_process():
            self.store.publish_logs(folder)
            print(f"the run is on {self.url}: sample from it with python sample.py --out_dir={self.url}")


class _Held:
    def __init__(self, lock, lease):
        self.lock, self.lease = lock, lease

    def release(self):
        self.lease.release()
        self.lock.release()


def _main_process():
    from accelerate import PartialState  # deferred: readers of a store never start Accelerate

    return PartialState().is_main_process


def _in(entry, files):
    return entry in files or any(rel.startswith(entry + "/") for rel in files)


def _wait_for(marker, name):
    deadline = time.monotonic() + SYNC_WAIT_S
    while time.monotonic() < deadline:
        try:
            with open(marker, encoding="utf-8") as f:
                if json.load(f).get("checkpoint") == name:
                    return
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    raise UserError(f"this machine's main process did not bring the run over from the store in {SYNC_WAIT_S} s")


def model_folder(url, setting):
    """A local, checked copy of the model in the newest checkpoint at `url`, for readers (sample.py,
    gpt-eval, convert, push, init_from): cached by checkpoint, so a second read downloads nothing.
    The training state stays on the store: readers need the model alone."""
    store = Store(url, setting)
    name, newest = store.newest()
    if newest is None:
        raise UserError(f"{setting}={url!r} holds no checkpoint (no {CHECKPOINTS}/*.json manifest): train a model "
                        "there first")
    folder = os.path.join(cache_root(), "models", _key(url), name)
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    with _locked(os.path.dirname(folder) + ".lock"):  # two readers at once: one downloads
        if not os.path.isdir(folder):
            partial = folder + ".partial"  # what a killed download left is checked, and kept where whole
            os.makedirs(partial, exist_ok=True)
            model_files = {rel: entry for rel, entry in newest["files"].items()
                           if not rel.startswith(STATE_DIR + "/") and rel not in LOGS}
            store.download(name, model_files, partial)
            os.rename(partial, folder)
            for other in os.listdir(os.path.dirname(folder)):  # the same URL's older checkpoints
                if other != name:
                    shutil.rmtree(os.path.join(os.path.dirname(folder), other), ignore_errors=True)
    return folder


class _locked:
    def __init__(self, path):
        self.path = path

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc):
        os.close(self.fd)


def readable(folder, setting):
    """A model folder a reader can open: `folder` itself, or for a store URL its local copy."""
    return model_folder(folder, setting) if is_url(folder) else folder


class LocalHome:
    """out_dir on this machine's disk: the lock alone; the run folder is the published copy."""

    hold = staticmethod(run_lock.hold)
    naming = staticmethod(contextlib.nullcontext)

    def check_processes(self, processes):
        pass

    def opened(self, folder, replace):
        pass

    def after_save(self, folder, iteration):
        pass

    def finish(self, folder, iteration):
        pass


def home_of(out_dir):
    """Where out_dir lives: StoreHome for a URL (after bringing its run over), else LocalHome."""
    if not is_url(out_dir):
        return LocalHome()
    home = StoreHome(out_dir)
    home.sync()
    return home
