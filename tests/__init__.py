"""AnyProxy tests, run by trial."""

from hypothesis import settings

# No per-example deadline: on a loaded CI machine a slow example is not a
# failure.  Tests that bound speed measure it themselves (CPU time).
settings.register_profile("anyproxy", deadline=None)
settings.load_profile("anyproxy")
