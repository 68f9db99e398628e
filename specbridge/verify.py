"""Proofs on real checkpoints: round trip (HF -> Megatron -> HF, bit for bit) and logit parity (fp32,
Megatron model vs transformers' own model on the same tokens). Used by the CLI and the tests."""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import torch

from .api import Converter
from .runtime.safetensors_io import CheckpointReader


@dataclasses.dataclass(frozen=True)
class RoundTrip:
    keys: int
    mismatched: tuple[str, ...]
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]

    @property
    def exact(self) -> bool:
        return not (self.mismatched or self.missing or self.unexpected)

    def summary(self) -> str:
        verdict = "bit-exact" if self.exact else "NOT exact"
        return (f"roundtrip: {verdict}: {self.keys} tensors compared, {len(self.mismatched)} differ, "
                f"{len(self.missing)} missing, {len(self.unexpected)} unexpected")


def compare_checkpoints(original: str | Path, exported: str | Path, ignore: set[str] = frozenset()) -> RoundTrip:
    """Every tensor of `original` must come back in `exported` with identical dtype, shape and bits."""
    a, b = CheckpointReader(original), CheckpointReader(exported)
    keys_a, keys_b = a.keys() - ignore, b.keys() - ignore
    mismatched = tuple(sorted(k for k in keys_a & keys_b if not torch.equal(a.get(k), b.get(k))
                              or a.dtype(k) != b.dtype(k)))
    return RoundTrip(len(keys_a & keys_b), mismatched, tuple(sorted(keys_a - keys_b)), tuple(sorted(keys_b - keys_a)))


def roundtrip(hf_dir: str | Path, out_dir: str | Path | None = None, spec=None, progress=None) -> RoundTrip:
    """Import `hf_dir` into a Megatron model, export it again, compare bit for bit."""
    conv = Converter.from_pretrained(hf_dir, spec)
    chunks = conv.build_model(params_dtype=_storage_dtype(hf_dir))
    conv.import_weights(chunks, hf_dir, progress=progress)
    tied = {s.key for s in conv.plan.sentinels if s.kind == "tied"}
    with tempfile.TemporaryDirectory(prefix="specbridge-roundtrip-") as tmp:
        target = Path(out_dir) if out_dir is not None else Path(tmp) / "hf"
        conv.export_weights(chunks, target, dtype=None if out_dir else _storage_dtype(hf_dir), overwrite=True,
                            progress=progress)
        return compare_checkpoints(hf_dir, target, ignore=tied)


def _storage_dtype(hf_dir) -> torch.dtype:
    """The dtype the checkpoint stores its floating tensors in (a Megatron model in it round-trips exactly)."""
    reader = CheckpointReader(hf_dir)
    names = {reader.dtype(k) for k in sorted(reader.keys())[:64]}
    table = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
    found = [table[n] for n in names if n in table]
    return max(found, key=lambda d: torch.finfo(d).bits) if found else torch.float32


@dataclasses.dataclass(frozen=True)
class Parity:
    max_abs_diff: float
    cosine: float
    top1_agreement: float
    positions: int

    def ok(self, min_cosine: float = 0.99999, atol: float | None = None) -> bool:
        return (self.cosine >= min_cosine and self.top1_agreement == 1.0
                and (atol is None or self.max_abs_diff <= atol))

    def summary(self) -> str:
        return (f"parity: max |logit diff| {self.max_abs_diff:.3g}, cosine {self.cosine:.7f}, "
                f"top-1 agreement {self.top1_agreement * 100:.2f}% over {self.positions} positions")


def hf_model(hf_dir, architecture: str):
    """transformers' model in fp32; a checkpoint that does not fit the class is an error, never a random init."""
    import transformers

    cls = getattr(transformers, architecture)
    model, info = cls.from_pretrained(str(hf_dir), dtype=torch.float32, output_loading_info=True)
    bad = {k: sorted(v) for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise ValueError(f"{architecture}.from_pretrained('{hf_dir}') did not load the checkpoint cleanly: {bad}")
    return model.eval()


def parity(hf_dir: str | Path, spec=None, seq_len: int = 16, batch: int = 2, seed: int = 0) -> Parity:
    """Logits of the converted Megatron model vs transformers' model, fp32, same random tokens."""
    conv = Converter.from_pretrained(hf_dir, spec)
    chunks = conv.build_model(params_dtype=torch.float32)
    conv.import_weights(chunks, hf_dir)
    reference = hf_model(hf_dir, conv.plan.architecture)
    vocab = conv.plan.model_kwargs()["vocab_size"]
    ids = torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = reference(input_ids=ids).logits.float()
        got = megatron_logits(chunks[0], ids)[..., :vocab]
    return compare_logits(got, expected)


def megatron_logits(model, ids: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    with torch.no_grad():
        return model(ids, positions, None).float()


def compare_logits(got: torch.Tensor, expected: torch.Tensor) -> Parity:
    diff = (got - expected).abs().max().item()
    cosine = torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0).item()
    agree = (got.argmax(-1) == expected.argmax(-1)).float().mean().item()
    return Parity(diff, cosine, agree, got.shape[0] * got.shape[1])
