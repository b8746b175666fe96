"""When a checkpoint is written: at once (the default), or with async_save=True on a background
thread while training goes on.

In the background the loop stops only to copy the state to host memory (gpt_train.checkpoint's
`later`); the writes, the digests, the manifest and the commit, then what follows a save (a store's
upload, the Hub push), run on one thread, in order. A save waits for the one before it; a failed
background save (a full disk, an unreachable store) stops the run at the next step boundary with
the same one line as a save in the loop, the last complete checkpoint intact; the end of the run,
a stop signal's save and an error on the way out wait for what is in flight.

Not here: what a checkpoint holds and how it is committed (gpt_train.checkpoint).
"""
from concurrent.futures import ThreadPoolExecutor

from gpt_train.checkpoint import save_checkpoint


class Saver:
    """Every checkpoint of a run goes through here: written, judged (lm_eval_tasks), then handed to
    the publishers in order (a store's copy, the Hub), each with `after_save(out_dir, iteration)`
    and, at the run's end, `finish(out_dir, iteration)`."""

    def __init__(self, background=False, judge=None, publishers=()):
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="gpt-train-save") if background else None
        self.judge, self.publishers = judge, list(publishers)
        self.pending = []

    def save(self, accelerator, model, tokenizer, out_dir, trainer_state, process_state=None):
        """Write a checkpoint (every process calls this); in the background, return once the main
        process holds a copy of the state."""
        self.wait()  # one save at a time: its files are the next one's previous checkpoint
        rest = save_checkpoint(accelerator, model, tokenizer, out_dir, trainer_state, process_state,
                               later=self.pool is not None)
        if rest is not None:
            self.pending.append(self.pool.submit(rest))
        iteration = trainer_state.iter_num
        if self.judge:  # lm-eval reads the committed folder, before the push: the Hub gets its scores too
            self.judge(accelerator, iteration, keep=True, ready=self.wait)
        self._then(lambda: [publisher.after_save(out_dir, iteration) for publisher in self.publishers])

    def _then(self, step):
        """`step()` once the checkpoint saved last is committed: now, or after it on the save thread."""
        if self.pool is None:
            step()
        else:
            self.pending.append(self.pool.submit(step))

    def finish(self, out_dir, iteration):
        """At the run's end, once the last save is in: each publisher's last word (logs, the final push)."""
        self.wait()
        for publisher in self.publishers:
            publisher.finish(out_dir, iteration)

    def check(self):
        """At a step boundary: raise what a background save or upload failed with."""
        for future in self.pending:
            if future.done() and future.exception() is not None:
                self.pending = []
                raise future.exception()

    def wait(self):
        """Until what is in flight has ended; raise what failed."""
        pending, self.pending = self.pending, []
        for future in pending:
            future.result()

    def close(self):
        """Let what is in flight end (a run stopped by an error still keeps its last save)."""
        if self.pool is not None:
            self.pool.shutdown(wait=True)
