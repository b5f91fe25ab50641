"""The model zoo the sweeps run: every torchvision classifier, small-config transformers models
and a handful of timm architectures, all with random weights (nothing is downloaded).

Each zoo model is also a CLI / ``fxcompress.sweep`` spec, ``benchmarks.zoo:NAME`` (this module
answers any zoo name as a factory), so the test sweep and ``fxcompress sweep`` build the very
same model with the very same inputs:

    fxcompress sweep --specs-file benchmarks/results/sweeps/zoo_specs.txt --log default.jsonl

Weights are seeded; batch-norm statistics are randomised (so folding is exercised on
non-trivial values) and all-zero weight matrices get values (torchvision's ViT head, which
``default`` would rightly fold to a constant).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from benchmarks.common import unzero_weights
from tests.models import TOO_BIG, randomize_bn

#: timm architectures in the zoo (``timm-NAME``): reparameterizable, depthwise, hybrid and
#: transformer families that torchvision lacks, built with ``timm.create_model(name, pretrained=False)``.
TIMM_MODELS = ["mobileone_s0", "repvgg_a0", "fastvit_t8", "ghostnet_100", "mobilevit_xxs", "levit_128s",
               "deit_tiny_patch16_224", "convnext_atto", "efficientformer_l1", "resnet10t"]
TIMM_CI = ["timm-repvgg_a0", "timm-convnext_atto"]  # the ones fast enough for every CI run


def _transformers_models() -> dict[str, Callable[[], tuple[nn.Module, tuple[torch.Tensor, ...]]]]:
    import transformers

    def bert(tiny: bool):
        width, layers = (32, 2) if tiny else (128, 4)
        config = transformers.BertConfig(hidden_size=width, num_hidden_layers=layers, num_attention_heads=4,
                                         intermediate_size=2 * width, vocab_size=1000, max_position_embeddings=128)
        return transformers.BertModel(config), (torch.randint(0, 1000, (1, 32)),)

    def gpt2():
        config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=1000, n_positions=128,
                                         use_cache=False, bos_token_id=0, eos_token_id=0)
        return transformers.GPT2Model(config), (torch.randint(0, 1000, (1, 32)),)

    def vit():
        config = transformers.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=128, image_size=64, patch_size=16)
        return transformers.ViTModel(config), (torch.randn(1, 3, 64, 64),)

    return {"hf-bert-tiny": lambda: bert(True), "hf-bert": lambda: bert(False), "hf-gpt2": gpt2, "hf-vit": vit}


HF_MODELS = ["hf-bert-tiny", "hf-bert", "hf-gpt2", "hf-vit"]


def torchvision_models() -> list[str]:
    """Every torchvision classification model name (the zoo's torchvision part, TOO_BIG included)."""
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))


def timm_available() -> bool:
    """Whether timm is installed (its models join the zoo only then)."""
    import importlib.util

    return importlib.util.find_spec("timm") is not None


def names(timm: bool = True) -> list[str]:
    """The zoo: torchvision classifiers, then transformers configs, then (with ``timm``) timm models."""
    return [*torchvision_models(), *HF_MODELS, *([f"timm-{n}" for n in TIMM_MODELS] if timm else [])]


def build(name: str) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Zoo model ``name`` in eval mode (seeded random weights) and its example inputs."""
    torch.manual_seed(0)
    if name in HF_MODELS:
        model, inputs = _transformers_models()[name]()
        return model.eval(), inputs
    if name.startswith("timm-"):
        import timm

        model = timm.create_model(name.removeprefix("timm-"), pretrained=False)
        size = model.pretrained_cfg.get("input_size", (3, 224, 224))
        return randomize_bn(unzero_weights(model)).eval(), (torch.randn(1, *size),)
    import torchvision

    model = unzero_weights(torchvision.models.get_model(name, weights=None))
    size = 299 if name == "inception_v3" else 224
    return randomize_bn(model).eval(), (torch.randn(1, 3, size, size),)


def spec(name: str) -> str:
    """The sweep spec that builds zoo model ``name``."""
    return f"{__name__}:{name}"


def __getattr__(name: str):
    """``benchmarks.zoo:NAME`` as a factory spec: any zoo name answers with its builder."""
    if name.startswith("__"):
        raise AttributeError(name)
    if name in HF_MODELS or name.startswith("timm-") or name in torchvision_models():
        return lambda: build(name)
    raise AttributeError(f"benchmarks.zoo has no model {name!r}")


__all__ = ["HF_MODELS", "TIMM_CI", "TIMM_MODELS", "TOO_BIG", "build", "names", "spec", "timm_available", "torchvision_models"]
