"""AnyProxy tests, run by trial."""
