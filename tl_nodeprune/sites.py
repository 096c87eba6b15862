"""Where gates sit: granularities, their TransformerLens hook names, and the model's shape."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

from .granularities import SPECS, spec
from .granularities import check_granularity as check_granularity  # re-exported

# The built-in granularities; `granularities.register_granularity` adds more at run time, so
# code that must see those iterates `granularities.SPECS` instead of this tuple.
Granularity = Literal["attn", "mlp", "head", "neuron", "head_dim"]
GRANULARITIES: tuple[str, ...] = get_args(Granularity)
DEFAULT_GRANULARITIES: tuple[str, ...] = tuple(g for g in GRANULARITIES if SPECS[g].default)


def __getattr__(name: str) -> Any:
    """`PARENT` and `HOOK_TEMPLATES`: views of the specs, rebuilt so registrations show."""
    if name == "PARENT":
        return {g: s.parent for g, s in SPECS.items() if s.parent is not None}
    if name == "HOOK_TEMPLATES":
        return {g: s.hook for g, s in SPECS.items()}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def hook_name(granularity: str, layer: int) -> str:
    """The TransformerLens hook at which `granularity` is gated in `layer`."""
    return spec(granularity).hook_name(layer)


@dataclass(frozen=True)
class ModelShape:
    """The sizes a circuit depends on; a circuit only applies to a model of the same shape."""

    name: str
    n_layers: int
    n_heads: int
    d_head: int
    d_mlp: int  # 0 for attention-only models
    d_vocab: int  # input vocabulary: valid prompt token ids
    d_model: int = 0  # 0 when unknown (circuits saved before this field existed)
    d_vocab_out: int = 0  # output vocabulary: valid answer ids; 0 means the same as d_vocab
    n_key_value_heads: int = 0  # grouped-query attention; 0 means one key/value head per head

    @classmethod
    def from_model(cls, model: Any) -> ModelShape:
        """Read the shape from `model.cfg` (HookedTransformer and TransformerBridge alike)."""
        cfg = model.cfg
        attn_only = bool(getattr(cfg, "attn_only", False))
        d_mlp = getattr(cfg, "d_mlp", None)
        return cls(
            name=str(getattr(cfg, "model_name", None) or type(model).__name__),
            n_layers=int(cfg.n_layers),
            n_heads=int(cfg.n_heads),
            d_head=int(cfg.d_head),
            d_mlp=0 if attn_only or not d_mlp else int(d_mlp),
            d_vocab=int(cfg.d_vocab),
            d_model=int(cfg.d_model),
            d_vocab_out=_positive(getattr(cfg, "d_vocab_out", None)) or int(cfg.d_vocab),
            n_key_value_heads=_positive(getattr(cfg, "n_key_value_heads", None))
            or int(cfg.n_heads),
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelShape:
        """Read a saved shape; fields added later than the file keep their 'unknown' default."""
        fields = cls.__dataclass_fields__
        return cls(**{k: data[k] for k in fields if k in data})

    @property
    def vocab_out(self) -> int:
        """Size of the output vocabulary (answer ids must be below it)."""
        return self.d_vocab_out or self.d_vocab

    @property
    def kv_heads(self) -> int:
        """Key/value heads per layer (fewer than `n_heads` under grouped-query attention)."""
        return self.n_key_value_heads or self.n_heads

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def has(self, granularity: str) -> bool:
        """Whether this model has units of `granularity` (attention-only models lack MLPs)."""
        s = spec(granularity)
        sizes = (getattr(self, f) for f in (*s.needs, *s.unit_axes))
        return all(n > 0 for n in sizes) and (s.parent is None or self.has(s.parent))

    def units(self, granularity: str) -> tuple[int, ...]:
        """Shape of the gate tensor for `granularity`: layer first, then the unit axes."""
        return spec(granularity).units(self)

    def count(self, granularity: str) -> int:
        """How many nodes of `granularity` the model has."""
        return spec(granularity).count(self)

    def blocks(self) -> tuple[str, ...]:
        """The block granularities (those without a parent) this model has."""
        return tuple(g for g, s in SPECS.items() if s.parent is None and self.has(g))

    def available(self) -> tuple[str, ...]:
        """The default granularities this model has."""
        return tuple(g for g, s in SPECS.items() if s.default and self.has(g))

    def resolve(self, granularities: Iterable[str] | None) -> tuple[str, ...]:
        """Validate requested granularities (None = every default one the model has)."""
        if granularities is None:
            return self.available()
        requested = tuple(dict.fromkeys(granularities))
        if not requested:
            raise ValueError("granularities is empty; pass None for all, or e.g. ('head',).")
        for g in requested:
            if not self.has(g):
                raise ValueError(
                    f"Granularity {g!r} needs MLP layers, but model {self.name!r} is "
                    f"attention-only; drop it, e.g. granularities=('attn', 'head')."
                )
        return tuple(g for g in SPECS if g in requested)

    def check_same(self, other: ModelShape) -> None:
        """Raise a ValueError listing every size that differs between this model (self) and
        the circuit's model (other); another model name alone is only a warning.

        Sizes saved as 0 (unknown: files older than the field) are not compared.
        """
        mine = {**self.to_dict(), "vocab_out": self.vocab_out, "kv_heads": self.kv_heads}
        theirs = {**other.to_dict(), "vocab_out": other.vocab_out, "kv_heads": other.kv_heads}
        if not other.d_vocab_out:  # an old file: its output vocabulary is unknown
            theirs["vocab_out"] = mine["vocab_out"]
        if not other.n_key_value_heads:
            theirs["kv_heads"] = mine["kv_heads"]
        diffs = [
            f"{f}: circuit has {theirs[f]}, model has {mine[f]}"
            for f in SHAPE_FIELDS
            if theirs[f] != mine[f] and not (f == "d_model" and theirs[f] == 0)
        ]
        if diffs:
            raise ValueError(
                f"This circuit was found on {other.name!r} and does not fit model "
                f"{self.name!r} ({'; '.join(diffs)}). Load the model the circuit was found on."
            )
        if other.name != self.name:
            warnings.warn(
                f"This circuit was found on {other.name!r}; applying it to {self.name!r}, "
                "which has the same sizes. Check that this is the model you meant.",
                stacklevel=3,
            )


# Every size a circuit depends on, compared by `ModelShape.check_same`.
SHAPE_FIELDS: tuple[str, ...] = (
    "n_layers", "n_heads", "d_head", "d_mlp", "d_model", "d_vocab", "vocab_out", "kv_heads"
)  # fmt: skip

def missing_hooks(model: Any, names: Iterable[str]) -> list[str]:
    """The hook names the model does not have (before any forward pass)."""
    hook_dict = getattr(model, "hook_dict", None)
    if hook_dict is None:
        raise TypeError(
            f"{type(model).__name__} has no hook_dict: pass a TransformerLens model "
            "(HookedTransformer or TransformerBridge), e.g. from tl_nodeprune.load_model."
        )
    return [n for n in names if n not in hook_dict]


def check_sites(
    model: Any,
    shape: ModelShape,
    granularities: Iterable[str],
    probe: Any | None = None,
) -> None:
    """Raise a ValueError naming any gated hook that is missing or has an unexpected shape.

    `probe(names)` runs the model on one token and returns the activations at `names`.
    """
    wanted = {hook_name(g, layer): g for g in granularities for layer in range(shape.n_layers)}
    missing = missing_hooks(model, wanted)
    if missing:
        raise ValueError(
            f"Model {shape.name!r} has no hook {missing[0]!r} ({len(missing)} gated hooks "
            "missing). A TransformerBridge needs enable_compatibility_mode() for the classic "
            "hook names, and some architectures name or place their hooks differently; "
            "tl_nodeprune.load_model sets this up."
        )
    if probe is None:
        return
    acts = probe(list(wanted))
    for name, g in wanted.items():
        expected = spec(g).activation(shape)
        got = tuple(acts[name].shape) if name in acts else None
        if got is None or got[2:] != expected:
            raise ValueError(
                f"Hook {name!r} gives activations of shape {got} (batch, pos, ...), expected "
                f"(batch, pos, {', '.join(map(str, expected))}) for {g!r} gates on "
                f"{shape.name!r}. On a TransformerBridge turn on enable_compatibility_mode(); "
                "otherwise this architecture lays this hook out differently and cannot be "
                f"gated at {g!r}."
            )


def _positive(value: Any) -> int:
    """`value` as an int when it is a positive number, else 0 (TransformerLens uses -1/None)."""
    return int(value) if isinstance(value, int) and value > 0 else 0


def model_device(model: Any) -> Any:
    """The device of the model's parameters (never assume cuda)."""
    return next(model.parameters()).device


@contextmanager
def frozen(model: Any) -> Iterator[None]:
    """Eval mode and frozen weights inside; the model's own mode and flags restored after.

    A bridge around a `transformers` model in train mode applies dropout, so masks are always
    trained and evaluated in eval mode.
    """
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
