"""The training loop behind ``fmfast train``.

Batches come from ``FMFDataset.batch`` (vectorised gathers from the frame store, no
DataLoader workers); the epoch order is a pure function of (seed, epoch), so a run killed at
any point resumes from ``last.pt`` with the same optimiser, scheduler, order and RNG state and
ends with the same weights as an uninterrupted one.

The protocol: validation samples are carved out of the train split (``fmfast.data.splits``)
and evaluated each epoch (no flips); ``best.pt`` is the epoch the monitored validation metric
chose (``selection``), with the threshold calibrated on validation; the test split is
evaluated once, at the end, with best.pt (the final row of metrics.jsonl; ``logs``).

On CUDA (``train.cuda_graphs`` auto/on) the whole step -- forward, backward, Adam -- is one
captured CUDA graph (``fmfast.engine.step.TrainRunner``, which runs every step, eager or captured), evaluation replays a captured forward,
and when the dataset fits in GPU memory it lives there: a step's only host-to-device traffic
is none, the batch is gathered inside the graph from the sample indices. The last short batch
is padded with 0-weight rows (or, for BatchNorm models, run eagerly), never dropped."""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from fmfast.data import FMFDataset, splits
from fmfast.data.gather import StableFlips, fits_on_device
from fmfast.engine import checkpoints as ckpt
from fmfast.engine import distributed as dist
from fmfast.engine import finite
from fmfast.engine.cpu_memory import keep_freed_memory
from fmfast.engine.device import resolve_amp, resolve_device
from fmfast.engine.evaluation import evaluate
from fmfast.engine.logs import RunLog
from fmfast.engine.graphs import make_capturable, portable_state_dict
from fmfast.engine.optim import build_optimizer, build_scheduler
from fmfast.engine.runs import comparable, prepare_run_folder, settings_diff
from fmfast.engine.selection import Selection, resolve_monitor
from fmfast.engine.settings import model_config
from fmfast.engine.step import TrainRunner, graph_setting, train_blockers, use_graphs
from fmfast.errors import SettingsError
from fmfast.models import build_model
from fmfast.models.init import reference_init
from fmfast.progress import progress_bar


def epoch_order(n: int, seed: int, epoch: int, limit: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=g)
    return order[:limit] if limit else order


