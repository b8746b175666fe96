"""Loss curves: out_dir/loss.png during training, and a command to compare runs.

    python -m gpt_train.plot OUT_DIR [OUT_DIR ...] [--output=FILE] [--bits_per_byte]

Everything is read from each run's metrics.jsonl (and training_config.json for the tokens
per iteration), so it works on a finished run, a running one, or a copied folder. The chart
shows train and val loss against iteration, tokens on the top axis, val bits per byte on the
right axis, and the learning rate below; `--bits_per_byte` plots val bits per byte instead,
which compares runs with different tokenizers. matplotlib is imported only to draw, with the
file-only Agg backend: training startup pays nothing and no display is needed.

Not here: writing metrics (gpt_train.metrics), reading the file (gpt_train.out_dir).
"""
import os
import sys
import time
from dataclasses import dataclass, field

from gpt_train.cli import command_parser
from gpt_train.errors import UserError, exit_on_user_error
from gpt_train.files import atomic_path
from gpt_train.out_dir import LOSS_CHART, MetricsReader, run_tokens_per_iter

COMPARISON_FILE = "loss_comparison.png"  # several runs have no single out_dir to write into
MAX_STEP_POINTS = 4000  # more step losses than pixels only cost drawing time: thin them out
FIGURE_INCHES = (9, 6.5)
DPI = 110  # ~1000 px wide: sharp on a screen, ~100 KB on disk
# A redraw costs ~0.3 s of a CPU (~0.6 s the first, with matplotlib's import): during training the
# chart takes at most this share of the run's time, so a run of seconds draws once, at its end, and
# a run of hours after every eval as before.
LIVE_DRAW_SHARE = 0.01
FIRST_DRAW_SECONDS = 0.6  # the cost assumed before the first draw has measured it


@dataclass
class RunCurves:
    """One run's curves; each list is sorted by iteration, a resumed run's repeats replaced."""

    name: str
    tokens_per_iter: int | None
    step: list = field(default_factory=list)  # (iter, train step loss)
    evals: list = field(default_factory=list)  # (iter, train loss, val loss)
    lr: list = field(default_factory=list)  # (iter, learning rate)
    bpb: list = field(default_factory=list)  # (iter, val bits per byte)

    @property
    def best(self):
        return min(self.evals, key=lambda e: e[2]) if self.evals else None


class CurvesReader:
    """A run's curves from its metrics.jsonl, each call folding in only the records added since."""

    def __init__(self, out_dir):
        self.out_dir, self.metrics = out_dir, MetricsReader(out_dir)
        self.seen = 0
        self.step, self.evals, self.lr, self.bpb = {}, {}, {}, {}

    def curves(self, name=None):
        records = self.metrics.read()
        for record in records[self.seen:]:
            it = record.get("iter")
            # Later lines win: after a resume the replayed iterations are the ones that count.
            if record.get("event") == "train" and "train/step_loss" in record:
                self.step[it] = record["train/step_loss"]
            elif record.get("event") == "eval" and "val/loss" in record:
                self.evals[it] = (record["train/loss"], record["val/loss"])
                if "val/bpb" in record:
                    self.bpb[it] = record["val/bpb"]
            if "lr" in record:
                self.lr[it] = record["lr"]
        self.seen = len(records)
        return RunCurves(name or os.path.basename(os.path.normpath(self.out_dir)) or self.out_dir,
                         run_tokens_per_iter(self.out_dir), sorted(self.step.items()),
                         [(i, *self.evals[i]) for i in sorted(self.evals)], sorted(self.lr.items()),
                         sorted(self.bpb.items()))


