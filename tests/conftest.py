"""Shared test settings.

Hypothesis profiles: ``dev`` (few examples, for the edit-test loop) and ``ci`` (more examples,
the default). Pick one with ``HYPOTHESIS_PROFILE=dev``. ``deadline=None`` everywhere: the first
example of a test may include a Numba JIT compile.
"""
import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile(
    "dev", max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "thorough", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
