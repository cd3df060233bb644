"""Seeded recipes that produce the bundled weights in assets/weights/."""
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from xattn_cli.world.shapes import COLORS, SHAPES, STYLE_NAMES

TRAINING_STYLES = tuple(style for style in STYLE_NAMES if style != "shifted")  # shifted: model selection, cards


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up to `peak`, then cosine decay to zero at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


class StepBatches(torch.utils.data.IterableDataset):
    """Batch `step` is `make_batch(step)`, a pure function of the step, so a resumed run replays the stream."""

    def __init__(self, make_batch, start_step: int):
        self.make_batch, self.start_step = make_batch, start_step

    def __iter__(self):
        """Worker k of n draws steps start + k, start + k + n, ...: the loader takes one from each in turn."""
        worker = torch.utils.data.get_worker_info()
        index, count = (worker.id, worker.num_workers) if worker else (0, 1)
        step = self.start_step + index
        while True:
            yield step, self.make_batch(step)
            step += count


def step_loader(make_batch, start_step: int, workers: int):
    """`StepBatches` drawn in `workers` background processes (0: in this one)."""
    return torch.utils.data.DataLoader(StepBatches(make_batch, start_step), batch_size=None, num_workers=workers,
                                       prefetch_factor=4 if workers else None)


class Checkpoint:
    """Modules, optimizer and step in one file, replaced atomically (a killed run loses at most one interval).
    `run` names what the weights depend on besides the step (`run_options(args)`: family, initial weights, world
    style, colour rule, seed, batch size); a resume under other values is refused, since it would silently train
    on another stream. `--steps` may change (the cosine tail is recomputed); a file written before `run` was
    recorded is resumed as it is."""

    def __init__(self, path: str | Path, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer,
                 run: dict | None = None):
        self.path, self.modules, self.optimizer, self.run = Path(path), modules, optimizer, run or {}

    def restore(self) -> int:
        """Load the file if there is one; the step to start from."""
        if not self.path.exists():
            return 0
        state = torch.load(self.path, weights_only=True)
        differ = {key: (value, self.run.get(key)) for key, value in state.get("run", {}).items()
                  if self.run.get(key) != value}
        if differ:
            changes = ", ".join(f"{key} {was!r} -> {now!r}" for key, (was, now) in differ.items())
            raise SystemExit(f"error: {self.path} was written by a run with other options ({changes}); "
                             "resume with the same options or start in a new folder")
        for name, module in self.modules.items():
            module.load_state_dict(state[name])
        self.optimizer.load_state_dict(state["optimizer"])
        return state["step"] + 1

    def save(self, step: int) -> None:
        state = {name: module.state_dict() for name, module in self.modules.items()}
        temporary = self.path.with_suffix(".tmp")
        torch.save({**state, "optimizer": self.optimizer.state_dict(), "step": step, "run": self.run}, temporary)
        temporary.replace(self.path)


def run_options(args) -> dict:
    """The recipe options a checkpoint's weights depend on (besides the step): see `Checkpoint`."""
    keys = ("family", "init", "style", "colour_rule", "seed", "batch_size")
    return {key: getattr(args, key) for key in keys if hasattr(args, key)}


