"""The user's task metric on the user's data: the original model in PyTorch beside exported files
in ONNX Runtime.

- classifiers (image or text) with labelled data: top-1 accuracy;
- causal LMs: perplexity of the text (lower is better);
- encoders (feature extraction): mean cosine of each example's embedding (the first output,
  mean-pooled over the positions the attention mask keeps) with the original's.

``evaluate_original`` and ``evaluate_onnx`` give one :class:`TaskMetric`; ``module_metric``
(``decoder_metric`` for causal LMs: minus the relative perplexity rise) makes the
``evaluate(module) -> float`` callable (higher is better) that the accuracy-aware search takes.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from fxcompress.errors import InputError

NAMES = {"top1": "top-1 accuracy", "perplexity": "perplexity", "cosine": "embedding cosine vs the original"}


@dataclass
class TaskMetric:
    """One figure of one model: ``name`` ("top1", "perplexity", "cosine"), ``value``, on ``count`` examples."""

    name: str
    value: float
    count: int

    @property
    def higher_is_better(self) -> bool:
        return self.name != "perplexity"

    def to_text(self) -> str:
        """The value as the metric is read: a percentage for top-1, four decimals otherwise."""
        return f"{self.value:.2%}" if self.name in ("top1",) else f"{self.value:.4f}"

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-ready): metric name, value and the number of examples."""
        return {"metric": self.name, "value": self.value, "examples": self.count}

    def __str__(self) -> str:
        return self.to_text()


def metric_kind(task: str | None) -> str:
    """Which metric a task is measured by."""
    if task in ("image-classification", "text-classification"):
        return "top1"
    if task == "causal-lm":
        return "perplexity"
    if task == "feature-extraction":
        return "cosine"
    raise InputError(f"fxcompress does not know which metric fits a model of task {task or 'unknown'}.",
                     "use an hf:, timm: or torchvision: model (classifier, encoder or causal LM), or pass evaluate= from Python.")


def _first(outputs: Any) -> torch.Tensor:
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, dict) or hasattr(outputs, "keys"):
        return outputs["logits"] if "logits" in outputs else next(iter(outputs.values()))
    return _first(outputs[0])


def call_model(model: Any, batch: Any) -> torch.Tensor:
    """The first output (logits, else the first field) of ``model`` on one batch in its own form."""
    with torch.no_grad():
        if isinstance(batch, dict):
            return _first(model(**batch))
        return _first(model(*batch) if isinstance(batch, (tuple, list)) else model(batch))


def _pooled(output: torch.Tensor, batch: Any) -> torch.Tensor:
    """``[batch, features]``: a ``[batch, sequence, ...]`` output mean-pooled over kept positions."""
    output = output.float()
    if output.dim() >= 3:
        mask = batch.get("attention_mask") if isinstance(batch, dict) else None
        if mask is not None and mask.shape == output.shape[:2]:
            weights = mask.to(output.dtype).unsqueeze(-1)
            return (output * weights).sum(1) / weights.sum(1).clamp(min=1)
        return output.mean(1)
    return output.flatten(1)


def _progress(items: Sequence[Any], what: str | None) -> Any:
    if what is None or len(items) < 8:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=what, leave=False)


def _score(kind: str, run: Callable[[Any], torch.Tensor], data: Any, reference: list[torch.Tensor] | None,
           what: str | None) -> TaskMetric:
    batches = list(data)
    if kind == "top1":
        labels = data.require_labels()
        correct = total = 0
        for batch, label in zip(_progress(batches, what), labels):
            correct += int((run(batch).argmax(-1).flatten() == label.flatten()).sum())
            total += label.numel()
        return TaskMetric("top1", correct / max(total, 1), total)
    if kind == "cosine":
        values = []
        for i, batch in enumerate(_progress(batches, what)):
            got = _pooled(run(batch), batch)
            want = reference[i] if reference is not None else got
            values.extend(torch.nn.functional.cosine_similarity(got, want, dim=-1).tolist())
        return TaskMetric("cosine", float(np.mean(values)), len(values))
    raise AssertionError(kind)


def _perplexity(logits_of: Callable[[torch.Tensor], np.ndarray], data: Any, what: str | None) -> TaskMetric:
    total, count = 0.0, 0
    for batch in _progress(list(data), what):
        ids = batch["input_ids"] if isinstance(batch, dict) else batch[0]
        mask = batch.get("attention_mask") if isinstance(batch, dict) else None
        if ids.shape[1] < 2:
            continue
        logits = torch.as_tensor(np.asarray(logits_of(ids)), dtype=torch.float32)
        losses = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
        keep = mask[:, 1:].flatten().bool() if mask is not None else torch.ones_like(losses, dtype=torch.bool)
        total += float(losses[keep].sum())
        count += int(keep.sum())
    if count == 0:
        raise InputError("The evaluation text has no line of two tokens or more, so perplexity is undefined.",
                         "give longer lines of text.")
    return TaskMetric("perplexity", math.exp(total / count), count)


