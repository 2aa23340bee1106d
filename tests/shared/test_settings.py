"""Serve and generator settings: an API key wherever something listens beyond loopback."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from shared.settings import GeneratorSettings, ServeSettings, Settings, is_loopback

KEY = "s3cret-" * 3


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.8.0.1", True), ("::1", True), ("localhost", True),
    ("0.0.0.0", False), ("::", False), ("10.0.0.5", False), ("ragtune.example", False),
])
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_no_key_is_needed_on_loopback():
    serve = Settings().serve
    assert serve.http_host == "127.0.0.1" and serve.api_key is None and serve.grpc_port is None


@pytest.mark.parametrize("fields, message", [
    ({"http_host": "0.0.0.0"}, "serve.http_host '0.0.0.0' is reachable beyond this machine: "
                               "set serve.api_key"),
    ({"grpc_port": 9000}, "Ray Serve's gRPC proxy listens on every interface: set "
                          "serve.api_key"),
    ({"api_key": "short"}, "serve.api_key has to be at least 16 characters"),
])
def test_settings_refuse_to_listen_beyond_loopback_without_a_key(fields, message):
    with pytest.raises(ValidationError, match=message):
        ServeSettings(**fields)


def test_the_http_and_grpc_ports_must_differ(monkeypatch):
    # Serve's gRPC proxy binds every interface: it would collide with HTTP on any http_host.
    message = ("serve.http_port and serve.grpc_port are both 9000: set RAGTUNE_SERVE__HTTP_PORT "
               "or RAGTUNE_SERVE__GRPC_PORT to another port")
    with pytest.raises(ValidationError, match=message):
        ServeSettings(http_port=9000, grpc_port=9000, api_key=KEY)
    monkeypatch.setenv("RAGTUNE_SERVE__API_KEY", KEY)
    monkeypatch.setenv("RAGTUNE_SERVE__GRPC_PORT", "8000")  # the default HTTP port
    with pytest.raises(ValidationError, match="are both 8000"):
        Settings()
    monkeypatch.setenv("RAGTUNE_SERVE__HTTP_PORT", "8001")
    assert (Settings().serve.http_port, Settings().serve.grpc_port) == (8001, 8000)


def test_the_sparse_node_resource_is_unset_or_a_name():
    assert ServeSettings().sparse_node_resource is None
    with pytest.raises(ValidationError, match="sparse_node_resource"):
        ServeSettings(sparse_node_resource="")


def test_a_key_allows_any_address_and_grpc_and_stays_secret():
    serve = ServeSettings(http_host="0.0.0.0", grpc_port=9000, api_key=KEY)
    assert serve.api_key.get_secret_value() == KEY
    assert KEY not in repr(serve) and KEY not in str(serve.model_dump())


def test_the_key_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("RAGTUNE_SERVE__API_KEY", KEY)
    monkeypatch.setenv("RAGTUNE_SERVE__HTTP_HOST", "0.0.0.0")
    assert Settings().serve.api_key.get_secret_value() == KEY


def test_batching_settings_have_bounds():
    assert (GeneratorSettings().max_batch_size, GeneratorSettings().batch_wait_ms) == (8, 10.0)
    with pytest.raises(ValidationError, match="max_batch_size"):
        GeneratorSettings(max_batch_size=0)
    with pytest.raises(ValidationError, match="batch_wait_ms"):
        GeneratorSettings(batch_wait_ms=-1)


def test_a_misspelt_field_of_a_section_is_refused(monkeypatch):
    monkeypatch.setenv("RAGTUNE_SERVE__HTTP_HOTS", "0.0.0.0")
    with pytest.raises(ValidationError, match="serve.http_hots"):
        Settings()
    monkeypatch.delenv("RAGTUNE_SERVE__HTTP_HOTS")
    with pytest.raises(ValidationError, match="api_kee"):
        Settings(serve={"api_kee": "x" * 32})
