"""The three models trained at test time on scikit-learn's bundled digits, behind one interface.

Tests and ``benchmarks/trained_models.py`` ask the same question of each: after a preset, what is
the task accuracy through ONNX Runtime against the fp32 file? A :class:`TrainedModel` carries what
that needs: the trained network, an example batch in the export's shape, calibration batches
(training images only: the test split stays unseen), the held-out inputs and labels, and how the
model is pruned and fine-tuned.

  * ``digits-cnn``: :class:`~fxcompress.examples.digits.DigitsCNN` (plain conv-bn-relu), batch 1.
  * ``digits-mobilenet``: :class:`~fxcompress.examples.digits.DigitsMobileNet` (depthwise-separable), batch 1.
  * ``digits-encoder``: :class:`~fxcompress.examples.digits_encoder.DigitsEncoder` (pre-LN transformer
    over variable-length sequences padded to 16 tokens, with an attention mask), batch 16.

Everything is seeded: the same arguments give the same weights on a given machine and thread count
(float reduction order depends on the thread count, so another count trains a slightly different model).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from fxcompress.examples.digits import DigitsCNN, DigitsMobileNet, load_digits_data, onnx_accuracy, train
from fxcompress.examples.digits_encoder import DigitsEncoder, load_digits_sequences, train_encoder


@dataclass
class TrainedModel:
    """A trained digits model and what compiling, fine-tuning and scoring it needs."""

    name: str
    model: nn.Module
    example: tuple[torch.Tensor, ...]
    calibration: list[tuple[torch.Tensor, ...]]
    test_inputs: tuple[torch.Tensor, ...]
    y_test: torch.Tensor
    #: trains a (pruned) module in place: the user's fine-tuning loop
    fine_tune: Callable[[nn.Module], Any]
    #: ``prune-channels`` options this model is pruned with
    prune_options: dict[str, Any] = field(default_factory=dict)
    #: what the fine-tuning run is, in words (tables print it)
    fine_tune_label: str = ""
    #: capture the pruned model with a dynamic batch (fine-tuning batches differ from the example's)
    dynamic_batch: bool = False

    @property
    def batch(self) -> int:
        return int(self.example[0].shape[0])

    def onnx_accuracy(self, path: str | os.PathLike) -> float:
        """Top-1 accuracy of an exported file on the held-out split, in ORT (CPU provider)."""
        return onnx_accuracy(path, self.test_inputs, self.y_test, batch=self.batch)

    def torch_accuracy(self, module: nn.Module) -> float:
        """Top-1 accuracy of a (compiled or original) module in PyTorch, ``self.batch``-free."""
        with torch.no_grad():
            out = module(*self.test_inputs)
        logits = out[0] if isinstance(out, (tuple, list)) else out
        return float((logits.argmax(1) == self.y_test).float().mean())


def _image_calibration(x: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    # 64 training images, one per batch: the batch-1 export's shape, which ORT's quantize_static needs too
    return [(x[i:i + 1],) for i in range(0, 256, 4)]


def trained_digits_cnn(epochs: int = 8, width: int = 32, seed: int = 0, fine_tune_epochs: int = 8) -> TrainedModel:
    """DigitsCNN trained ``epochs`` epochs (Adam); pruned 0.5 (L2) and fine-tuned at batch 8 with a cosine decay.

    Fine-tuning runs 8 epochs. 3 were enough on a Xeon with AVX-512, where training lands on other
    weights (float reduction order differs by CPU); on an AVX2-only AMD EPYC (2026-12-07) the pruned
    CNN ended 1.33 points below fp32 after 3 epochs, 1.11 after 5 and 0.67 after 8 (lr 3e-3); lr 1e-3
    or larger batches did no better.
    """
    return _trained_image_model("digits-cnn", lambda: DigitsCNN(width=width), epochs, seed, fine_tune_epochs)


def trained_digits_mobilenet(epochs: int = 8, width: int = 32, seed: int = 0, fine_tune_epochs: int = 8) -> TrainedModel:
    """DigitsMobileNet trained ``epochs`` epochs (Adam); pruned 0.5 (L2) and fine-tuned like the CNN.

    Width 32 (channels 32-64-128-128), like the CNN's: at width 16 the half left after pruning is
    too small for the task, and 3 epochs of fine-tuning ended about 1.3 points (PyTorch, batch-norm
    folded) to 8 points (measured) below fp32; at width 32, 0.4 points. Fine-tuning runs 5 epochs:
    with the packages installed on 2026-12-04 (numpy 2.4.6, scikit-learn 1.9.1) 3 epochs ended 1.3
    points below fp32 through ORT, 4 epochs 0.9, 5 epochs 0.4, 6 epochs 0.2 (measured 2026-12-04, on a
    Xeon with AVX-512). On an AVX2-only AMD EPYC (2026-12-07) training lands elsewhere: 3 epochs ended
    1.33 points below, 5 epochs 1.56, 8 epochs 0.67; so it runs 8.
    """
    return _trained_image_model("digits-mobilenet", lambda: DigitsMobileNet(width=width), epochs, seed, fine_tune_epochs)


def _trained_image_model(name: str, make: Callable[[], nn.Module], epochs: int, seed: int,
                         fine_tune_epochs: int) -> TrainedModel:
    """The model ``make()`` builds, trained on the digits images (Adam); pruned 0.5 (L2) and
    fine-tuned at batch 8 with a cosine decay."""
    data = load_digits_data(seed)
    torch.manual_seed(seed)  # the initial weights too, whatever earlier imports drew from the RNG
    model = train(make(), data, epochs=epochs, seed=seed)

    def fine_tune(module: nn.Module) -> None:
        train(module, data, epochs=fine_tune_epochs, batch_size=8, schedule="cosine", seed=seed)

    return TrainedModel(name, model, (data.x_train[:1],), _image_calibration(data.x_train),
                        (data.x_test,), data.y_test, fine_tune, {"ratio": 0.5, "importance": "l2"},
                        f"{fine_tune_epochs} epochs, batch 8, cosine")


#: The encoder's batch: its export has a fixed batch, like a served transformer's padded batches.
ENCODER_BATCH = 16


def trained_digits_encoder(epochs: int = 15, width: int = 64, depth: int = 2, seed: int = 0,
                           fine_tune_epochs: int = 8) -> TrainedModel:
    """DigitsEncoder trained ``epochs`` epochs (AdamW, one-cycle); pruned and fine-tuned for ``fine_tune_epochs``.

    Pruning: ``prune-channels`` prunes the MLP hidden widths (``fc1`` -> ``fc2``) by half and the
    residual stream (the group of ``embed``, every ``proj``/``fc2`` output and every LayerNorm) by
    a quarter; attention heads stay whole (the analysis refuses the reshape into heads). Halving
    the residual stream too cost about 3 points after 5 epochs of fine-tuning (measured): every
    LayerNorm then normalizes over half the features, a larger change than dropping MLP units.
    """
    data = load_digits_sequences(seed)
    torch.manual_seed(seed)
    model = train_encoder(DigitsEncoder(width=width, depth=depth), data, epochs=epochs, seed=seed)

    def fine_tune(module: nn.Module) -> None:
        train_encoder(module, data, epochs=fine_tune_epochs, lr=1e-3, seed=seed)

    b = ENCODER_BATCH
    calibration = [(data.tokens_train[i:i + b], data.mask_train[i:i + b]) for i in range(0, 256, b)]
    return TrainedModel("digits-encoder", model, (data.tokens_train[:b], data.mask_train[:b]), calibration,
                        (data.tokens_test, data.mask_test), data.y_test, fine_tune,
                        {"ratio": 0.5, "importance": "l2", "overrides": {"embed": 0.25}},
                        f"{fine_tune_epochs} epochs, AdamW lr 1e-3, one-cycle", dynamic_batch=True)


#: name -> factory, in table order
TRAINED_MODELS: dict[str, Callable[..., TrainedModel]] = {
    "digits-cnn": trained_digits_cnn,
    "digits-encoder": trained_digits_encoder,
    "digits-mobilenet": trained_digits_mobilenet,
}


def prune_and_fine_tune_trained(trained: TrainedModel, **prune_options: Any):
    """The ``prune`` preset with the model's options (``prune_options`` override them), then its
    fine-tuning run on ``result.module``. Returns the CompileResult (module fine-tuned, in eval mode)."""
    import fxcompress
    from fxcompress.passes.presets import prune

    recipe = prune().set_options("prune-channels", {**trained.prune_options, **prune_options})
    result = fxcompress.compile(trained.model, trained.example, recipe,
                                options=fxcompress.CompileOptions(dynamic_batch=trained.dynamic_batch))
    trained.fine_tune(result.module)
    result.module.eval()
    return result


__all__ = ["ENCODER_BATCH", "TRAINED_MODELS", "TrainedModel", "prune_and_fine_tune_trained", "trained_digits_cnn",
           "trained_digits_encoder", "trained_digits_mobilenet"]
