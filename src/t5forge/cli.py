"""The `t5forge` command line: one subcommand per module in `t5forge.commands`.

Each command module exposes `HELP` (one line), `add_arguments(parser)` and `run(args) -> int`.
Command modules import heavy libraries (torch, datasets) inside `run`, so `t5forge --help` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from t5forge.errors import EXIT_ABORTED, RunStopped, T5ForgeError

# name -> module; a command whose module is not there yet is simply not offered.
COMMANDS = {
    "pretrain": "t5forge.commands.pretrain",
    "finetune": "t5forge.commands.finetune",
    "evaluate": "t5forge.commands.evaluate",
    "generate": "t5forge.commands.generate",
    "export": "t5forge.commands.export",
    "tokenizer": "t5forge.commands.tokenizer",
    "data": "t5forge.commands.data",
    "plot": "t5forge.commands.plot",
}


def _available_commands() -> dict:
    found = {}
    for name, module_name in COMMANDS.items():
        try:
            found[name] = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name != module_name:  # a real import error inside the module: surface it
                raise
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="t5forge",
        description="Pre-train and fine-tune T5-style encoder-decoder models.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in _available_commands().items():
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 2
    from t5forge.console import show_messages

    show_messages()  # every command's INFO lines on stdout (rank 0), warnings on stderr
    try:
        return int(args._run(args) or 0)
    except RunStopped as err:
        print(f"t5forge {args.command}: {err}", file=sys.stderr)
        return err.exit_code
    except T5ForgeError as err:
        print(f"t5forge {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"t5forge {args.command}: interrupted; nothing was saved since the last checkpoint", file=sys.stderr)
        return EXIT_ABORTED



if __name__ == "__main__":
    sys.exit(main())
