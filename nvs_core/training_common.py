"""Training scaffolding shared by the VIVID, GeNVS and ViewNeTI trainers.

One place for what the trainers do alike: per-step random draws, the console progress with the
loss, the run-control CLI arguments (--checkpoint-every, --no-resume, --threads, --device,
--log-every), the sub-command argv kept for the ``reproduce`` line, Adam state packed into a flat
tensor dict for ``save_with_config`` and back, and the one-line JSON summary a CLI run prints.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from .checkpoints import CheckpointError
from .progress import Progress, TqdmProgress


# --------------------------------------------------------------------------------------------
# Random draws.

def step_generator(seed: int, step: int) -> torch.Generator:
    """The CPU generator for one training step, a function of (seed, step) only."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(step)]).generate_state(2, np.uint32)
    return torch.Generator("cpu").manual_seed(int(state[0]) << 31 ^ int(state[1]))


def uniform(generator: torch.Generator, low: float, high: float, count: int = 1) -> torch.Tensor:
    """``count`` float64 draws from U(low, high)."""
    return low + (high - low) * torch.rand(count, generator=generator, dtype=torch.float64)


def randint(generator: torch.Generator, high: int) -> int:
    """One integer draw from [0, high)."""
    return int(torch.randint(high, (1,), generator=generator))


def force_finite_(parameters) -> None:
    """Replace NaN and +-inf in gradients by 0, in place (EDM2 ``force_finite``)."""
    for p in parameters:
        if p.grad is not None:
            torch.nan_to_num(p.grad, nan=0.0, posinf=0.0, neginf=0.0, out=p.grad)


# --------------------------------------------------------------------------------------------
# Loss reporting.

def report_loss(bar: Progress, desc: str, loss: float) -> None:
    """Show the step's loss in the bar's description (and its postfix where it has one)."""
    bar.desc = f"{desc} (loss {loss:.4f})"
    set_postfix = getattr(bar, "set_postfix", None)
    if set_postfix is not None:
        set_postfix(loss)


class LossProgress(TqdmProgress):
    """Console progress with the last loss, plus a plain log line every ``log_every`` steps."""

    def __init__(self, total: int, desc: str = "", log_every: int = 100):
        super().__init__(total, desc)
        self.log_every = log_every
        self.start = time.perf_counter()
        self._recent: List[float] = []

    def set_postfix(self, loss: float) -> None:
        self._recent.append(loss)
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def update(self, n: int = 1) -> None:
        super().update(n)
        if self.log_every and self.done % self.log_every == 0 and self._recent:
            mean = sum(self._recent) / len(self._recent)
            line = f"step {self.done}/{self.total}  loss {mean:.4f}  {time.perf_counter() - self.start:.0f} s"
            if self._bar is not None:
                self._bar.write(line, file=sys.stderr)
            else:
                print(line, file=sys.stderr, flush=True)
            self._recent = []


# --------------------------------------------------------------------------------------------
# Training state: Adam moments as flat tensors.

def pack_optimizer(optimizer: torch.optim.Optimizer, tensors: Dict[str, torch.Tensor]) -> List[Dict[str, Any]]:
    """Add ``optim.<index>.<name>`` tensors to ``tensors``; returns the JSON-ready param groups."""
    opt = optimizer.state_dict()
    for index, entries in opt["state"].items():
        for name, value in entries.items():
            tensors[f"optim.{index}.{name}"] = torch.as_tensor(value)
    return [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in opt["param_groups"]]


def state_step(path, tensors: Dict[str, torch.Tensor], meta: Dict[str, Any]) -> int:
    """The step of a training state; its tensor file and JSON sidecar must agree on it."""
    step = int(meta["step"])
    if int(tensors.get("meta.step", torch.tensor(-1))) != step:
        raise CheckpointError(path, "tensor file and JSON sidecar are from different steps")
    return step


def tensors_under(tensors: Dict[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    """The entries whose key starts with ``prefix``, with the prefix cut off."""
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def unpack_optimizer(optimizer: torch.optim.Optimizer, tensors: Dict[str, torch.Tensor],
                     param_groups: Sequence[Dict[str, Any]]) -> None:
    """Load into ``optimizer`` what :func:`pack_optimizer` wrote."""
    state: Dict[int, Dict[str, torch.Tensor]] = {}
    for key, value in tensors_under(tensors, "optim.").items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in param_groups]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# --------------------------------------------------------------------------------------------
# Command line.

def add_run_arguments(parser: argparse.ArgumentParser, checkpoint_every: int, log_every: int) -> None:
    """--checkpoint-every, --no-resume, --threads, --device and --log-every (in that order)."""
    parser.add_argument("--checkpoint-every", type=int, default=checkpoint_every)
    parser.add_argument("--no-resume", action="store_true", help="start over even if --out holds a state")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--log-every", type=int, default=log_every, help="print the mean loss every N steps")


def apply_threads(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)


def cli_argv(args: argparse.Namespace, subcommand: str) -> List[str]:
    """The arguments of this run: ``args.argv`` from ``main``, else ``sys.argv`` less the sub-command."""
    argv = getattr(args, "argv", None)
    if argv is None:  # called through ``python -m nvs_core <subcommand>``: drop the sub-command
        argv = [a for a in sys.argv[1:] if a != subcommand]
    return argv


def print_summary(result, **extra: Any) -> None:
    """The one JSON line a CLI training run ends with (``extra`` goes after the mean loss)."""
    tail = result.losses[-100:]
    print(json.dumps({"steps": result.step, "seconds": round(result.seconds, 1),
                      "loss_last100": round(sum(tail) / max(len(tail), 1), 5), **extra,
                      "ema": str(result.ema_path), "state": str(result.state_path)}))


def register_cli(subparsers, name: str, configure, run, help: str, description: str) -> argparse.ArgumentParser:
    """Add sub-command ``name``: ``configure(parser)`` declares its arguments, ``run(args)`` runs it."""
    parser = subparsers.add_parser(name, help=help, description=description)
    configure(parser)
    parser.set_defaults(func=run)
    return parser


def add_out_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder (checkpoints; resumed from if present)")


def cli_main(prog: str, description: str, configure, run, argv: Optional[Sequence[str]] = None) -> int:
    """``python -m <module>``: parse ``argv`` with ``configure``, keep it for the reproduce line, ``run``."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    configure(parser)
    args = parser.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    return run(args)


# --------------------------------------------------------------------------------------------
# The step loop.

def step_loop(bar: Progress, desc: str, step: int, total_steps: int, one_step: Callable[[int], float],
              checkpoint: Optional[Callable[[int], None]], checkpoint_every: int) -> int:
    """Run ``one_step(step) -> loss`` (with autograd on) from ``step`` up to ``total_steps``; returns the last step.

    ``checkpoint(step)`` (None: nothing is saved) runs every ``checkpoint_every`` steps and, when the bar
    reports an interruption after a step that is not saved yet, before the exception propagates: a run
    resumes from its last finished step. The bar shows the loss and is closed on the way out.
    """
    saved_step = step
    try:
        bar.done = step
        bar.check()
        with torch.enable_grad():
            while step < total_steps:
                loss = one_step(step)
                step += 1
                if checkpoint is not None and checkpoint_every > 0 and step % checkpoint_every == 0:
                    checkpoint(step)
                    saved_step = step
                report_loss(bar, desc, loss)
                try:
                    bar.update()
                except BaseException:
                    if checkpoint is not None and step != saved_step:
                        checkpoint(step)  # interrupted between steps: resume from the last finished one
                    raise
    finally:
        bar.close()
    return step
