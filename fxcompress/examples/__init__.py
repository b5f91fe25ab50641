"""Built-in examples (the README's quick start runs ``fxcompress demo``)."""
