"""`t5forge ablate SPEC.yaml --out DIR`: pre-train every arm of a spec on the same data, seed,
held-out batches and budget, then compare them in DIR/results.json, DIR/results.md and DIR/curves.png.

The spec and the results are `t5forge.ablation`'s. Every arm's config is resolved and checked before
the first one trains; each arm then runs in this process through the pretrain command's own path
(`load_config` -> `with_run_dir` -> `run_pretrain`) into DIR/ARM (with the spec's `seeds`, once per
seed into DIR/ARM/seed-N). A finished arm is not rerun when
the command is repeated; an unfinished one resumes from its newest checkpoint (resume=auto). With a
time budget, one throwaway step runs first, so that no arm's clock pays the process's start-up.
"""

HELP = "pre-train several variants on equal budgets and compare them (t5forge ablate SPEC.yaml --out DIR)"


def add_arguments(parser) -> None:
    parser.add_argument("spec", metavar="SPEC.yaml", help="the ablation: base overrides, a budget per arm, the arms")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="where each arm trains (DIR/ARM) and the results go; rerun with the same DIR to continue")


WARMUP_DIR = ".warmup"  # not an arm name (those start with a letter or digit)


def _warm_up(spec, run, out) -> None:
    """One throwaway step of `run` before the timed runs: a process's first training step pays one-time
    costs (kernel and allocator set-up) that would otherwise come off the first run's time budget only."""
    import shutil

    from t5forge.config_files import load_config, with_run_dir
    from t5forge.train.pretrain import run_pretrain

    where = out / WARMUP_DIR
    shutil.rmtree(where, ignore_errors=True)
    print(f"ablate: one warm-up step of arm {run.label} in {where} (no arm's budget pays the process's first step)",
          flush=True)
    run_pretrain(with_run_dir(load_config([*spec.items(run), f"out_dir={where}", "resume=false",
                                           "stop_at_step=1"]), "pretrain"))
    shutil.rmtree(where, ignore_errors=True)


def run(args) -> int:
    from pathlib import Path

    from t5forge.ablation import (
        arm_status, load_spec, peak_memory, reset_peak_memory, run_configs, unseeded_conflict, write_arm_marker,
    )
    from t5forge.ablation_results import results, write_results
    from t5forge.train.pretrain import run_pretrain

    spec = load_spec(args.spec)
    out = Path(args.out).expanduser().resolve()
    configs = run_configs(spec, out)  # every run's config checked before anything trains
    unseeded_conflict(spec, out)
    statuses = {r: arm_status(r.dir, spec.fingerprint(r)) for r in configs}
    seeds = "" if spec.seeds is None else f" x {len(spec.seeds)} seed(s)"
    print(f"ablate: {len(spec.arms)} arm(s){seeds}, {spec.budget.describe()} each, into {out}", flush=True)
    pending = [r for r in configs if statuses[r] != "done"]
    if pending and spec.budget.seconds is not None:
        _warm_up(spec, pending[0], out)
    for index, (r, cfg) in enumerate(configs.items(), start=1):
        if statuses[r] == "done":
            print(f"ablate: arm {r.label} ({index}/{len(configs)}) finished already in {r.dir}; not rerun", flush=True)
            continue
        verb = "resuming" if statuses[r] == "partial" else "training"
        print(f"ablate: {verb} arm {r.label} ({index}/{len(configs)}): "
              f"{' '.join(spec.arms[r.arm]) or 'the base config'}", flush=True)
        write_arm_marker(r.dir, spec.fingerprint(r), finished=False)
        reset_peak_memory()
        code = int(run_pretrain(cfg) or 0)
        if code != 0:
            print(f"ablate: arm {r.label} ended with exit code {code}; rerun the same command to resume it", flush=True)
            return code
        write_arm_marker(r.dir, spec.fingerprint(r), finished=True, memory=peak_memory())
    rows = results(spec, out)
    written = write_results(out, spec, rows)
    for row in rows:
        loss = row["final_eval_loss"]
        print(f"ablate: {row['arm']:20s} steps {row['steps']:6.0f}  held-out NLL "
              f"{'-' if loss is None else f'{loss:.4f}'}", flush=True)
    print(f"ablate: results in {', '.join(str(p) for p in written)}", flush=True)
    return 0
