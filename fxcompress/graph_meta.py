"""The keys fxcompress writes into ``node.meta`` / ``graph_module.meta``, in one place.

Passes stamp facts on nodes that later passes, the exporter and the inspection tools read. Keeping
every key here (and nothing else) lets any layer read them without importing the layer that writes.
"""

from __future__ import annotations

#: ``{"pass": name, "from": [names of the nodes it replaced, and what they came from]}``
PROVENANCE_KEY = "fxcompress_provenance"
