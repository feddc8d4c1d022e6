"""`serve run driver.serve:app` and `serve run driver.serve:build_app ...`: the names Ray Serve
users type, kept here; the deployment lives in `driver.entrypoints.serve`."""

from driver.entrypoints.serve import app, build_app

__all__ = ["app", "build_app"]
