"""The Serve application builds from settings, and the Serve config file points at it."""

from __future__ import annotations

import importlib
import logging
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


def _actor_options(app: Application) -> dict[str, dict]:
    """Each deployment's ray_actor_options by name (the front binds the others as its args;
    Ray offers no public accessor)."""
    front = app._bound_deployment
    deployments = [front, *(part._bound_deployment for part in front.init_args[1:])]
    return {deployment.name: deployment.ray_actor_options for deployment in deployments}


def test_the_deployments_opening_the_sqlite_index_share_the_sparse_node_resource():
    unpinned = _actor_options(build_app(Settings()))
    assert len(unpinned) == 6 and not any("resources" in o for o in unpinned.values())
    pinned = _actor_options(build_app(Settings(serve={"sparse_node_resource": "ragtune_sqlite"})))
    asking = {name for name, options in pinned.items() if "resources" in options}
    assert asking == {"Sparse", "Trainer"}
    assert pinned["Sparse"] == {"num_cpus": 0, "resources": {"ragtune_sqlite": 0.001}}
    assert pinned["Trainer"]["resources"] == {"ragtune_sqlite": 0.001}
    assert pinned["Trainer"]["num_gpus"] == unpinned["Trainer"]["num_gpus"]


def test_a_serve_config_warns_of_the_proxy_settings_it_does_not_apply(caplog):
    key = "k" * 20
    with caplog.at_level(logging.WARNING, logger="deploy.app"):
        # the host still decides whether the key is required (k8s sets it): no warning
        app_from_config({"serve": {"http_host": "0.0.0.0", "api_key": key}})
        assert caplog.messages == []
        app_from_config({"serve": {"http_port": 9100, "grpc_port": 9200, "api_key": key}})
    assert caplog.messages == [
        "serve.http_port=9100 (RAGTUNE_SERVE__HTTP_PORT) is not applied under a Serve config: "
        "set http_options.port in it",
        "serve.grpc_port=9200 (RAGTUNE_SERVE__GRPC_PORT) is not applied under a Serve config: "
        "gRPC is served only when its grpc_options name the servicer (k8s/README.md)",
    ]
