"""`t5forge plot RUN_DIR [--output DIR]`: PNG training curves from a run's metrics.jsonl."""

from __future__ import annotations

HELP = "plot loss, learning rate and throughput curves of a run as PNG files"


def add_arguments(parser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run directory (the out_dir of a pretrain/finetune run)")
    parser.add_argument("--output", metavar="DIR", default=None, help="where to write the PNGs (default RUN_DIR/plots)")


def run(args) -> int:
    from t5forge.plot import plot_run

    for path in plot_run(args.run_dir, args.output):
        print(path)
    return 0
