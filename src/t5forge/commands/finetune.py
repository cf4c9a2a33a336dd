"""`t5forge finetune [task=ft] [config=PATH] [a.b=value ...] [--print-config | --list-keys]`: fine-tuning.

The items are resolved on top of the `ft` preset (nanoT5's Tk-Instruct fine-tuning on SNI) by
`t5forge.config_files.load_config(argv, base="ft")`; a pre-training config (mode=pt) is refused.
`--print-config` prints the resolved YAML and `--list-keys` every key with its resolved value, and
exit; otherwise the run goes to `t5forge.train.finetune.run_finetune(cfg)`. An empty `out_dir`
becomes `runs/finetune-<date>-<time>`; local paths become absolute (`with_run_dir`).

    t5forge finetune model.checkpoint_path=runs/pt_cpu_c4 finetune.sni_dir=data/sni optim.base_lr=1e-3
"""

HELP = "fine-tune a T5 on Super-NaturalInstructions or seq2seq files (nanoT5 ft keys: finetune.sni_dir=DIR ...)"


def add_arguments(parser) -> None:
    parser.add_argument(
        "items", nargs="*", metavar="KEY=VALUE",
        help="task=PRESET (default ft), config=FILE.yaml and overrides like model.checkpoint_path=RUN_DIR",
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    parser.add_argument("--list-keys", action="store_true",
                        help="list every config key with its value (those of the ft preset, or of the task=, "
                             "config= and overrides given) and exit")


def run(args) -> int:
    from t5forge.config_files import config_to_yaml, load_config, with_run_dir
    from t5forge.errors import T5ForgeError

    from t5forge.presets import get_preset

    # The pt presets leave `mode` at its default, so layered on `ft` they would read as fine-tuning.
    for item in args.items:
        key, _, name = item.partition("=")
        if key.strip() == "task" and get_preset(name).get("mode", "pt") != "ft":
            raise T5ForgeError(f"task={name} is a pre-training preset; run it with `t5forge pretrain`, "
                               "or fine-tune with task=ft / task=ft_tiny")
    cfg = load_config(args.items, base="ft")
    if cfg.mode != "ft":
        raise T5ForgeError(f"this config is for pre-training (mode={cfg.mode}); run it with `t5forge pretrain`")
    if args.list_keys:
        from t5forge.commands.pretrain import print_keys
        from t5forge.config import describe_keys

        print_keys(describe_keys(cfg))
        return 0
    if args.print_config:
        print(config_to_yaml(cfg), end="")
        return 0
    cfg = with_run_dir(cfg, "finetune")

    from t5forge.train.finetune import run_finetune

    return int(run_finetune(cfg) or 0)