class Trainer:
    def __init__(self, settings: dict, resume: str | None = None, console=None):
        from rich.console import Console

        self.s = settings
        t = settings["train"]
        self.device = resolve_device(t["device"])
        if self.device.type == "cuda":
            self.device = torch.device("cuda", dist.local_rank())
            torch.cuda.set_device(self.device)
        self.rank, self.world = dist.init(self.device)
        self.main = self.rank == 0
        self.console = console or Console(stderr=True, quiet=not self.main)
        self.amp = resolve_amp(t["amp"], self.device)
        self.memory = keep_freed_memory() if self.device.type == "cpu" else (False, "")  # no fresh pages a step
        self.out = Path(t["out"])
        self._lock = None  # taken, with config.yaml written, once data, model and resume check out
        prepare_run_folder(self.out, self.s, resume, write=False)  # checks only: a probe, nothing left behind

        self.train_ds, self.val_ds, self.test_ds = self._datasets()
        self.selection = Selection(resolve_monitor(settings), t["patience"], self.val_ds is not None)
        self.final: dict | None = None
        self.model_name = settings["model"]["name"]
        frame_hw = tuple(self.train_ds.frames.shape[-2:])
        self.cfg = model_config(settings, frame_hw)
        torch.manual_seed(t["seed"])
        self.model = reference_init(build_model(self.model_name, self.cfg, backend=t["backend"])).to(self.device)
        self.module = self.model
        if self.world > 1:
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        self.steps_per_epoch = self._steps_per_epoch()
        self.opt = build_optimizer(self.model.parameters(), settings["optim"], fused=self.device.type in ("cuda", "cpu"))
        self.sched = build_scheduler(self.opt, settings["schedule"], t["epochs"], self.steps_per_epoch, settings["optim"]["lr"])
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == torch.float16)
        self.epoch, self.step, self.global_step = 0, 0, 0
        self._saved_step = None  # the global step last.pt holds
        self.history: list[dict] = []
        self.losses: list[float] = []
        self.graphs, self.graph_note = use_graphs(t["cuda_graphs"], self.device,
                                                  train_blockers(self.opt, self.amp, self.world))
        self.on_device = False
        self._lr = []
        self.loss_read_every = 1 if self.device.type == "cpu" else 25  # a read makes the host wait for the GPU
        if self.graphs:
            self._setup_graphs()
        else:  # the same step, eager, with the GradScaler fp16 needs
            self.runner = TrainRunner(self.model, self.model_name, self.train_ds, self.opt, t["batch_size"], self.device,
                                      self.amp, graph=False, static=False, gather=False, scaler=self.scaler)
        if resume:
            self._load(resume)
        if self.main:  # (the others probed above, before DDP's first collective; now rank 0's lock would stop them)
            self._lock = prepare_run_folder(self.out, self.s, resume)
        self.log = RunLog(self.out) if self.main else None

    def _setup_graphs(self) -> None:
        """Capturable optimiser, dataset on the GPU if it fits, the captured step (built lazily)."""
        make_capturable(self.opt, self.device)
        self._lr = [g["lr"] for g in self.opt.param_groups]
        if fits_on_device((self._train_full, self.test_ds), self.device):
            self._train_full.to(self.device)  # the train and validation views share its stores
            self.train_ds, self.val_ds = self._views()
            self.test_ds.to(self.device)
            self._flips = StableFlips(self.train_ds)  # one flips tensor for the graph to read
            self.on_device = True
        self.runner = TrainRunner(self.module, self.model_name, self.train_ds, self.opt, self.s["train"]["batch_size"],
                                  self.device, self.amp, graph=True,
                                  strict=graph_setting(self.s["train"]["cuda_graphs"]) == "on")
        self._eval_cache: dict = {}

    # ---------------------------------------------------------------- set-up
    def _datasets(self):
        d = self.s["data"]
        kw = dict(num_frames=d["num_frames"], stride=d["stride"], current_seconds=d["current_seconds"],
                  task=self.s["model"]["task"], seed=self.s["train"]["seed"])
        self._train_full = FMFDataset(d["root"], split="train", train=True, **kw)
        test = FMFDataset(d["root"], split="test", train=False, **kw)
        if len(self._train_full) == 0 or len(test) == 0:
            raise SettingsError(f"{d['root']}: the train or test split is empty")
        if d["val_split"]:
            self._split = splits.from_file(self._train_full, d["val_split"])
        else:
            self._split = splits.carve(self._train_full, d["val_fraction"])
        n = self._split[2]
        if (d["val_split"] or d["val_fraction"] > 0) and (n["val"] == 0 or n["train"] == 0):
            raise SettingsError(f"{d['root']}: the validation split leaves {n['train']} training and {n['val']} validation "
                                f"samples (guard gap {max(n['guard_frames'])} frames); give data.val_split=FILE.json, "
                                "or data.val_fraction=0 to train without validation")
        return (*self._views(), test)

    def _views(self):
        """(train, validation or None) views of the train split's samples (data/splits.py)."""
        t, v, _ = self._split
        full = self._train_full
        return full.subset(t, train=True), (full.subset(v, train=False) if len(v) else None)

    def _steps_per_epoch(self) -> int:
        t = self.s["train"]
        n = min(t["max_train_samples"] or len(self.train_ds), len(self.train_ds))
        per_rank = math.ceil(n / self.world)
        return math.ceil(per_rank / t["batch_size"])

    # ---------------------------------------------------------------- checkpoints
    def _state(self) -> dict:
        d = self.s["data"]
        state = ckpt.model_payload(self.model_name, self.module, {
            "root": str(d["root"]), "num_frames": d["num_frames"], "stride": d["stride"],
            "current_seconds": d["current_seconds"], "frame_size": list(self.cfg.frame_hw),
        })
        state.update(
            settings=self.s, epoch=self.epoch, step=self.step, global_step=self.global_step,
            optimizer=portable_state_dict(self.opt), scheduler=self.sched.state_dict(), scaler=self.scaler.state_dict(),
            rng={"torch": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state(self.device)} if self.device.type == "cuda" else {})},
            history=self.history, losses=self.losses, selection=self.selection.state_dict(), final=self.final,
        )
        return state

    def _save(self, name: str) -> None:
        if self.main:
            finite.check_weights(self.module, self.global_step, finite.saved_note(self.out, self._saved_step))
            state = self._state()
            if name == "best.pt":  # what chose it, and the threshold it calibrated on validation
                state.update(selected_by=self.selection.record(), threshold=self.selection.threshold)
            ckpt.save(self.out / name, state)
            self._saved_step = self.global_step if name == "last.pt" else self._saved_step

    def _load(self, path) -> None:
        state = ckpt.read(path, map_location="cpu")
        if state.get("format") != ckpt.FORMAT or "optimizer" not in state:
            raise ckpt.CheckpointError(f"{path}: not an fmfast training checkpoint (it holds weights only; evaluate it instead)")
        diff = settings_diff(comparable(state["settings"]), comparable(self.s))
        if diff:
            raise ckpt.CheckpointError(f"{path}: was trained with different settings ({', '.join(diff[:6])})")
        self.module.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        if self.graphs:  # loading replaced the learning-rate tensors with the saved floats
            make_capturable(self.opt, self.device)
            self._lr = [g["lr"] for g in self.opt.param_groups]
        self.sched.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        self.epoch, self.step, self.global_step = state["epoch"], state["step"], state["global_step"]
        self._saved_step = self.global_step
        self.history, self.losses = state["history"], state["losses"]
        self.selection.load_state_dict(state.get("selection", {}))
        self.final = state.get("final")
        self.console.print(f"resumed from {path}: epoch {self.epoch + 1}, step {self.step}")

    # ---------------------------------------------------------------- loop
    def _train_step(self, idx: torch.Tensor) -> torch.Tensor:
        """One optimiser step; the loss stays a device tensor (reading it would sync)."""
        loss = self.runner(idx)
        self.sched.step()
        for g, lr in zip(self.opt.param_groups, self._lr):  # (captured runs only)
            if g["lr"] is not lr:  # a scheduler that assigns floats: keep the graph's tensor
                lr.fill_(float(g["lr"]))
                g["lr"] = lr
        return loss

    def fit(self) -> dict:
        with dist.peer_errors(self.world, self.rank):  # a lost peer is one line, within the timeout
            return self._fit()

    def _fit(self) -> dict:
        t = self.s["train"]
        every = t["checkpoint_every"]
        self._log_start()
        with progress_bar(self.console, disable=not self.main) as progress:
            while self.epoch < t["epochs"] and not self.selection.stopped:
                self.final = None  # a resumed run that trains on is tested again at its end
                (self._flips if self.on_device else self.train_ds).set_epoch(self.epoch)
                order = dist.shard(epoch_order(len(self.train_ds), t["seed"], self.epoch, t["max_train_samples"]), self.rank, self.world)
                if self.on_device:  # uploaded once per epoch: per step nothing crosses PCIe
                    order = order.to(self.device)
                batches = order.split(t["batch_size"])
                bar = progress.add_task(f"epoch {self.epoch + 1}/{t['epochs']}", total=len(order), loss=float("nan"),
                                        completed=min(self.step * t["batch_size"], len(order)))
                # a resumed epoch's mean loss covers the steps before the interruption too
                run_loss = self.losses[len(self.losses) - self.step:] if self.step else []
                t0, seen, pending = time.perf_counter(), 0, []
                for i in range(self.step, len(batches)):
                    pending.append(self._train_step(batches[i]))
                    self.step, self.global_step = i + 1, self.global_step + 1
                    seen += len(batches[i])
                    save = every and self.step % every == 0 and self.step < len(batches)
                    if len(pending) >= self.loss_read_every or save or self.step == len(batches):
                        losses = torch.stack(pending).tolist()  # the one host sync in a while
                        pending.clear()
                        finite.check_losses(losses, self.global_step, finite.saved_note(self.out, self._saved_step))
                        self.losses += losses
                        run_loss += losses
                        progress.update(bar, loss=sum(run_loss[-20:]) / len(run_loss[-20:]))
                    progress.update(bar, advance=len(batches[i]))
                    if save:
                        self._save("last.pt")
                train_time = time.perf_counter() - t0
                progress.remove_task(bar)
                self._end_epoch(progress, run_loss, seen, train_time)
            if self.final is None and self.main:
                self._test(progress)
        dist.barrier(self.world)  # the other ranks wait for the test pass
        dist.cleanup(self.world)
        if self._lock:
            self._lock.release()
        return self.summary()

    def _end_epoch(self, progress, run_loss, seen, train_time):
        metrics = {}
        if self.main:
            if self.val_ds is not None:
                metrics, self._examples = self._evaluate(self.val_ds, progress)
        row = {
            "epoch": self.epoch + 1,
            "train_loss": sum(run_loss) / len(run_loss) if run_loss else float("nan"),
            "train_samples_per_s": seen * self.world / train_time if train_time > 0 else float("nan"),
            "lr": float(self.opt.param_groups[0]["lr"]),
            "val": metrics,
        }
        self.history.append(row)
        self.epoch, self.step = self.epoch + 1, 0
        if self.main:
            improved = self.selection.update(row["epoch"], metrics)
            if improved:
                self._save("best.pt")
            self._save("last.pt")
            self.log.write(self.history, None)
            self.log.scalars(row, row["epoch"])
            self._log_epoch(row, improved)
            self._report(self.history, getattr(self, "_examples", None), row["epoch"])
        dist.barrier(self.world)

    def _evaluate(self, ds, progress, threshold=None):
        t = self.s["train"]
        return evaluate(self.module, self.model_name, ds, t["eval_batch_size"], self.device, self.amp, t["max_eval_samples"],
                        progress, keep=8, cuda_graphs=self.graphs, cache=getattr(self, "_eval_cache", None), threshold=threshold)

    def _report(self, rows, examples, step):
        from fmfast.engine import plots  # matplotlib: only when a report is drawn

        plots.training_report(self.out, rows, self.losses, self.cfg.task, examples)
        self.log.images(step)

    def _test(self, progress) -> None:
        """The test split, once: the selected checkpoint at 0.5 and at the calibrated threshold."""
        best = ckpt.read(self.out / "best.pt")
        trained = {k: v.clone() for k, v in self.module.state_dict().items()}  # last.pt keeps the last weights
        self.module.load_state_dict(best["model"])
        threshold = best.get("threshold")
        metrics, examples = self._evaluate(self.test_ds, progress, threshold=0.5 if threshold is None else threshold)
        self.module.load_state_dict(trained)
        metrics.pop("calibration", None)  # test's own best threshold would be chosen on test: not reported
        self.final = {"final": True, "checkpoint": "best.pt", "selected_by": best["selected_by"], "test": metrics}
        self._save("last.pt")  # the finished run remembers its test row (a resume trains on, or ends)
        self.log.write(self.history, self.final)
        self.log.scalars({"test": metrics}, self.epoch)
        self._report(self.history + [self.final], examples, self.epoch)
        self.log.close()
        self.console.print(f"test split, once, with best.pt (epoch {best['selected_by']['epoch']}"
                           f"{', ' + str(best['selected_by']['metric']) if best['selected_by']['metric'] else ''})")

    def summary(self) -> dict:
        """The run's outcome: the selected epoch's validation metrics, the test metrics, paths."""
        rec = self.selection.record()
        val = next((r["val"] for r in self.history if r["epoch"] == rec["epoch"]), {})
        return {"val": val, "test": (self.final or {}).get("test", {}), "selected_by": rec,
                "threshold": self.selection.threshold, "epochs": self.epoch, "stopped_early": self.selection.stopped,
                "run": self.out, **{k: self.out / f for k, f in (("best", "best.pt"), ("last", "last.pt"),
                                                                 ("metrics", "metrics.jsonl"))}}

    # ---------------------------------------------------------------- reporting
    def _log_start(self):
        n_params = sum(p.numel() for p in self.module.parameters())
        d, n = self.s["data"], self._split[2]
        self.console.print(
            f"[bold]fmfast[/] training {self.model_name} ({self.cfg.task}, {n_params:,} parameters) on {d['root']}\n"
            f"  train {len(self.train_ds):,} / val {n['val']:,} / test {len(self.test_ds):,} samples"
            f" ({n['dropped']:,} in the guard gap of {max(n['guard_frames'])} frames) · clip {self.cfg.num_frames}×{self.cfg.frame_hw[0]}×{self.cfg.frame_hw[1]}"
            f" stride {d['stride']} · current {self.cfg.current_len}×3 · batch {self.s['train']['batch_size']}"
            f" · {self.device} · amp {self.amp or 'off'} · backend {self.s['train']['backend']} · {self.world} process(es)\n"
            f"  cuda graphs {self.graph_note}{' · data on the GPU' if self.on_device else ''}{f' · {self.memory[1]}' if self.memory[0] else ''} · run folder {self.out}"
        )

    def _log_epoch(self, row, improved):
        from rich.table import Table

        m = row["val"]
        table = Table(show_header=self.epoch == 1 or not hasattr(self, "_printed"), box=None, pad_edge=False)
        self._printed = True
        cols = ["epoch", "loss", "lr", "train/s"]
        keys = ["accuracy", "f1", "fdr", "mdr", "auroc"] if self.cfg.task == "classification" else ["pixel_accuracy", "miou", "frame_accuracy"]
        for c in cols + keys + ["best"]:
            table.add_column(c, justify="right", min_width=8)
        table.add_row(str(row["epoch"]), f"{row['train_loss']:.4f}", f"{row['lr']:.2e}", f"{row['train_samples_per_s']:.0f}",
                      *[f"{m.get(k, float('nan')):.4f}" for k in keys], "*" if improved else "")
        self.console.print(table)
