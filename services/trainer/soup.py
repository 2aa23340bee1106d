"""Model soups: one generator whose weights are the average of several fine-tuned ones.

Fine-tuning one base model twice with different seeds (example order, abstention picks, dev
sample) ends in two nearby points of the same low-loss region; their element-wise mean, a
*uniform soup* (Wortsman et al. 2022, "Model soups"), is often better than either run and
costs nothing at serving time: it is one model of the same size. On the packaged data the soup
of the seed-0 and seed-1 SmolLM2 runs of ``bench/train_generator.py`` is better than each seed
on the test split's capitals (see the README, Training).

    average_models([run_a / "model", run_b / "model"], out_dir)

Every source must be a saved model folder (``loop.save_model``: weights, tokenizer,
``ragtune.json``) fine-tuned from the same base model, with the same parameter names and
shapes; anything else raises ``SoupError`` before a file is written. LoRA runs qualify: their
folders hold the merged weights. The result is a saved model folder like the sources, so the
registry takes it as a new version (``average_versions``: ``ragtune models average``,
``POST /v1/models/average``) and serving loads it as any.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from services.trainer import loop
from shared.registry import META_FILE, Registry, RegistryError
from shared.schemas import ModelVersion

# ragtune.json fields that must agree for two folders to be averaged: the model they were
# fine-tuned from and the answer format serving expects of it.
SAME_META = ("kind", "base_model", "seq2seq", "target_format", "no_answer")


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
        for key in SAME_META:
            if meta.get(key) != metas[0].get(key):
                raise SoupError(f"{source} and {sources[0]} differ in {key} "
                                f"({meta.get(key)!r} vs {metas[0].get(key)!r}): only runs "
                                f"fine-tuned from the same model can be averaged")
    model = _load(sources[0])
    total = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
    for source in sources[1:]:
        state = _load(source).state_dict()
        if state.keys() != total.keys():
            missing = sorted(state.keys() ^ total.keys())[:3]
            raise SoupError(f"{source} and {sources[0]} have different parameters "
                            f"(e.g. {', '.join(missing)})")
        for name, value in state.items():
            if value.shape != total[name].shape:
                raise SoupError(f"{source}: {name} has shape {tuple(value.shape)}, "
                                f"{sources[0]} has {tuple(total[name].shape)}")
            if value.is_floating_point():
                total[name] += value.float()
            elif not torch.equal(value.float(), total[name]):
                raise SoupError(f"{source}: the buffer {name} differs from {sources[0]}'s")
    first = model.state_dict()
    averaged = {name: (value / len(sources)).to(first[name].dtype)
                if first[name].is_floating_point() else first[name]
                for name, value in total.items()}
    model.load_state_dict(averaged)
    meta: dict[str, Any] = {**metas[0], "metrics": {}, "history": [],
                            "soup_of": [str(s) for s in sources]}
    meta.pop("step", None)
    out = Path(out)
    return loop.save_model(out.parent, model, AutoTokenizer.from_pretrained(sources[0]), meta,
                           folder=out.name)


def average_versions(registry: Registry, kind: str, versions: Sequence[str]) -> ModelVersion:
    """Average the registered ``versions`` of ``kind`` (``average_models``) and register the
    result as the next version, not serving; returns it. Raises ``RegistryError`` for an
    unknown version, fewer than two different ones, or versions that cannot be averaged (with
    ``SoupError``'s reason). The CLI and the trainer actor both call it."""
    versions = list(dict.fromkeys(versions))
    if len(versions) < 2:
        raise RegistryError("name two or more different versions to average")
    folders = [registry.path_of(registry.get(kind, v)) for v in versions]
    work = registry.run_dir(f"average-{uuid.uuid4().hex[:12]}")
    try:
        return registry.register(kind, average_models(folders, work / "model"))
    except SoupError as exc:
        raise RegistryError(str(exc)) from None
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _meta(folder: Path) -> dict[str, Any]:
    if not (folder / META_FILE).is_file() or not (folder / "config.json").is_file():
        raise SoupError(f"{folder} is not a saved model folder (no {META_FILE} or config.json)")
    return loop.read_meta(folder)


def _load(folder: Path):
    config = AutoConfig.from_pretrained(folder)
    cls = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    return cls.from_pretrained(folder, dtype=torch.float32)
