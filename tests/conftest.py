"""Shared fixtures. Planners are loaded once per session; tests that train load their own copy."""
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hub id must fail at once, not retry for a minute


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from agents import tiny_folder
    return tiny_folder(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    from agents import load_planner
    return load_planner("tiny", folder=tiny_dir)


@pytest.fixture(scope="session")
def smol():
    from agents import load_planner
    return load_planner("cpu")
