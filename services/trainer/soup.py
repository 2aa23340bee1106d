"""Model soups: one model whose weights are the average of several fine-tuned ones.

Fine-tuning one base model twice with different seeds (example order, abstention picks, dev
sample) ends in two nearby points of the same low-loss region; their element-wise mean, a
*uniform soup* (Wortsman et al. 2022, "Model soups"), is often better than either run and
costs nothing at serving time: it is one model of the same size. On the packaged data the soup
of the seed-0 and seed-1 SmolLM2 runs of ``bench/train_generator.py`` is better than each seed
on the test split's capitals, and the soup of three query-encoder runs keeps the capitals that
one run in several loses (see bench/RESULTS.md). Generators and retrievers (encoders)
alike: a folder's ``ragtune.json`` says which.

    average_models([run_a / "model", run_b / "model"], out_dir)
    interpolate(base_dir, run_a / "model", 0.5, out_dir)   # WiSE-FT: halfway back to the base

Every source must be a saved model folder (``loop.save_model``: weights, tokenizer,
``ragtune.json``) fine-tuned from the same base model, with the same parameter names and
shapes; anything else raises ``SoupError`` before a file is written. LoRA runs qualify: their
folders hold the merged weights. The result is a saved model folder like the sources, so the
registry takes it as a new version (``average_versions``: ``ragtune models average``,
``POST /v1/models/average``; ``interpolate_version``: ``ragtune models interpolate``,
``POST /v1/models/interpolate``) and serving loads it as any.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
)

from services.trainer import loop
from shared.models.encoder import encoder_source
from shared.models.generator import generator_source
from shared.registry import META_FILE, Registry, RegistryError
from shared.schemas import ModelVersion
from shared.settings import Settings

# ragtune.json fields that must agree for two folders to be averaged, or for one version to be
# moved towards another: the model they were fine-tuned from, the answer format serving expects
# of a generator, and which side of a retriever was trained against which passage vectors, and
# how it pools.
SAME_META = ("kind", "base_model", "seq2seq", "target_format", "no_answer", "mode", "pooling")


class SoupError(ValueError):
    """The folders cannot be averaged (too few, not saved models, different bases or shapes)."""


def average_models(sources: Sequence[Path], out: Path) -> Path:
    """Save the uniform average of the models in ``sources`` to folder ``out`` (replaced if
    it exists) and return it.

    Floating-point weights are averaged in fp32; integer buffers must be equal. The tokenizer
    and ``ragtune.json`` come from the first source, with ``soup_of`` naming every source and
    no metrics (the soup has not been evaluated). Raises ``SoupError`` naming the offending
    folder for fewer than two sources, a folder that is not a saved model, or sources from
    different base models or with different parameters.
    """
    sources = [Path(s) for s in sources]
    if len(sources) < 2:
        raise SoupError(f"averaging needs two or more model folders, got {len(sources)}")
    metas = [_meta(s) for s in sources]
    for source, meta in zip(sources[1:], metas[1:], strict=True):
        _check_same_meta(source, meta, sources[0], metas[0])
    kind = metas[0].get("kind")
    model = _load(sources[0], kind)
    total = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
    for source in sources[1:]:
        state = _load(source, kind).state_dict()
        _check_alike(state, source, total, sources[0])
        for name, value in state.items():
            if value.is_floating_point():
                total[name] += value.float()
    first = model.state_dict()
    averaged = {name: (value / len(sources)).to(first[name].dtype)
                if first[name].is_floating_point() else first[name]
                for name, value in total.items()}
    model.load_state_dict(averaged)
    return _save_unevaluated(model, sources[0], metas[0],
                             {"soup_of": [str(s) for s in sources]}, out)


def average_versions(registry: Registry, kind: str, versions: Sequence[str]) -> ModelVersion:
    """Average the registered ``versions`` of ``kind`` (``average_models``) and register the
    result as the next version, not serving; returns it. Raises ``RegistryError`` for an
    unknown version, fewer than two different ones, or versions that cannot be averaged (with
    ``SoupError``'s reason). The CLI and the trainer actor both call it."""
    versions = list(dict.fromkeys(versions))
    if len(versions) < 2:
        raise RegistryError("name two or more different versions to average")
    records = [registry.get(kind, v) for v in versions]
    _check_same_passages(records, "averaged")
    folders = [registry.path_of(r) for r in records]
    return _register_made(registry, kind, lambda out: average_models(folders, out),
                          f"the average of {', '.join(versions)}",
                          passage_version=records[0].passage_version)


def interpolate(base: Path, tuned: Path, alpha: float, out: Path) -> Path:
    """Save ``(1 - alpha) * base + alpha * tuned``, weight by weight, to folder ``out``
    (replaced if it exists) and return it.

    WiSE-FT (Wortsman et al. 2022, "Robust fine-tuning of zero-shot models"): the fine-tuned
    model moved back towards the model it was fine-tuned from keeps more of that model's
    behaviour on inputs unlike the training data, and much of the fine-tuning's gain on inputs
    like it. ``tuned``: a saved model folder (``loop.save_model``); ``base``: any model
    folder with the same parameters (the packaged generator's has no ``ragtune.json``).
    Tokenizer and ``ragtune.json`` come from ``tuned``, with ``interpolated`` naming both and
    alpha, and no metrics. Raises ``SoupError`` for alpha outside [0, 1], a ``tuned`` that is
    not a saved model, a ``base`` that is no model folder, or different parameters, before a
    file is written.
    """
    base, tuned = Path(base), Path(tuned)
    if not 0 <= alpha <= 1:
        raise SoupError(f"alpha has to be in [0, 1] (0: the base, 1: the fine-tuned model), "
                        f"not {alpha}")
    meta = _meta(tuned)
    if not (base / "config.json").is_file():
        raise SoupError(f"{base} is not a model folder (no config.json)")
    model = _load(tuned, meta.get("kind"))
    start = _load(base, meta.get("kind")).state_dict()
    state = model.state_dict()
    _check_alike(start, base, {k: v.float() for k, v in state.items()}, tuned)
    model.load_state_dict({
        name: ((1 - alpha) * start[name].float() + alpha * value.float()).to(value.dtype)
        if value.is_floating_point() else value for name, value in state.items()})
    return _save_unevaluated(model, tuned, meta, {"interpolated": {
        "base": str(base), "tuned": str(tuned), "alpha": alpha}}, out)


def served_base(settings: Settings, kind: str) -> Path:
    """The model folder ragtune serves for ``kind`` before any training, which every
    fine-tuning run starts from: what ``interpolate_version``'s ``towards="base"`` means."""
    return Path(encoder_source(settings) if kind == "retriever" else generator_source(settings))


def interpolate_version(registry: Registry, kind: str, version: str, alpha: float,
                        towards: str, base_dir: Path) -> ModelVersion:
    """``interpolate`` the registered ``version`` of ``kind`` towards ``towards`` (``"base"``:
    the model folder ``base_dir``, ``served_base``; or another registered version) and register
    the result as the next version, not serving; returns it. A retriever keeps the passage
    vectors ``version`` was trained against (``passage_version``); towards another version,
    both must have been trained against the same ones. Raises ``RegistryError`` for an unknown
    version, ``towards`` equal to ``version``, or models that cannot be interpolated (with
    ``SoupError``'s reason). The CLI and the trainer actor both call it."""
    if towards == version:
        raise RegistryError(f"{version} would be interpolated with itself: name another "
                            f"version or base as --towards")
    record = registry.get(kind, version)
    tuned = registry.path_of(record)
    if towards == "base":
        start = base_dir
    else:
        other = registry.get(kind, towards)
        _check_same_passages([record, other], "interpolated")
        start = registry.path_of(other)

    def make(out: Path) -> Path:
        if towards != "base":  # two fine-tuned versions: as alike as averaged ones
            _check_same_meta(start, _meta(start), tuned, _meta(tuned))
        return interpolate(start, tuned, alpha, out)

    return _register_made(registry, kind, make,
                          f"{1 - alpha:g} x {towards} + {alpha:g} x {version}",
                          passage_version=record.passage_version)


def _check_same_passages(records: Sequence[ModelVersion], doing: str) -> None:
    """Raise ``RegistryError`` unless the versions (query encoders) were trained against the
    passage vectors of the same version (``passage_version``; None: the base's)."""
    against = sorted({r.passage_version or "base" for r in records})
    if len(against) > 1:
        raise RegistryError(f"{', '.join(r.version for r in records)} were trained against the "
                            f"passage vectors of different versions ({', '.join(against)}): "
                            f"only retrievers trained against the same ones can be {doing}")


def _register_made(registry: Registry, kind: str, make: Callable[[Path], Path],
                   made_from: str, passage_version: str | None = None) -> ModelVersion:
    """Register as the next version of ``kind`` the folder ``make(out)`` saves (``out`` in a
    work folder inside the checkpoint root, deleted afterwards), recorded as ``made_from``
    (and a query encoder's ``passage_version``); a ``SoupError`` becomes a ``RegistryError``
    with its reason."""
    work = registry.run_dir(f"made-{uuid.uuid4().hex[:12]}")
    try:
        return registry.register(kind, make(work / "model"), made_from=made_from,
                                 passage_version=passage_version)
    except SoupError as exc:
        raise RegistryError(str(exc)) from None
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _save_unevaluated(model, source: Path, meta: dict[str, Any], made_from: dict[str, Any],
                      out: Path) -> Path:
    """Save ``model`` to folder ``out`` with ``source``'s tokenizer and its ``meta`` plus
    ``made_from``, without the source's step and metrics (the result is not evaluated)."""
    meta = {**meta, "metrics": {}, "history": [], **made_from}
    meta.pop("step", None)
    out = Path(out)
    return loop.save_model(out.parent, model, AutoTokenizer.from_pretrained(source), meta,
                           folder=out.name)


def _check_same_meta(source: Path, meta: dict[str, Any], reference: Path,
                     reference_meta: dict[str, Any]) -> None:
    """Raise ``SoupError`` unless the two folders' ``ragtune.json`` agree on ``SAME_META``."""
    for key in SAME_META:
        if meta.get(key) != reference_meta.get(key):
            raise SoupError(f"{source} and {reference} differ in {key} ({meta.get(key)!r} vs "
                            f"{reference_meta.get(key)!r}): only runs fine-tuned from the "
                            f"same model can be combined")


def _check_alike(state: dict[str, torch.Tensor], source: Path,
                 reference: dict[str, torch.Tensor], reference_source: Path) -> None:
    """Raise ``SoupError`` unless ``state`` has ``reference``'s parameter names and shapes
    and equal integer buffers (``reference`` in fp32)."""
    if state.keys() != reference.keys():
        missing = sorted(state.keys() ^ reference.keys())[:3]
        raise SoupError(f"{source} and {reference_source} have different parameters "
                        f"(e.g. {', '.join(missing)})")
    for name, value in state.items():
        if value.shape != reference[name].shape:
            raise SoupError(f"{source}: {name} has shape {tuple(value.shape)}, "
                            f"{reference_source} has {tuple(reference[name].shape)}")
        if not value.is_floating_point() and not torch.equal(value.float(), reference[name]):
            raise SoupError(f"{source}: the buffer {name} differs from {reference_source}'s")


def _meta(folder: Path) -> dict[str, Any]:
    if not (folder / META_FILE).is_file() or not (folder / "config.json").is_file():
        raise SoupError(f"{folder} is not a saved model folder (no {META_FILE} or config.json)")
    return loop.read_meta(folder)


def _load(folder: Path, kind: str | None):
    """The model in ``folder`` in fp32: an encoder for a retriever, else a generator."""
    if kind == "retriever":
        return AutoModel.from_pretrained(folder, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder)
    cls = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    return cls.from_pretrained(folder, dtype=torch.float32)