def evaluate_original(model: Any, task: str | None, data: Any, progress: bool = False) -> tuple[TaskMetric, list[torch.Tensor] | None]:
    """The metric of the PyTorch model, and (for encoders) its pooled embeddings as the reference."""
    kind = metric_kind(task)
    label = "evaluating the original" if progress else None
    if kind == "perplexity":
        return _perplexity(lambda ids: call_model(model, {"input_ids": ids}).numpy(), data, label), None
    reference = [_pooled(call_model(model, b), b) for b in data] if kind == "cosine" else None
    return _score(kind, lambda b: call_model(model, b), data, reference, label), reference


def onnx_runner(path: str | os.PathLike, provider: str = "cpu") -> Callable[[Any], torch.Tensor]:
    """Run an exported (non-decoder) ONNX file on one batch in the model's form; feeds by input
    name (keyword batches, or positional ones by the input names the export recorded); returns the ``logits`` output, else the first."""
    from fxcompress.runtime.session import create_session, to_numpy

    runtime = create_session(path, provider)
    session = runtime.session
    names = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    wanted = ["logits"] if "logits" in outputs else [outputs[0]]

    def run(batch: Any) -> torch.Tensor:
        if isinstance(batch, dict):
            missing = [n for n in names if n not in batch]
            if missing:
                raise InputError(f"The data has no input {missing} that the ONNX file takes.",
                                 "evaluate with data preprocessed for this model.")
            feeds = {n: to_numpy(batch[n]) for n in names}
        else:
            # by the names the export recorded: a dropped unused input is left out, not shifted onto the next
            feeds = runtime.feeds(batch if isinstance(batch, (tuple, list)) else (batch,))
        return torch.from_numpy(np.asarray(session.run(wanted, feeds)[0]))

    return run


def evaluate_onnx(path: str | os.PathLike, task: str | None, data: Any, reference: list[torch.Tensor] | None = None,
                  provider: str = "cpu", progress: bool = False) -> TaskMetric:
    """The metric of an exported file in ONNX Runtime (a decoder: through its prefill graph)."""
    kind = metric_kind(task)
    label = f"evaluating {os.path.basename(os.fspath(path))}" if progress else None
    if kind == "perplexity":
        from fxcompress.runtime.generate import decoder_session, sequence_logits

        session = decoder_session(path, provider)
        return _perplexity(lambda ids: sequence_logits(session, ids), data, label)
    return _score(kind, onnx_runner(path, provider), data, reference, label)


def module_metric(task: str | None, data: Any, reference: list[torch.Tensor] | None = None) -> Callable[[Any], float]:
    """``evaluate(module) -> float`` for compile's accuracy-aware search: top-1, or embedding
    cosine (higher is better) on ``data``, calling the module as the model is called. A causal
    LM's search goes through :func:`decoder_metric` (the module compile_decoder searches over
    takes the KV cache as inputs)."""
    kind = metric_kind(task)
    if kind == "perplexity":
        raise InputError("A causal LM's accuracy-aware search is scored on the decoder graph, not the model's own call.",
                         "use decoder_metric(model, data, original) with fxcompress.compile_decoder(evaluate=...).")
    if kind == "top1":
        data.require_labels()
    return lambda module: _score(kind, lambda b: call_model(module, b), data, reference, None).value


def decoder_metric(model: Any, data: Any, original: TaskMetric) -> Callable[[Any], float]:
    """``evaluate(module) -> float`` for :func:`fxcompress.compile_decoder`'s accuracy-aware search
    on a causal LM: minus the relative rise of the perplexity of ``data`` over ``original``'s.

    The search keeps the score within ``max_metric_drop`` of the original's (about 0), so a budget
    of 0.02 lets the perplexity rise by at most 2% (perplexity is lower-is-better and its scale
    depends on the model and text, hence relative). The module is the flat decoder graph
    (``input_ids, attention_mask, position_ids, *past``; fxcompress.capture_decoder), run as a
    prefill step with an empty cache, as the exported prefill graph runs.
    """
    from fxcompress.capture_decoder import decoder_spec, step_inputs

    spec = decoder_spec(model)

    def evaluate(module: Any) -> float:
        with torch.no_grad():
            perplexity = _perplexity(lambda ids: _first(module(*step_inputs(spec, ids))).float().numpy(), data, None)
        return -(perplexity.value / original.value - 1.0)

    return evaluate


__all__ = ["NAMES", "TaskMetric", "evaluate_onnx", "decoder_metric", "evaluate_original", "metric_kind", "module_metric", "onnx_runner"]
