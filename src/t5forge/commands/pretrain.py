"""`t5forge pretrain [task=NAME] [config=PATH] [a.b=value ...] [--print-config | --list-keys]`: pre-training.

The items are resolved by `t5forge.config_files.load_config` (defaults < preset < file < overrides);
`--print-config` prints the resolved YAML and `--list-keys` every key with its resolved value, and
exit; otherwise the run goes to `t5forge.train.pretrain.run_pretrain(cfg)`. An empty `out_dir`
becomes `runs/pretrain-<date>-<time>` and local paths become absolute (`with_run_dir`), so that the
saved config names the directory the run really wrote and reruns from any working directory.
"""


HELP = "pre-train a T5 with span corruption (nanoT5 keys: task=pt_8h optim.base_lr=2e-2 ...)"


def add_arguments(parser) -> None:
    parser.add_argument(
        "items", nargs="*", metavar="KEY=VALUE",
        help="task=PRESET, config=FILE.yaml and config overrides like optim.batch_size=256",
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    parser.add_argument("--list-tasks", action="store_true", help="list the presets (task=NAME) and exit")
    parser.add_argument("--list-keys", action="store_true",
                        help="list every config key with its value (the defaults, or those of the task=, config= "
                             "and overrides given) and exit")


def print_keys(rows) -> None:
    """One line per key: name, value, help, [what the value must be] (also `t5forge finetune --list-keys`)."""
    for key, kind, value, doc, constraint in rows:
        print(f"{key:40s} {value:22s} {doc}" + (f" [{constraint}]" if constraint else ""))


def run(args) -> int:
    from t5forge.config import describe_keys
    from t5forge.config_files import config_to_yaml, load_config, with_run_dir
    from t5forge.errors import T5ForgeError
    from t5forge.presets import DESCRIPTIONS

    if args.list_tasks:
        for name, text in DESCRIPTIONS.items():
            print(f"{name:8s} {text}")
        return 0

    cfg = load_config(args.items)
    if cfg.mode != "pt":
        raise T5ForgeError(f"this config is for fine-tuning (mode={cfg.mode}); run it with `t5forge finetune`")
    if args.list_keys:
        print_keys(describe_keys(cfg))
        return 0
    if args.print_config:
        print(config_to_yaml(cfg), end="")
        return 0
    cfg = with_run_dir(cfg, "pretrain")

    try:
        from t5forge.train.pretrain import run_pretrain
    except ModuleNotFoundError as err:
        if err.name not in ("t5forge.train.pretrain", "t5forge.train"):
            raise
        raise T5ForgeError("training is not available yet in this build (t5forge.train.pretrain is missing)") from None
    return int(run_pretrain(cfg) or 0)
