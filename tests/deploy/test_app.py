"""The Serve application builds from settings, and the Serve config file points at it."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml
from ray.serve import Application

from deploy.app import _require_urls, app_from_config, build_app
from shared.settings import Settings

CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "serve_config.yaml"


def test_build_app_binds_every_service():
    app = build_app(Settings())
    assert isinstance(app, Application)


def test_serve_config_import_path_is_the_builder():
    config = yaml.safe_load(CONFIG.read_text())
    (application,) = config["applications"]
    module, _, name = application["import_path"].partition(":")
    assert getattr(importlib.import_module(module), name) is app_from_config
    assert config["http_options"]["host"] == "127.0.0.1"
    assert isinstance(app_from_config(application["args"]), Application)


def test_config_args_override_settings():
    assert isinstance(app_from_config({"serve": {"http_port": 9100}}), Application)
    with pytest.raises(ValueError, match="http_port"):
        app_from_config({"serve": {"http_port": "nope"}})


def test_replicas_refuse_to_start_without_server_urls():
    with pytest.raises(ValueError, match="RAGTUNE_REDIS__URL and RAGTUNE_MILVUS__URI"):
        _require_urls(Settings())


def test_a_trainer_set_to_cuda_asks_for_a_gpu_wherever_the_app_is_built():
    from deploy.app import _trainer_gpus

    # the process building the app may run on a head without a GPU: cuda asks regardless
    assert _trainer_gpus(Settings(trainer={"device": "cuda"})) == 1
    assert _trainer_gpus(Settings(trainer={"device": "cpu"})) == 0
