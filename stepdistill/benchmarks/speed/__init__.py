"""Speed benchmark: a recipe's training-update overhead over its unavoidable network calls, peak memory, and the
student's sampling speedup over the teacher (``stepdistill bench speed``; see :mod:`.bench`)."""

from .bench import OVERHEAD_TARGET, UNAVOIDABLE, run_speed_bench

__all__ = ["OVERHEAD_TARGET", "UNAVOIDABLE", "run_speed_bench"]