def fit(make_batch, loss_fn, optimizer, checkpoint: Checkpoint, evaluate, log_path: Path, *, steps: int, lr: float,
        warmup: int, eval_every: int, workers: int, after_step=None) -> None:
    """The loop of a seeded, resumable recipe: resume from `checkpoint`, then train on `make_batch(step)` (drawn in
    `workers` processes) up to `steps`. `loss_fn(batch)` gives the loss and a dict of named parts to log. Every
    `eval_every` steps and at the last, `evaluate()` adds held-out metrics to that step's log line and the
    checkpoint is saved. One JSON line per step goes to `log_path` (the lines of steps a resumed run replays are
    dropped first); gradients are clipped to norm 1; `after_step()`, if given, runs after each optimiser step
    (e.g. to clamp a parameter)."""
    start = checkpoint.restore()
    keep_log_before(log_path, start)
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    began = time.time()
    with open(log_path, "a") as log:
        for step, batch in step_loader(make_batch, start, workers):
            if step >= steps:
                break
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, steps, lr, warmup)
            loss, parts = loss_fn(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            if after_step is not None:
                after_step()
            record = {"step": step, "loss": round(loss.item(), 4), **parts, "elapsed_s": round(time.time() - began, 1)}
            if step % eval_every == 0 or step == steps - 1:
                record.update(evaluate())
                checkpoint.save(step)
            log.write(json.dumps(record) + "\n")
            log.flush()


def keep_log_before(log_path: Path, step: int) -> None:
    """Drop the JSON lines of `step` and later from the log, if there is one, and a line a kill cut short."""
    if log_path.exists():
        lines = log_path.read_text().splitlines(keepends=True)
        log_path.write_text("".join(line for line in lines if _logged_step(line) < step))


def _logged_step(line: str) -> float:
    """The step of a complete log line; infinity (dropped) for a partial one."""
    try:
        return json.loads(line)["step"] if line.endswith("\n") else math.inf
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


def storage_dtype(modules: list[torch.nn.Module], evaluate, metric: str, tolerance: float = 0.005
                  ) -> tuple[torch.dtype, dict, dict]:
    """float16 if the held-out `metric` of the weights rounded to fp16 stays within `tolerance` of fp32, else
    float32; the modules are left holding the weights of that choice (computing in fp32). Returns the dtype and
    the fp32 and fp16 metrics."""
    full = evaluate()
    saved = [{k: v.clone() for k, v in module.state_dict().items()} for module in modules]
    with torch.no_grad():
        for module in modules:
            for parameter in module.parameters():
                parameter.copy_(parameter.half().float())
    half = evaluate()
    if half[metric] >= full[metric] - tolerance:
        return torch.float16, full, half
    for module, state in zip(modules, saved):
        module.load_state_dict(state)
    return torch.float32, full, half


def run_arguments(description: str, *, steps: int, lr: float, warmup: int, eval_every: int):
    """An argument parser with the options every `hf:DIR` recipe takes (and these defaults)."""
    import argparse

    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="the hf:DIR folder: weights, config, log, checkpoint")
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--seed", type=int, default=0, help="initialisation (the data streams are fixed)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument("--warmup", type=int, default=warmup)
    parser.add_argument("--eval-every", type=int, default=eval_every)
    parser.add_argument("--eval-scenes", type=int, default=500)
    parser.add_argument("--workers", type=int, default=1, help="processes drawing training scenes (0: none)")
    parser.add_argument("--config", help="architecture JSON (default: the model's file in configs/)")
    add_style_arguments(parser)
    return parser


def training_style(text: str) -> str:
    """`--style`: a world style a model may be trained on (never `shifted`, kept for model selection and cards)."""
    import argparse

    if text not in TRAINING_STYLES:
        raise argparse.ArgumentTypeError(f"{text!r} is not a training style: use {' or '.join(TRAINING_STYLES)} "
                                         "(shifted is for model selection and cards only)")
    return text


def add_style_arguments(parser) -> None:
    """`--style` (the training scenes' world style) and `--eval-style` (the held-out scenes'), both `classic` by
    default: the original streams."""
    parser.add_argument("--style", type=training_style, default="classic", metavar="{%s}" % ",".join(TRAINING_STYLES),
                        help=f"world style of the training scenes: {' or '.join(TRAINING_STYLES)}")
    parser.add_argument("--eval-style", choices=STYLE_NAMES, default="classic",
                        help="world style of the held-out scenes (shifted: the style-shifted validation split)")


def cell_labels(scene, grid: tuple[int, int]) -> torch.Tensor:
    """Per grid cell, row-major: the shape and colour index of the object that covers most of the cell, if it
    covers at least a quarter of it; else 6, 6 (background). (R, 2)."""
    rows, cols = grid
    width, height = scene.size
    masks = np.stack([o.mask for o in scene.objects])  # (N, H, W)
    coverage = masks.reshape(len(masks), rows, height // rows, cols, width // cols).mean(axis=(2, 4))  # (N, rows, cols)
    coverage = coverage.reshape(len(masks), rows * cols)  # (N, R)
    best, covered = coverage.argmax(axis=0), coverage.max(axis=0) >= 0.25  # (R,), (R,)
    shapes = np.array([SHAPES.index(o.shape) for o in scene.objects])[best]  # (R,)
    colours = np.array([COLORS.index(o.color) for o in scene.objects])[best]  # (R,)
    labels = np.stack([np.where(covered, shapes, len(SHAPES)), np.where(covered, colours, len(COLORS))], axis=1)
    return torch.from_numpy(labels)  # (R, 2)


def cell_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of per-cell predictions (B, R, K · classes) against K labels per cell (B, R, K)."""
    logits = logits.unflatten(-1, (labels.shape[-1], -1))  # (B, R, K, classes)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 2), labels.flatten())
