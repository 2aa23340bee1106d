"""The checkpoint registry: versions, promote, rollback, path confinement (real files)."""

from __future__ import annotations

import json
import threading

import pytest

from shared.registry import Registry, RegistryError, collection_for


def saved_model(folder, step=1, **metrics):
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "ragtune.json").write_text(json.dumps(
        {"kind": "generator", "step": step, "metrics": {"dev": metrics, "history": [1, 2]}}))
    return folder


def test_register_numbers_versions_and_keeps_metrics(tmp_path):
    registry = Registry(tmp_path / "ckpt")
    first = registry.register("generator", saved_model(tmp_path / "a", em=0.5), job_id="j1")
    second = registry.register("generator", saved_model(tmp_path / "b", em=0.7))
    assert (first.version, second.version) == ("v0001", "v0002")
    assert first.metrics == {"dev.em": 0.5} and first.job_id == "j1"
    assert (registry.path_of(second) / "model.safetensors").read_bytes() == b"weights"
    assert registry.serving("generator") is None  # registering does not promote
    assert [v.version for v in registry.view().generator.versions] == ["v0001", "v0002"]


def test_promote_then_rollback_walks_back_to_the_base(tmp_path):
    registry = Registry(tmp_path)
    registry.register("generator", saved_model(tmp_path / "a"))
    registry.register("generator", saved_model(tmp_path / "b"))
    registry.promote("generator", "v0001")
    registry.promote("generator", "v0002")
    assert registry.serving_path("generator") == tmp_path / "generator" / "v0002"
    assert registry.rollback("generator").version == "v0001"
    assert registry.rollback("generator") is None  # the packaged base model again
    with pytest.raises(RegistryError, match="no earlier serving version"):
        registry.rollback("generator")
    assert registry.serving("retriever") is None  # kinds are independent


def test_unknown_kind_version_or_folder_is_refused(tmp_path):
    registry = Registry(tmp_path)
    with pytest.raises(RegistryError, match="unknown model kind 'reader'; known: retriever"):
        registry.promote("reader", None)
    with pytest.raises(RegistryError, match="no version 'v0009'; known: none yet"):
        registry.promote("generator", "v0009")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RegistryError, match="not a saved model folder"):
        registry.register("generator", tmp_path / "empty")


def test_paths_outside_the_checkpoint_directory_are_refused(tmp_path):
    registry = Registry(tmp_path / "ckpt")
    assert registry.inside(tmp_path / "ckpt" / "runs" / "x") == (tmp_path / "ckpt/runs/x").resolve()
    for bad in (tmp_path / "elsewhere", tmp_path / "ckpt" / ".." / "x"):
        with pytest.raises(RegistryError, match="outside the checkpoint directory"):
            registry.inside(bad)
    with pytest.raises(RegistryError, match="outside"):
        registry.run_dir("../../etc")


def test_run_dir_is_a_folder_of_its_own_under_runs(tmp_path):
    # "." and ".." resolve inside the root (runs/ and the root itself): a finished job's tidy-up
    # of such a "run folder" would delete registered weights.
    registry = Registry(tmp_path / "ckpt")
    assert registry.run_dir("j1") == (tmp_path / "ckpt" / "runs" / "j1").resolve()
    for bad in (".", "..", "a/b", "a/.."):
        with pytest.raises(RegistryError, match=f"job id {bad!r} does not name a run folder"):
            registry.run_dir(bad)


def test_concurrent_registrations_get_distinct_versions(tmp_path):
    registry = Registry(tmp_path / "ckpt")
    sources = [saved_model(tmp_path / f"m{i}") for i in range(6)]
    threads = [threading.Thread(target=registry.register, args=("retriever", s))
               for s in sources]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    versions = [v.version for v in registry.view().retriever.versions]
    assert sorted(versions) == [f"v{i:04d}" for i in range(1, 7)]


def test_passage_side_follows_reindex_and_query_only_versions(tmp_path):
    registry = Registry(tmp_path)
    both = saved_model(tmp_path / "both")
    meta = json.loads((both / "ragtune.json").read_text())
    (both / "ragtune.json").write_text(json.dumps({**meta, "reindex": True}))
    v1 = registry.register("retriever", both)
    v2 = registry.register("retriever", saved_model(tmp_path / "q"), passage_version="v0001")
    v3 = registry.register("retriever", saved_model(tmp_path / "q0"))
    assert registry.passage_side(v1) == v1 and registry.passage_side(v2) == v1
    assert registry.passage_side(v3) is None and registry.passage_side(None) is None
    assert collection_for("docs", v1) == "docs_v0001" and collection_for("docs", None) == "docs"


def test_prune_keeps_what_serves_can_roll_back_or_is_searched_and_the_newest(tmp_path):
    registry = Registry(tmp_path)
    both = saved_model(tmp_path / "both")
    meta = json.loads((both / "ragtune.json").read_text())
    (both / "ragtune.json").write_text(json.dumps({**meta, "reindex": True}))
    registry.register("retriever", both)  # v0001: its own passage vectors
    for i in range(2, 8):  # v0002..v0007; v0003 searches v0001's passage vectors
        registry.register("retriever", saved_model(tmp_path / f"r{i}"),
                          passage_version="v0001" if i == 3 else None)
    registry.promote("retriever", "v0002")
    registry.promote("retriever", "v0003")  # serving; v0002 is its rollback
    removed, freed = registry.prune("retriever", keep=1)
    assert [v.version for v in removed] == ["v0004", "v0005", "v0006"]
    assert freed == 3 * sum(f.stat().st_size for f in (tmp_path / "r2").iterdir())
    left = [v.version for v in registry.view().retriever.versions]
    assert left == ["v0001", "v0002", "v0003", "v0007"]
    assert not (tmp_path / "retriever" / "v0004").exists()
    assert (tmp_path / "retriever" / "v0001").is_dir()
    assert registry.rollback("retriever").version == "v0002"  # rollback still works
    # a pruned number is never given again: a collection or a cache may still carry it
    assert registry.register("retriever", saved_model(tmp_path / "new")).version == "v0008"
    registry.prune("retriever", keep=0)  # nothing needs v0001 once v0003 no longer serves
    assert [v.version for v in registry.view().retriever.versions] == ["v0002"]
    assert registry.register("retriever", saved_model(tmp_path / "next")).version == "v0009"
    assert registry.prune("generator") == ([], 0)
    with pytest.raises(RegistryError, match="keep must be 0 or more"):
        registry.prune("generator", keep=-1)
