"""Command line: ``metarl train | evaluate | plot``.

Every failure a user can fix (bad config key, missing data, corrupt checkpoint, NaN loss) ends
with one line ``metarl: error: ...`` that names the fix, and exit status 2; tracebacks are for bugs.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path



def _user_errors() -> tuple[type[BaseException], ...]:
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .distributed import DistributedError
    from .extras import MissingExtra
    from .training import NonFiniteLoss, RunDirError

    errors = [ConfigError, CheckpointError, RunDirError, NonFiniteLoss, FileNotFoundError, MissingExtra, DistributedError]
    try:
        from .tasks.episodes import DataError
        errors.append(DataError)
    except ImportError:
        pass
    try:  # a killed collector worker, bad env output (NaN observation, wrong shape): one line each
        from .rollouts.collector import CollectorError, EnvOutputError
        errors += [CollectorError, EnvOutputError]
    except ImportError:
        pass
    return tuple(errors)


def _algorithm_names() -> str:
    """The registered methods by kind of track, for --help."""
    try:
        from . import registry

        registry.load_all()
        return f"supervised: {', '.join(registry.names('supervised'))}; rl: {', '.join(registry.names('rl'))}"
    except Exception:  # --help must work even where an optional engine fails to import
        return "see README"


def _check_dir(path: Path, flag: str) -> Path:
    """``path`` if it is, or can become, a directory; a one-line error if it or a parent is a file
    (``mkdir`` would end in a traceback much later, after the config and the track are built)."""
    from .config import ConfigError

    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                raise ConfigError(f"{flag} {path}: {p} is a file, not a directory; choose another {flag}")
            break
    return path


def _cell(mean, ci) -> str:
    """One curve point for the terminal; null (non-finite after an overshooting step) prints as —."""
    return "—" if mean is None or ci is None else f"{mean:.4g}±{ci:.2g}"


def _refuse_non_finite(result, run_dir, iteration) -> list[str]:
    """A diverged checkpoint (non-finite before any adaptation, step 0) would be written as if it
    were a result and break the log-scale plot: refuse with one line. Non-finite values at later
    steps are a result (the adaptation overshot, e.g. Meta-SGD's one-step α reused at step 3):
    they are written as null, and the returned lines say where."""
    import numpy as np

    curves = {name: np.asarray(curve, dtype=float) for name, curve in result.curves.items()}
    bad = [name for name, c in curves.items() if not np.isfinite(c[:, 0]).all()]
    if bad:
        from .training import NonFiniteLoss

        raise NonFiniteLoss(f"evaluation of {run_dir} (iteration {iteration}) gave non-finite {result.metric} for "
                            f"{', '.join(bad)} before any adaptation: the checkpoint has diverged; evaluate an earlier "
                            f"--iteration or retrain with lower learning rates")
    notes = []
    for name, c in curves.items():
        steps = [s for s in range(c.shape[1]) if not np.isfinite(c[:, s]).all()]
        if steps:
            notes.append(f"metarl: warning: {name}'s {result.metric} is non-finite from step {steps[0]} on (its adaptation "
                         f"overshoots there); those entries are null in adaptation.json")
    return notes


def cmd_train(args) -> int:
    from . import config as configlib, distributed
    from .training import train

    run_dir = _check_dir(Path(args.run_dir or Path("runs") / Path(args.config).stem), "--run-dir")
    cfg = configlib.load(args.config, args.set + ([f"data.dir={args.data_dir}"] if args.data_dir else []))
    world = distributed.init_from_env()  # under torchrun: this rank joins the others (rank 0 of 1 otherwise)
    try:
        track = train(cfg, run_dir, resume=args.resume)
    except BaseException:
        distributed.shutdown()
        raise
    try:
        distributed.shutdown(wait=True)
    except BaseException:
        track.close()
        raise
    if not world.is_main:  # rank 0 reports, trains the baselines and evaluates
        track.close()
        return 0
    print(f"trained {cfg.iterations} iterations: {run_dir}" + (f" on {world.size} ranks" if world.size > 1 else ""))
    try:
        for kind in track.after_training():
            print(f"trained baseline {kind}: {run_dir / 'baselines'}")
    finally:
        track.close()
    if args.evaluate:
        return cmd_evaluate(argparse.Namespace(run_dir=str(run_dir), tasks=None, steps=None, seed=None, set=[]))
    return 0


def cmd_evaluate(args) -> int:
    import torch

    from . import config as configlib
    from . import evaluation
    from .training import load_track

    shift = _parse_shift(getattr(args, "shift", None))
    overrides = list(getattr(args, "set", None) or []) + ([f"data.dir={args.data_dir}"] if getattr(args, "data_dir", None) else [])
    at = getattr(args, "iteration", None)
    out = Path(getattr(args, "out", None) or Path(args.run_dir) / "eval" / (f"iteration_{at}" if at is not None else ""))
    _check_dir(out, "--out")
    track, cfg, iteration = load_track(args.run_dir, overrides, at)
    n = args.tasks if args.tasks is not None else cfg.eval.tasks
    steps = args.steps if args.steps is not None else (cfg.eval.steps if cfg.eval.steps is not None else cfg.inner.eval_steps)
    seed = args.seed if args.seed is not None else cfg.eval.seed
    tasks_file = getattr(args, "tasks_file", None)
    if tasks_file and not Path(tasks_file).exists() and Path(tasks_file).parent in (Path("."), Path("experiments")):
        tasks_file = str(configlib.packaged_file(Path(tasks_file).name) or tasks_file)  # shipped with the package
    try:
        tasks = None
        if tasks_file:
            if not hasattr(track, "load_tasks"):
                raise SystemExit(f"metarl: error: --tasks-file is for meta-RL runs; track '{cfg.track}' draws its tasks by --seed")
            if args.tasks is not None:
                raise SystemExit("metarl: error: --tasks and --tasks-file exclude each other: the file sets the tasks")
            tasks = track.load_tasks(tasks_file)
            n = len(tasks)
        if n < 2 or steps < 0:
            raise SystemExit("metarl: error: --tasks must be >= 2 (for a confidence interval) and --steps >= 0")
        torch.manual_seed(seed)
        from .threads import torch_threads
        with torch_threads(cfg.torch_threads):
            result = track.evaluate(n, steps, seed) if tasks is None else track.evaluate(n, steps, seed, tasks=tasks)
            if shift:
                _evaluate_shift(shift, track, cfg, result, n, steps, seed)
    finally:
        track.close()
    for line in _refuse_non_finite(result, args.run_dir, iteration):
        print(line, file=sys.stderr)
    which = (f"the {n} tasks of {tasks_file}" if tasks_file else
             f"{n} held-out test-split tasks" if result.extra.get("eval_split") == "test" else f"{n} fresh tasks")
    result.extra["eval_tasks"] = evaluation.task_set(cfg, n, seed, tasks_file)
    data = evaluation.write(result, out, title=f"{cfg.track}, {cfg.algorithm}: {which}, after {iteration} meta-iterations")
    print(f"{data['metric']} after 0..{steps} {data['curve_axis']} on {which} (mean ± 95% CI):")
    for name, d in data["methods"].items():
        cells = "  ".join(_cell(m, c) for m, c in zip(d["mean"], d["ci95"]))
        print(f"  {name:>9}: {cells}")
    if "success" in data:  # Meta-World: episodes with the success flag at any step (README, "Meta-World")
        print(f"success rate after 0..{steps} {data['curve_axis']} (mean ± 95% CI over tasks):")
        for name, d in data["success"].items():
            print(f"  {name:>9}: " + "  ".join(_cell(m, c) for m, c in zip(d["mean"], d["ci95"])))
    for name, d in data.get("step_sizes", {}).items():
        if "validation_tasks" in d:
            print(f"  {name:>9} step sizes chosen on {d['validation_tasks']} validation tasks: {d['chosen']}")
    print(f"wrote {out / 'adaptation.json'}")
    return 0


def _parse_shift(spec):
    """``--shift KIND=V1,V2,...`` → (kind, values), or None without the flag."""
    from . import evaluation

    if not spec:
        return None
    try:
        return evaluation.parse_shift(spec)
    except ValueError as e:
        raise SystemExit(f"metarl: error: {e}") from None


def _evaluate_shift(shift, track, cfg, result, n: int, steps: int, seed: int) -> None:
    """``--shift KIND=V1,V2,...``: the run's method on the same test episodes warped by each factor
    (Finn & Levine 2018 sec. 7), into ``result`` (adaptation.json ``shift``, and ``shift.png``)."""
    from . import evaluation
    from .plotting import shift_plot

    kind, values = shift
    if cfg.track != "fewshot":
        raise SystemExit(f"metarl: error: --shift warps images: it is for few-shot runs, not track '{cfg.track}'")
    m, p = track.method, track.problem
    vals, stage = evaluation.shift_curve(lambda b: m.predict(b, steps), lambda: track.eval_batches(n, seed), p.metric, kind, values)
    result.extra["shift"] = evaluation.shift_summary({m.name: vals}, kind, values, stage, m.curve_axis)
    title = f"{cfg.algorithm} under {kind}: {n} test episodes (95% CI)"
    result.figures["shift.png"] = lambda path: shift_plot(result.extra["shift"], path, metric=p.metric_name, title=title)


def cmd_baselines(args) -> int:
    from .config import ConfigError
    from .training import load_track

    if args.timesteps is not None and args.timesteps < 1:
        raise ConfigError(f"--timesteps must be >= 1 (PPO environment steps), got {args.timesteps}")
    track, cfg, _ = load_track(args.run_dir)
    try:
        if not hasattr(track, "train_baselines"):
            raise SystemExit(f"metarl: error: track '{cfg.track}' trains its baselines inside `metarl train`")
        done = track.train_baselines(args.methods, args.timesteps, overwrite=args.overwrite)
    finally:
        track.close()
    print(f"trained {', '.join(done) or 'nothing (all present; --overwrite to retrain)'} in {Path(args.run_dir) / 'baselines'}")
    return 0


def cmd_plot(args) -> int:
    from . import evaluation
    from .plotting import adaptation_plot

    runs = {Path(r).name or str(r): evaluation.load(r) for r in args.run_dirs}
    metrics = {d["metric"] for d in runs.values()}
    if len(metrics) > 1:
        raise SystemExit(f"metarl: error: cannot overlay different metrics {sorted(metrics)}: plot runs of one track")
    adaptation_plot(runs, args.out)
    print(f"wrote {args.out}")
    return 0


def cmd_compare(args) -> int:
    """Every method's curve on the same test tasks in one figure: each run's own method (named by
    its ``algorithm``), plus the baselines of the first run (they are the same in every run)."""
    from . import evaluation
    from .plotting import adaptation_plot

    if args.shift:
        return _compare_shift(args)
    try:
        merged = evaluation.compare([evaluation.load(r) for r in args.run_dirs], [str(r) for r in args.run_dirs])
    except ValueError as e:
        raise SystemExit(f"metarl: error: {e}") from None
    adaptation_plot({"": merged}, args.out, title=f"{len(merged['methods'])} methods on the same {merged['n_tasks']} test tasks (95% CI)")
    if args.json:
        Path(args.json).write_text(__import__("json").dumps(merged, indent=2))
    for name, d in merged["methods"].items():
        print(f"  {name:>9}: " + "  ".join(_cell(m, c) for m, c in zip(d["mean"], d["ci95"])))
    print(f"wrote {args.out}")
    return 0


def _compare_shift(args) -> int:
    """``metarl compare RUN... --shift``: accuracy vs warp of each run's method in one figure (runs
    evaluated with the same --shift, --tasks and --seed)."""
    from . import evaluation
    from .plotting import shift_plot

    entries, first, key = {}, None, None
    for r in args.run_dirs:
        data = evaluation.load(r)
        if "shift" not in data:
            raise SystemExit(f"metarl: error: {r} has no task-shift results: run `metarl evaluate {r} --shift shear=0,0.2,0.4,0.6,0.8` first")
        if first is None:
            first = data
        elif data.get("eval_tasks") != first.get("eval_tasks"):
            raise SystemExit(f"metarl: error: {r} was evaluated on other tasks than {args.run_dirs[0]}: use the same --seed and --tasks")
        for name, d in data["shift"].items():
            if key is None:
                key = (d["kind"], d["values"])
            elif (d["kind"], d["values"]) != key:
                raise SystemExit(f"metarl: error: {r} was warped by {d['kind']}={d['values']}, {args.run_dirs[0]} by "
                                 f"{key[0]}={key[1]}: evaluate every run with the same --shift")
            label = name if name not in entries else f"{name} ({r})"
            entries[label] = d
    shift_plot(entries, args.out, metric=first["metric"], title=f"{len(entries)} methods under {key[0]} on the same "
                                                                 f"{first['n_tasks']} test episodes (95% CI)")
    if args.json:
        Path(args.json).write_text(__import__("json").dumps(entries, indent=2))
    print(f"{first['metric']} vs {key[0]} factor {key[1]} (mean ± 95% CI):")
    for name, d in entries.items():
        print(f"  {name:>9}: " + "  ".join(_cell(m, c) for m, c in zip(d["mean"], d["ci95"])))
    print(f"wrote {args.out}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="metarl", description="Meta-learning and meta-RL: train, evaluate adaptation, plot.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="meta-train from a YAML config (experiments/*.yaml)")
    t.add_argument("config", help="path to a YAML config, or the name of one in experiments/; "
                                  "--set algorithm=NAME picks the method (" + _algorithm_names() + ")")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value, e.g. --set inner.lr=0.02")
    t.add_argument("--run-dir", help="where checkpoints, metrics and plots go (default runs/<config name>)")
    t.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its checkpoint")
    t.add_argument("--data-dir", help="dataset folder for image tracks (same as --set data.dir=DIR or $METARL_DATA)")
    t.add_argument("--evaluate", action="store_true", help="run `metarl evaluate` on the run when training ends")
    t.set_defaults(fn=cmd_train)
    e = sub.add_parser("evaluate", help="adaptation curves on fresh tasks: RUN_DIR/eval/adaptation.{json,csv,png}")
    e.add_argument("run_dir")
    e.add_argument("--tasks", type=int, help="number of fresh evaluation tasks (default: config eval.tasks)")
    e.add_argument("--steps", type=int, help="inner steps 0..K on the curve (default: config)")
    e.add_argument("--seed", type=int, help="seed of the evaluation tasks (default: config eval.seed)")
    e.add_argument("--tasks-file", help="meta-RL: evaluate on the tasks of this JSON file instead of fresh ones "
                                        "(e.g. experiments/nav2d_paper_goals.json, the MAML paper's 40 test goals)")
    e.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="evaluation-time override, e.g. --set sine_eval.k_shot=5")
    e.add_argument("--data-dir", help="dataset folder for image tracks (as in train)")
    e.add_argument("--iteration", type=int, help="evaluate the snapshot of this iteration (train with --set snapshot_every=N); "
                                                 "default: the latest checkpoint")
    e.add_argument("--out", help="output folder (default RUN_DIR/eval, or RUN_DIR/eval/iteration_N with --iteration)")
    e.add_argument("--shift", metavar="KIND=V1,V2,...",
                   help="few-shot: also score the method on the test episodes warped (support and query) by each factor, "
                        "e.g. shear=0,0.2,0.4,0.6,0.8 or scale=1,0.8,0.6 (adaptation.json 'shift', shift.png)")
    e.set_defaults(fn=cmd_evaluate)
    b = sub.add_parser("baselines", help="train a run's on-demand baselines: meta-RL PPO pretrain/oracle, few-shot pretrain")
    b.add_argument("run_dir")
    b.add_argument("--methods", nargs="+", choices=["pretrain", "oracle"], default=["pretrain", "oracle"])
    b.add_argument("--timesteps", type=int, help="PPO environment steps (default: config ppo_baselines.timesteps); "
                                              "few-shot: Adam updates of the pretrain classifier (default: pretrain.updates)")
    b.add_argument("--overwrite", action="store_true")
    b.set_defaults(fn=cmd_baselines)
    pl = sub.add_parser("plot", help="overlay the adaptation curves of several evaluated runs")
    pl.add_argument("run_dirs", nargs="+")
    pl.add_argument("--out", default="adaptation_overlay.png")
    pl.set_defaults(fn=cmd_plot)
    c = sub.add_parser("compare", help="one figure of every method's curve: runs of different algorithms, evaluated on the same tasks")
    c.add_argument("run_dirs", nargs="+", help="evaluated runs (RUN_DIR or RUN_DIR/eval/...), one per algorithm")
    c.add_argument("--out", default="compare.png")
    c.add_argument("--json", help="also write the merged curves to this JSON file")
    c.add_argument("--shift", action="store_true", help="plot accuracy vs warp factor instead (runs evaluated with the same --shift)")
    c.set_defaults(fn=cmd_compare)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.fn(args)
    except _user_errors() as e:
        print(f"metarl: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"metarl: {e or 'interrupted'}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
