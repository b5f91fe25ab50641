"""Built-in passes. Importing this package registers every pass module below."""

from fxcompress.passes import cleanup  # noqa: F401
from fxcompress.passes import prune  # noqa: F401
from fxcompress.passes import sparsity  # noqa: F401
from fxcompress.passes import guards  # noqa: F401
from fxcompress.passes import fold_constants  # noqa: F401
from fxcompress.passes import simplify_algebra  # noqa: F401
from fxcompress.passes import cse  # noqa: F401
from fxcompress.passes import zero_branches  # noqa: F401
from fxcompress.passes import fold_batchnorm  # noqa: F401
from fxcompress.passes import linear_chains  # noqa: F401
from fxcompress.passes import fused_activations  # noqa: F401
from fxcompress.passes import reshapes  # noqa: F401
from fxcompress.passes import parallel_convs  # noqa: F401
from fxcompress.passes import quantize  # noqa: F401
from fxcompress.passes import quantize_dynamic  # noqa: F401
from fxcompress.passes import quantize_weights  # noqa: F401
from fxcompress.passes import precision  # noqa: F401
from fxcompress.passes import space_to_depth  # noqa: F401
from fxcompress.passes import smooth_quant  # noqa: F401
from fxcompress.passes import equalize  # noqa: F401
from fxcompress.passes import equalize_attention  # noqa: F401
from fxcompress.passes import bias_correction  # noqa: F401
from fxcompress.passes import rms_norm  # noqa: F401
from fxcompress.passes import grouped_attention  # noqa: F401
from fxcompress.passes import presets  # noqa: F401 - last: presets name the passes above
