"""Model soups (services/trainer/soup.py): the average of fine-tuned generators' or
retrievers' weights."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM

from services.trainer import loop
from services.trainer.soup import (
    SoupError,
    average_models,
    average_versions,
    interpolate,
    interpolate_version,
)
from shared.registry import Registry, RegistryError
from tests.tiny import bpe_tokenizer, tiny_bert, tiny_llama, tiny_t5

META = {"kind": "generator", "base_model": "tiny", "seq2seq": False,
        "target_format": "<answer> [n]", "no_answer": "I don't know.", "step": 7,
        "metrics": {"em": 0.5}}


@pytest.fixture(scope="module")
def tok():
    return bpe_tokenizer()


def saved(root, name, model, tok, **meta):
    return loop.save_model(root / name, model, tok, {**META, **meta})


def test_the_soup_is_the_mean_of_the_weights_and_says_what_it_averaged(tmp_path, tok):
    a, b = tiny_llama(tok, seed=0), tiny_llama(tok, seed=1)
    sources = [saved(tmp_path, "a", a, tok), saved(tmp_path, "b", b, tok)]
    out = average_models(sources, tmp_path / "soup" / "model")
    soup = AutoModelForCausalLM.from_pretrained(out)
    expected, got = a.state_dict(), soup.state_dict()
    assert got.keys() == expected.keys()
    for name, value in got.items():
        torch.testing.assert_close(value, (expected[name] + b.state_dict()[name]) / 2)
    meta = json.loads((out / "ragtune.json").read_text())
    assert meta["soup_of"] == [str(s) for s in sources]
    assert meta["metrics"] == {} and "step" not in meta  # not evaluated, not a training step
    assert meta["base_model"] == "tiny" and (out / "tokenizer.json").is_file()


def test_three_models_average_in_equal_shares(tmp_path, tok):
    models = [tiny_llama(tok, seed=s) for s in range(3)]
    sources = [saved(tmp_path, str(i), m, tok) for i, m in enumerate(models)]
    soup = AutoModelForCausalLM.from_pretrained(average_models(sources, tmp_path / "soup"))
    name = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(soup.state_dict()[name],
                               sum(m.state_dict()[name] for m in models) / 3)


def test_folders_that_cannot_be_averaged_are_refused_before_anything_is_written(tmp_path, tok):
    a = saved(tmp_path, "a", tiny_llama(tok, seed=0), tok)
    out = tmp_path / "soup"
    with pytest.raises(SoupError, match="two or more model folders, got 1"):
        average_models([a], out)
    (tmp_path / "plain").mkdir()
    with pytest.raises(SoupError, match="plain is not a saved model folder"):
        average_models([a, tmp_path / "plain"], out)
    other_base = saved(tmp_path, "b", tiny_llama(tok, seed=1), tok, base_model="another")
    with pytest.raises(SoupError, match="differ in base_model"):
        average_models([a, other_base], out)
    t5 = saved(tmp_path, "t5", tiny_t5(tok), tok)  # same meta, another architecture
    with pytest.raises(SoupError, match="different parameters"):
        average_models([a, t5], out)
    assert not out.exists()


def test_interpolation_moves_the_tuned_weights_back_towards_a_plain_base_folder(tmp_path, tok):
    base, tuned = tiny_llama(tok, seed=0), tiny_llama(tok, seed=1)
    base.save_pretrained(tmp_path / "base")  # a plain folder, as the packaged model's
    source = saved(tmp_path, "tuned", tuned, tok)
    out = interpolate(tmp_path / "base", source, 0.25, tmp_path / "wise" / "model")
    got = AutoModelForCausalLM.from_pretrained(out).state_dict()
    for name, value in got.items():
        torch.testing.assert_close(
            value, 0.75 * base.state_dict()[name] + 0.25 * tuned.state_dict()[name])
    meta = json.loads((out / "ragtune.json").read_text())
    assert meta["interpolated"] == {"base": str(tmp_path / "base"), "tuned": str(source),
                                    "alpha": 0.25}
    assert meta["metrics"] == {} and "step" not in meta and meta["base_model"] == "tiny"
    with pytest.raises(SoupError, match=r"alpha has to be in \[0, 1\]"):
        interpolate(tmp_path / "base", source, 1.5, tmp_path / "bad")
    with pytest.raises(SoupError, match="is not a saved model folder"):
        interpolate(source, tmp_path / "base", 0.5, tmp_path / "bad")
    with pytest.raises(SoupError, match="missing is not a model folder"):
        interpolate(tmp_path / "missing", source, 0.5, tmp_path / "bad")
    tiny_t5(tok).save_pretrained(tmp_path / "t5")
    with pytest.raises(SoupError, match="different parameters"):
        interpolate(tmp_path / "t5", source, 0.5, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_a_registered_version_is_interpolated_into_a_new_version_not_serving(tmp_path, tok):
    base, tuned, other = (tiny_llama(tok, seed=s) for s in (0, 1, 2))
    base.save_pretrained(tmp_path / "base")
    registry = Registry(tmp_path / "checkpoints")
    for run, model in enumerate((tuned, other)):
        registry.register("generator", saved(tmp_path, f"run{run}", model, tok))
    registry.promote("generator", "v0001")
    made = interpolate_version(registry, "generator", "v0001", 0.75, "base", tmp_path / "base")
    assert made.version == "v0003" and registry.serving("generator").version == "v0001"
    assert registry.get("generator", "v0003").made_from == "0.25 x base + 0.75 x v0001"
    got = AutoModelForCausalLM.from_pretrained(registry.path_of(made)).state_dict()
    name = "model.layers.1.self_attn.q_proj.weight"
    torch.testing.assert_close(got[name], 0.25 * base.state_dict()[name]
                               + 0.75 * tuned.state_dict()[name])
    between = interpolate_version(registry, "generator", "v0001", 0.5, "v0002", tmp_path / "x")
    got = AutoModelForCausalLM.from_pretrained(registry.path_of(between)).state_dict()
    torch.testing.assert_close(got[name], (tuned.state_dict()[name]
                                           + other.state_dict()[name]) / 2)
    for args, message in ((("v0001", 0.5, "v0001"), "interpolated with itself"),
                          (("v0009", 0.5, "base"), "v0009"),
                          (("v0001", 0.5, "v0008"), "v0008"),
                          (("v0001", 2.0, "base"), r"alpha has to be in \[0, 1\]")):
        with pytest.raises(RegistryError, match=message):
            interpolate_version(registry, "generator", *args, tmp_path / "base")
    assert [v.version for v in registry.view().generator.versions] == [
        "v0001", "v0002", "v0003", "v0004"]
    assert not list((tmp_path / "checkpoints" / "runs").iterdir())  # work folders gone


RETRIEVER = {"kind": "retriever", "base_model": "tiny-bert", "mode": "query", "pooling": "mean",
             "reindex": False, "step": 3, "metrics": {"best": {"mrr@10": 0.5}}}


def test_retriever_versions_average_into_an_encoder_against_the_same_passage_vectors(tmp_path,
                                                                                    tok):
    encoders = [tiny_bert(tok, seed=s) for s in range(3)]
    registry = Registry(tmp_path / "checkpoints")
    for n, encoder in enumerate(encoders):
        folder = loop.save_model(tmp_path / f"run{n}", encoder, tok,
                                 {**RETRIEVER, "mode": "both" if n == 2 else "query"})
        registry.register("retriever", folder, passage_version="v0009" if n < 2 else None)
    made = average_versions(registry, "retriever", ["v0001", "v0002"])
    assert made.version == "v0004" and registry.serving("retriever") is None
    assert made.passage_version == "v0009" and not made.reindex  # served as its runs were
    assert made.made_from == "the average of v0001, v0002"
    got = AutoModel.from_pretrained(registry.path_of(made)).state_dict()
    for name, value in got.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, (encoders[0].state_dict()[name]
                                               + encoders[1].state_dict()[name]) / 2)
    meta = json.loads((registry.path_of(made) / "ragtune.json").read_text())
    assert meta["kind"] == "retriever" and meta["metrics"] == {}
    with pytest.raises(RegistryError, match=r"passage vectors of different versions \(base, "
                                            r"v0009\)"):
        average_versions(registry, "retriever", ["v0001", "v0003"])
    v3 = registry.path_of(registry.get("retriever", "v0003"))
    with pytest.raises(SoupError, match="differ in mode"):  # a query and a both encoder
        average_models([registry.path_of(made), v3], tmp_path / "soup")


def test_a_retriever_version_interpolates_towards_the_base_encoder_against_its_passages(
        tmp_path, tok):
    base, tuned, other, elsewhere = (tiny_bert(tok, seed=s) for s in range(4))
    base.save_pretrained(tmp_path / "base")  # a plain encoder folder, as the packaged MiniLM's
    registry = Registry(tmp_path / "checkpoints")
    for n, (encoder, against) in enumerate(((tuned, "v0009"), (other, "v0009"),
                                            (elsewhere, None))):
        registry.register("retriever", loop.save_model(tmp_path / f"run{n}", encoder, tok,
                                                       RETRIEVER), passage_version=against)
    made = interpolate_version(registry, "retriever", "v0001", 0.75, "base", tmp_path / "base")
    assert made.version == "v0004" and registry.serving("retriever") is None
    assert made.passage_version == "v0009" and not made.reindex  # against its run's vectors
    assert made.made_from == "0.25 x base + 0.75 x v0001"
    got = AutoModel.from_pretrained(registry.path_of(made)).state_dict()
    for name, value in got.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, 0.25 * base.state_dict()[name]
                                       + 0.75 * tuned.state_dict()[name])
    between = interpolate_version(registry, "retriever", "v0001", 0.5, "v0002", tmp_path / "x")
    assert between.passage_version == "v0009"
    with pytest.raises(RegistryError, match=r"passage vectors of different versions \(base, "
                                            r"v0009\)"):
        interpolate_version(registry, "retriever", "v0001", 0.5, "v0003", tmp_path / "base")
    registry.register("retriever", loop.save_model(tmp_path / "both", other, tok,
                                                   {**RETRIEVER, "mode": "both"}),
                      passage_version="v0009")
    with pytest.raises(RegistryError, match="differ in mode"):  # a query and a both encoder
        interpolate_version(registry, "retriever", "v0001", 0.5, "v0006", tmp_path / "base")
    assert [v.version for v in registry.view().retriever.versions] == [
        "v0001", "v0002", "v0003", "v0004", "v0005", "v0006"]
