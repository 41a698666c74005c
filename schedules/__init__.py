"""Schedules, kernels and tuning. Importing it makes TVMScript parsing cheap (see tvmscript_import)."""

from .tvmscript_import import install as _install_fast_tvmscript

_install_fast_tvmscript()
