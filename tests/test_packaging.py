"""Packaging metadata: setuptools reads pyproject.toml without a deprecation warning."""
from __future__ import annotations

import warnings

from conftest import REPO


def test_pyproject_license_is_an_spdx_string():
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dist = apply_configuration(Distribution(), REPO / "pyproject.toml")
    assert dist.metadata.license_expression == "Apache-2.0"
    assert not [w for w in caught if "license" in str(w.message)], [str(w.message) for w in caught]
