"""fxcompress: graph-level compiler passes for PyTorch models.

Capture a model as a torch.fx graph, run fusion, pruning, quantization and sparsity passes, and
export verified ONNX:

    import fxcompress
    result = fxcompress.compile(model, (example,), recipe="default")
    result.export_onnx("model.onnx")
    fxcompress.validate("model.onnx", model, (example,)).passed
    fxcompress.benchmark("model.onnx", (example,), provider="cpu").p50_ms
    print(fxcompress.compare(result, model))   # vs the plain export: parity, interleaved latency, size
    fxcompress.sweep(["torchvision:resnet18", ...], ["default", "int8"], log="sweep.jsonl", workers=2)
    loaded = fxcompress.load_model("hf:./my-vit")                  # hf:, timm:, torchvision: specs (offline)
    photos = fxcompress.data.images("photos/", model=loaded)       # the user's data, preprocessed the model's way
"""

from fxcompress.version import __version__  # noqa: E402,F401

from fxcompress.api import CompileOptions, CompileReport, CompileResult, compile, diff  # noqa: E402
from fxcompress.runtime.parity import validate  # noqa: E402
from fxcompress.runtime.timing import benchmark  # noqa: E402
from fxcompress.comparison import ComparisonReport, compare  # noqa: E402
from fxcompress.decoder import DecoderCompileResult, compile_decoder, generate  # noqa: E402
from fxcompress.sweeps import SweepOptions, SweepResult, sweep  # noqa: E402
from fxcompress.loading import load_model  # noqa: E402
from fxcompress import data  # noqa: E402,F401 - fxcompress.data.images / .text / .load
from fxcompress.errors import (  # noqa: E402
    CaptureError,
    DriftError,
    ExportError,
    FxCompressError,
    InputError,
    ModelFileError,
    PassError,
    RecipeError,
    RuntimeProviderError,
    UntrustedFileError,
)
from fxcompress.infra.recipe import Recipe  # noqa: E402
from fxcompress.infra.registry import register  # noqa: E402 - the decorator that makes a user's pass usable by name
import fxcompress.passes  # noqa: E402,F401 - registers the built-in passes, presets and leaf functions

__all__ = [
    "CaptureError", "ComparisonReport", "CompileOptions", "CompileReport", "CompileResult", "DecoderCompileResult",
    "DriftError", "ExportError", "FxCompressError", "InputError", "ModelFileError", "PassError", "Recipe", "RecipeError",
    "RuntimeProviderError", "SweepOptions", "SweepResult", "UntrustedFileError", "benchmark", "compare", "compile",
    "compile_decoder", "data", "diff", "generate", "load_model", "register", "sweep", "validate",
]
