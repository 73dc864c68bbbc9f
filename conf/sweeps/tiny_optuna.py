"""An Optuna sweep over CLI flags of the tiny stage-2 recipe: every trial is one `fit` run.

Every hyperparameter is a CLI flag, so a trial is the usual command plus `--key=value` flags; the
objective is the run's last validation loss. Run from the repository root, after
`python -m llava_lightning.data.synthetic --out data/shapes --seed 0` (or one `make demo`):

    .venv/bin/python conf/sweeps/tiny_optuna.py --trials 8 --max-steps 100
    .venv/bin/python conf/sweeps/tiny_optuna.py --storage sqlite:///outputs/optuna.db  # resumable

Trials log to TensorBoard under outputs/optuna/trial_<n>. Pass any other CLI flag after `--`,
e.g. `-- --data.num_workers=0`. (conf/sweeps/tiny_lr_wandb.yaml is the same sweep for W&B.)
"""

from __future__ import annotations

import argparse
import logging
import math

import optuna

from llava_lightning.cli import main as cli

log = logging.getLogger("tiny_optuna")


def suggest_flags(trial: optuna.Trial) -> list[str]:
    """The search space, as CLI flags."""
    params = {
        "model.optim.lr": trial.suggest_float("model.optim.lr", 1e-4, 3e-3, log=True),
        "model.optim.warmup_ratio": trial.suggest_categorical("model.optim.warmup_ratio", [0.0, 0.03]),
        "data.batch_size": trial.suggest_categorical("data.batch_size", [8, 16]),
    }
    return [f"--{key}={value}" for key, value in params.items()]


def run_trial(trial: optuna.Trial, args: argparse.Namespace) -> float:
    argv = [
        "fit", "-c", "conf/stage2.yaml", "-c", "conf/tiny.yaml",
        f"--trainer.max_steps={args.max_steps}", f"--trainer.val_check_interval={args.max_steps}",
        "--trainer.check_val_every_n_epoch=null", f"--trainer.logger.init_args.save_dir={args.out}",
        f"--trainer.logger.init_args.name=trial_{trial.number}", "--trainer.enable_checkpointing=false",
        "--trainer.callbacks=[]", *args.extra, *suggest_flags(trial),
    ]  # fmt: skip
    run = cli(argv)
    value = run.trainer.callback_metrics.get(args.metric)
    if value is None or not math.isfinite(float(value)):
        raise optuna.TrialPruned(f"trial {trial.number} logged no finite {args.metric}")
    return float(value)


def main(argv: list[str] | None = None) -> optuna.Study:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8, help="number of trials")
    parser.add_argument("--max-steps", type=int, default=100, help="optimizer steps per trial")
    parser.add_argument("--metric", default="val/loss", help="logged metric to minimize")
    parser.add_argument("--out", default="outputs/optuna", help="TensorBoard folder of the trials")
    parser.add_argument("--storage", default=None, help="Optuna storage URL (e.g. sqlite:///sweep.db)")
    parser.add_argument("--study", default="tiny-stage2", help="study name (with --storage: resumes)")
    parser.add_argument("--seed", type=int, default=0, help="sampler seed")
    parser.add_argument("extra", nargs="*", help="more CLI flags for every trial (after --)")
    args = parser.parse_args(argv)
    study = optuna.create_study(
        study_name=args.study,
        storage=args.storage,
        load_if_exists=True,
        direction="minimize",
        sampler=optuna.samplers.TPESampler(seed=args.seed),
    )
    study.optimize(lambda trial: run_trial(trial, args), n_trials=args.trials)
    best = study.best_trial
    flags = " ".join(f"--{k}={v}" for k, v in best.params.items())
    print(f"best {args.metric} {best.value:.4f} (trial {best.number}): {flags}")  # noqa: T201
    return study


if __name__ == "__main__":
    main()
