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
    "ablate": "t5forge.commands.ablate",
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
    from t5forge import __version__

    parser = argparse.ArgumentParser(
        prog="t5forge",
        description="Pre-train and fine-tune T5-style encoder-decoder models.",
    )
    parser.add_argument("--version", action="version", version=f"t5forge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in _available_commands().items():
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


# The positional that holds a command's config items (task=, config=, a.b=value).
ITEMS_METAVAR = "KEY=VALUE"


def _takes_items(parser: argparse.ArgumentParser) -> bool:
    """Whether `parser` (or one of its subcommands) takes KEY=VALUE config items."""
    for action in parser._actions:
        if action.metavar == ITEMS_METAVAR:
            return True
        if isinstance(action, argparse._SubParsersAction) and any(map(_takes_items, action.choices.values())):
            return True
    return False


def _command_parser(parser: argparse.ArgumentParser, args) -> argparse.ArgumentParser | None:
    """The subcommand's parser that `args` came from, or None."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices.get(getattr(args, "command", None))
    return None


def _flag_style_hint(unknown: list[str], argv: list[str]) -> str | None:
    """For `--optim.base_lr 1e-3` / `--optim.base_lr=1e-3`: the KEY=VALUE item meant, as one line."""
    from t5forge.config import is_key

    for item in unknown:
        if not item.startswith("--"):
            continue
        name, sep, value = item[2:].partition("=")
        written = item
        if not sep:
            following = argv[argv.index(item) + 1:]
            if following and not following[0].startswith("-") and "=" not in following[0]:
                value, written = following[0], f"{item} {following[0]}"
            else:
                value = "VALUE"
        key = next((k for k in (name, name.replace("-", "_")) if k in ("task", "config") or is_key(k)), None)
        if key is None:
            return (f"unknown option {item}; config keys are written KEY=VALUE without dashes "
                    "(t5forge pretrain --list-keys lists them)")
        return f"{written!r}: config keys take no dashes; write {key}={value}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        command_parser = _command_parser(parser, args)
        if command_parser is not None and _takes_items(command_parser):
            hint = _flag_style_hint(unknown, argv)
            if hint:
                print(f"t5forge {args.command}: error: {hint}", file=sys.stderr)
                return 2
            if hasattr(args, "items") and not any(u.startswith("-") for u in unknown):
                # KEY=VALUE items after an option (`task=pt_cpu --print-config a.b=1`): argparse fills
                # the positional once and leaves the rest over; they keep their argv order.
                args.items = [*args.items, *unknown]
                unknown = []
        if unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
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
