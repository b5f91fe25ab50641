"""Seeing what passes did: graph snapshots, diffs and their renderings.

- snapshot / graph_diff: GraphModule snapshots and diffs aligned by name, provenance, structure, layer
- onnx_graph / onnx_diff: the same for ONNX models (structure via networkx Weisfeiler-Lehman hashes)
- align: the node alignment both diffs share
- model_info: ``fxcompress inspect`` figures (ops, parameters, MACs, quantized/sparse share, providers)
- why_not: near-misses of fusion rules, from a compile run's pass records
- render_text / render_html / render_dot: terminal, self-contained HTML report, Graphviz (text_style: colour)
- commands / dispatch: the ``diff`` and ``inspect`` CLI commands, ``fxcompress.diff``
"""
