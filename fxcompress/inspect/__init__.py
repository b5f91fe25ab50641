"""Seeing what passes did: graph snapshots, diffs and their renderings."""
