"""What trainer and analyze share without either owning it: atomic file writes and folder locks
(`atomic`), and small checks of values both read from untrusted files or flags (`checks`)."""
