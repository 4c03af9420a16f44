"""Fixtures of the serving tests: real servers on 127.0.0.1 with free ports."""

from __future__ import annotations

import importlib.util

import pytest

#: Serving tests need nvidia-pytriton (and with it tritonclient and the bundled tritonserver).
HAVE_PYTRITON = importlib.util.find_spec("pytriton") is not None
needs_pytriton = pytest.mark.skipif(
    not HAVE_PYTRITON, reason="serving needs nvidia-pytriton (numpy<2): pip install -e '.[serve]' "
                              "in its own virtual environment (.ci/run does)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("serve") is not None:
            item.add_marker(needs_pytriton)


@pytest.fixture(scope="session")
def av_model_dir(tmp_path_factory):
    """The experiments' tiny trained audiovisual crowd model (exported, tuned)."""
    from trt_exit.experiments.av_crowd import build_tiny_av_export

    return build_tiny_av_export(tmp_path_factory.mktemp("serving_av"), seed=0).root
