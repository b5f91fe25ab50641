"""Built-in passes. Importing this package registers every pass module below."""

from fxcompress.passes import cleanup  # noqa: F401
