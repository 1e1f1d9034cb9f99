"""Knowledge-base question answering: a plain library that the Ray Serve deployments wrap.

Nothing under this package imports Ray, FastAPI or Starlette, so every piece runs the same in a
test, a script, a notebook or a Serve replica.
"""

__version__ = "0.1.0"
