"""Offline analysis of training checkpoints (see analyze.cli)."""
