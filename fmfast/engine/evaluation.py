"""The evaluation loop: a model over a split of an FMFDataset -> the field's metrics (and a few
examples for the plots). ``fmfast evaluate`` and the trainer's per-epoch evaluation run it."""
from __future__ import annotations

import time

import torch

from fmfast.engine.metrics import MetricAccumulator, abnormal
from fmfast.engine.predictor import Predictor
from fmfast.engine.step import EvalRunner


@torch.no_grad()
def evaluate(model, model_name: str, ds, batch_size: int, device, amp_dtype=None, max_samples: int = 0,
             progress=None, keep: int = 0, cuda_graphs: bool = False, cache: dict | None = None,
             threshold: float | None = None, collect: dict | None = None) -> tuple[dict, dict]:
    """Run ``model`` over ``ds`` in order -> ``(metrics, examples)``.

    ``examples`` holds ``keep`` inputs' clips, labels and predictions from across the split,
    mostly abnormal ones (for the mask overlay plots); ``metrics`` includes samples/s of the
    whole pass. ``model`` is a module (the trainer's per-epoch evaluation) or an
    ``fmfast.Predictor`` (``fmfast evaluate``: its device, precision and compiled path; the
    arguments naming those are then ignored). ``cuda_graphs`` (CUDA, a module): replay a forward
    captured at ``batch_size``; with ``ds`` on the GPU the batch is gathered inside the graph.
    ``cache`` (a dict the caller keeps) reuses the capture across calls. ``threshold``: also
    report the decision metrics at ``p >= threshold`` (``at_threshold``). ``collect`` (a dict):
    receives the ``accumulator`` and the sample ``order``, for per-sample outputs."""
    out = dict(threshold=threshold, collect=collect)
    if isinstance(model, Predictor):
        return _evaluate(_predicting(model, ds), ds, batch_size, max_samples, progress, keep, model.device, **out)
    was_training = model.training
    model.eval()
    try:
        runner = _runner(model, model_name, ds, batch_size, device, amp_dtype, cuda_graphs and device.type == "cuda",
                         cache)
        return _evaluate(runner, ds, batch_size, max_samples, progress, keep, device,
                         lambda idx: EvalRunner(model, model_name, ds, len(idx), device, amp_dtype, graph=False)(idx),
                         **out)
    finally:
        model.train(was_training)


def _predicting(pred: Predictor, ds):
    """``runner(idx) -> (logits, labels)`` through a Predictor, from host batches."""
    def run(idx):
        clips, currents, labels = ds.batch(idx.cpu())
        return pred(clips, currents), labels.to(pred.device)
    return run


def _evaluate(runner, ds, batch_size, max_samples, progress, keep, device, example_runner=None, threshold=None,
              collect=None):
    example_runner = example_runner or runner
    acc = MetricAccumulator(ds.task)
    # a subset is spread evenly over the split: its first samples would all come from one
    # recording and one event
    order = evenly_spread(len(ds), max_samples or len(ds))
    n = len(order)
    flags = []  # per batch, which samples are worth showing (abnormal by truth or prediction)
    task_id = progress.add_task("evaluate", total=n, loss=float("nan")) if progress is not None else None
    t0 = time.perf_counter()
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        logits, labels = runner(idx)
        acc.update(logits.float(), labels)
        if keep:  # kept on the device: reading it each batch would make the host wait for the GPU
            flags.append(abnormal(labels) | abnormal(logits.float().argmax(1)))
        if progress is not None:
            progress.update(task_id, advance=len(idx))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - t0
    if progress is not None:
        progress.remove_task(task_id)
    examples = _examples(example_runner, ds, _picks(order, flags, batch_size), keep) if keep else {}
    metrics = acc.compute(threshold)
    if collect is not None:
        collect.update(accumulator=acc, order=order)
    metrics["samples"] = n
    metrics["samples_per_s"] = n / elapsed if elapsed > 0 else float("inf")
    return metrics, examples


def _picks(order: torch.Tensor, flags: list, batch_size: int) -> tuple[list, list]:
    """Sample indices worth showing, ``(abnormal, normal)``: each batch's first flagged and first
    unflagged sample (``flags[k]`` for the batch ``order[k*batch_size:...]``)."""
    picks: tuple[list, list] = ([], [])
    if not flags:
        return picks
    for idx, flag in zip(order.split(batch_size), torch.cat(flags).cpu().split(batch_size)):  # one device read
        for want, bucket in ((True, picks[0]), (False, picks[1])):
            hit = (flag == want).nonzero()
            if len(hit):
                bucket.append(int(idx[int(hit[0])]))
    return picks


def evenly_spread(total: int, k: int) -> torch.Tensor:
    """``min(k, total)`` indices into ``range(total)``, evenly spaced over all of it."""
    if k >= total:
        return torch.arange(total)
    return torch.linspace(0, total - 1, k).round().long()


def _examples(runner, ds, picks, keep: int) -> dict:
    """Inputs, labels and predictions of ``keep`` samples, abnormal ones first (for the mask
    overlays): three quarters abnormal where there are enough, the rest normal."""
    flagged, normal = picks
    n_ab = min(len(flagged), keep - min(len(normal), keep // 4))
    idx = torch.tensor([flagged[i] for i in evenly_spread(len(flagged), n_ab)]
                       + [normal[i] for i in evenly_spread(len(normal), keep - n_ab)], dtype=torch.long)
    if not len(idx):
        return {}
    logits, labels = runner(idx)
    logits = logits.float()
    return {"clips": ds.batch(idx)[0].cpu(), "labels": labels.cpu(), "pred": logits.argmax(1).cpu(),
            "prob": torch.softmax(logits, 1)[:, 1].cpu(), "keys": [ds.sample_key(int(i)) for i in idx]}


def _runner(model, model_name, ds, batch_size, device, amp_dtype, graph: bool, cache: dict | None):
    key = (id(model), id(ds), batch_size, amp_dtype, model_name, graph)
    if cache is not None and key in cache:
        return cache[key]
    runner = EvalRunner(model, model_name, ds, batch_size, device, amp_dtype, graph=graph)
    if cache is not None:
        cache[key] = runner
    return runner