def draw(runs, output, bits_per_byte=False):
    """Draw `runs` on one chart and write it to `output` atomically (a viewer never sees half a PNG)."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter

    fig = Figure(figsize=FIGURE_INCHES, dpi=DPI, layout="constrained")
    ax_loss, ax_lr = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    same_tokens = len({r.tokens_per_iter for r in runs}) == 1 and runs[0].tokens_per_iter
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for n, run in enumerate(runs):
        color = colors[n % len(colors)]
        label = run.name if len(runs) > 1 else ""
        if run.tokens_per_iter and not same_tokens:
            label += f" ({run.tokens_per_iter:,} tok/iter)"
        prefix = f"{label.strip()}: " if label.strip() else ""
        if bits_per_byte:
            ax_loss.plot(*zip(*run.bpb), "-o", color=color, markersize=4, linewidth=2, label=f"{prefix}val")
        elif run.step:
            stride = -(-len(run.step) // MAX_STEP_POINTS)
            ax_loss.plot(*zip(*run.step[::stride]), color=color, alpha=0.3, linewidth=0.8,
                         label=f"{prefix}train (step)")
        if run.evals and not bits_per_byte:
            iters, train, val = zip(*run.evals)
            ax_loss.plot(iters, train, "--o", color=color, markersize=3, label=f"{prefix}train (eval)")
            ax_loss.plot(iters, val, "-o", color=color, markersize=4, linewidth=2, label=f"{prefix}val")
            best_iter, _, best_val = run.best
            ax_loss.annotate(f"best val {best_val:.4f}\n@ iter {best_iter:,}", (best_iter, best_val),
                             textcoords="offset points", xytext=(-20, 28), ha="right", fontsize=8, color=color,
                             bbox={"boxstyle": "round", "facecolor": "white", "edgecolor": color, "alpha": 0.85},
                             arrowprops={"arrowstyle": "->", "color": color})
        if run.lr:
            ax_lr.plot(*zip(*run.lr), color=color, label=label or None)
    ax_loss.set_ylabel("val bits per byte" if bits_per_byte else "loss")
    ratios = {_bits_per_byte_per_nat(r) for r in runs}
    if len(ratios) == 1 and None not in ratios and not bits_per_byte:  # one val text and tokenizer: one scale
        ratio = ratios.pop()
        ax_loss.secondary_yaxis("right", functions=(lambda x: x * ratio, lambda b: b / ratio)).set_ylabel(
            "val bits per byte")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend(fontsize=8, loc="upper right")
    ax_loss.set_title(runs[0].name if len(runs) == 1 else f"{len(runs)} runs")
    if same_tokens:
        tpi = runs[0].tokens_per_iter
        top = ax_loss.secondary_xaxis("top", functions=(lambda i: i * tpi, lambda t: t / tpi))
        top.set_xlabel(f"tokens ({tpi:,} per iteration)")
        top.xaxis.set_major_formatter(EngFormatter())
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("iteration")
    ax_lr.grid(alpha=0.3)
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    with atomic_path(output) as tmp:
        fig.savefig(tmp, format="png")


def _bits_per_byte_per_nat(run):
    """val bits per byte / val loss: fixed by the run's val text and tokenizer; None if not logged."""
    if not run.bpb:
        return None
    iteration, bpb = run.bpb[-1]
    val = next(v for i, _, v in reversed(run.evals) if i == iteration)
    return round(bpb / val, 9)  # equal runs give equal ratios despite float noise


class LivePlot:
    """Redraws out_dir/loss.png after an eval (LIVE_DRAW_SHARE of the time at most) and after the
    last one, on the main process only; out_dir None: never."""

    def __init__(self, accelerator, out_dir):
        self.print, self.out_dir = accelerator.print, out_dir
        self.enabled = accelerator.is_main_process and out_dir is not None
        self.reader = CurvesReader(out_dir) if self.enabled else None
        self.drawn_at, self.draw_seconds = time.monotonic(), FIRST_DRAW_SECONDS

    def update(self, last=False):
        if not self.enabled:
            return
        start = time.monotonic()
        if not last and (start - self.drawn_at) * LIVE_DRAW_SHARE < self.draw_seconds:
            return  # drawn too recently for what a draw costs: the next eval's (or the last) will
        try:
            draw([self.reader.curves()], os.path.join(self.out_dir, LOSS_CHART))
            self.drawn_at = time.monotonic()
            self.draw_seconds = self.drawn_at - start
        except ImportError:
            self.enabled = False
            self.print("matplotlib is not installed: no loss.png (pip install -r requirements.txt)")


@exit_on_user_error
def main(argv=None):
    parser = command_parser("python -m gpt_train.plot", "Draws the runs' metrics.jsonl on one chart.")
    parser.add_argument("out_dirs", nargs="+", metavar="OUT_DIR", help="the out_dir of a run, finished or running")
    parser.add_argument("--bits_per_byte", action="store_true",
                        help="plot val bits per byte: runs with different tokenizers on the same text compare")
    parser.add_argument("--output", help=f"the PNG to write; default OUT_DIR/{LOSS_CHART} for one run, "
                                         f"{COMPARISON_FILE} for several")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    dirs = args.out_dirs
    output = args.output or (os.path.join(dirs[0], LOSS_CHART) if len(dirs) == 1 else COMPARISON_FILE)
    names = [os.path.basename(os.path.normpath(d)) for d in dirs]
    if len(set(names)) < len(names):  # out-a/run and out-b/run: the paths below their common folder differ
        common = os.path.commonpath([os.path.abspath(d) for d in dirs])
        names = [os.path.relpath(os.path.abspath(d), common) for d in dirs]
    runs = [CurvesReader(d).curves(name) for d, name in zip(dirs, names)]
    if not any(r.step or r.evals for r in runs):
        raise UserError("no losses logged yet in " + ", ".join(dirs))
    without = [d for d, r in zip(dirs, runs) if args.bits_per_byte and not r.bpb]
    if without:
        raise UserError(f"{without[0]} has no val/bpb in its metrics.jsonl (a run from before gpt-train "
                        "logged bits per byte): plot it without --bits_per_byte")
    draw(runs, output, args.bits_per_byte)
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
