"""Proofs on real checkpoints: round trip (HF -> Megatron -> HF, bit for bit) and logit parity (fp32,
Megatron model vs transformers' own model on the same tokens). Used by the CLI and the tests."""

from __future__ import annotations

import dataclasses
import math
import shutil
import tempfile
from pathlib import Path

import torch

from .api import Converter, config_dtype
from .errors import ConversionError, UsageError
from .runtime import collectives
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
    mismatched = tuple(sorted(k for k in keys_a & keys_b if a.dtype(k) != b.dtype(k)
                              or not _same_bits(a.get(k), b.get(k))))
    return RoundTrip(len(keys_a & keys_b), mismatched, tuple(sorted(keys_a - keys_b)), tuple(sorted(keys_b - keys_a)))


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shapes and bit patterns (so a NaN equals the same NaN, and -0.0 differs from 0.0)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype.is_floating_point and a.dtype.itemsize in (2, 4, 8):
        bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.dtype.itemsize]
        return torch.equal(a.contiguous().view(bits), b.contiguous().view(bits))
    return torch.equal(a, b)


def roundtrip(hf_dir: str | Path, out_dir: str | Path | None = None, spec=None, progress=None) -> RoundTrip:
    """Import `hf_dir` into a Megatron model, export it again, compare bit for bit."""
    conv = Converter.from_pretrained(hf_dir, spec)
    dtype = _storage_dtype(conv)
    chunks = conv.build_model(params_dtype=dtype)
    conv.import_weights(chunks, hf_dir, progress=progress)
    tied = {s.key for s in conv.plan.sentinels if s.kind == "tied"}
    if out_dir is not None:
        conv.export_weights(chunks, out_dir, dtype=dtype, overwrite=True, progress=progress)
        return compare_checkpoints(hf_dir, out_dir, ignore=tied)
    rank = collectives.world()[0]
    tmp = Path(collectives.gather_objects(tempfile.mkdtemp(prefix="specbridge-roundtrip-") if rank == 0 else None)[0])
    try:
        conv.export_weights(chunks, tmp / "hf", dtype=dtype, overwrite=True, progress=progress)
        return compare_checkpoints(hf_dir, tmp / "hf", ignore=tied)
    finally:
        collectives.barrier()
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)


def _storage_dtype(conv: Converter) -> torch.dtype:
    """The dtype of the checkpoint's tensors (a Megatron model in it round-trips exactly), else the one its config
    declares; fp32 if none."""
    return conv.source_dtype or config_dtype(conv.hf_config) or torch.float32


MIN_COSINE = 0.99999  # the default threshold of `parity` (the CLI's --min-cosine)


@dataclasses.dataclass(frozen=True)
class LogitComparison:
    """Converted vs reference logits of one kind of input (`name`: "text"; image or audio inputs add their own):
    `positions` logit vectors of `width` entries each were compared. Cosine is computed in fp64 and lies in
    [-1, 1]; a NaN anywhere makes it NaN, which fails every threshold."""

    name: str
    positions: int
    width: int
    max_abs_diff: float
    cosine: float
    top1_agreement: float

    def failures(self, min_cosine: float, atol: float | None) -> list[str]:
        """The thresholds this comparison missed, each with its value (NaN misses every one)."""
        out = []
        if not self.cosine >= min_cosine:
            out.append(f"cosine {self.cosine:.9f} < {min_cosine:g}")
        if not self.top1_agreement >= 1.0:
            out.append(f"top-1 agreement {self.top1_agreement * 100:.2f}% < 100%")
        if atol is not None and not self.max_abs_diff <= atol:
            out.append(f"max |logit diff| {self.max_abs_diff:.3g} > atol {atol:g}")
        return out

    def describe(self) -> str:
        return (f"{self.name}: {self.positions} positions x {self.width} logits compared, max |logit diff| "
                f"{self.max_abs_diff:.3g}, cosine {self.cosine:.7f}, top-1 agreement {self.top1_agreement * 100:.2f}%")


@dataclasses.dataclass(frozen=True)
class Parity:
    """The comparisons of one parity run (one per kind of input); the worst of them answers for the whole."""

    comparisons: tuple[LogitComparison, ...]

    @property
    def max_abs_diff(self) -> float:
        return max(c.max_abs_diff for c in self.comparisons)

    @property
    def cosine(self) -> float:
        return min(c.cosine for c in self.comparisons)

    @property
    def top1_agreement(self) -> float:
        return min(c.top1_agreement for c in self.comparisons)

    @property
    def positions(self) -> int:
        return sum(c.positions for c in self.comparisons)

    def failures(self, min_cosine: float = MIN_COSINE, atol: float | None = None) -> list[str]:
        many = len(self.comparisons) > 1
        return [f"{c.name}: {f}" if many else f for c in self.comparisons for f in c.failures(min_cosine, atol)]

    def ok(self, min_cosine: float = MIN_COSINE, atol: float | None = None) -> bool:
        return bool(self.comparisons) and not self.failures(min_cosine, atol)

    def summary(self, min_cosine: float = MIN_COSINE, atol: float | None = None) -> str:
        """`parity: PASS` or `parity: FAIL (what missed which threshold)`, the thresholds, then each comparison."""
        failures = self.failures(min_cosine, atol)
        wanted = f"cosine >= {min_cosine:g}, top-1 agreement 100%" + (f", max |logit diff| <= {atol:g}"
                                                                      if atol is not None else "")
        head = f"parity: FAIL ({'; '.join(failures)})" if failures else "parity: PASS"
        return "\n".join([f"{head} [required: {wanted}]", *(f"  {c.describe()}" for c in self.comparisons)])


def hf_model(hf_dir, architecture: str):
    """transformers' model in fp32; a checkpoint that does not fit the class is an error, never a random init."""
    import transformers

    cls = getattr(transformers, architecture)
    model, info = cls.from_pretrained(str(hf_dir), dtype=torch.float32, output_loading_info=True)
    bad = {k: sorted(v) for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise ConversionError(f"{architecture}.from_pretrained('{hf_dir}') did not load the checkpoint cleanly: {bad}")
    return model.eval()


def parity(hf_dir: str | Path, spec=None, seq_len: int = 16, batch: int = 2, seed: int = 0) -> Parity:
    """Logits of the converted Megatron model vs transformers' model, fp32, same random tokens."""
    if seq_len < 1 or batch < 1:
        raise UsageError(f"parity needs at least one token and one sequence (got seq_len={seq_len}, batch={batch})")
    conv = Converter.from_pretrained(hf_dir, spec)
    chunks = conv.build_model(params_dtype=torch.float32)
    conv.import_weights(chunks, hf_dir)
    vocab = conv.plan.model_kwargs()["vocab_size"]
    ids = torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(seed))
    got = pipeline_logits(chunks, ids, vocab)
    result = None
    if got is not None:  # the last pipeline stage compares against transformers; every rank gets the result
        with torch.no_grad():
            expected = hf_model(hf_dir, conv.plan.architecture)(input_ids=ids).logits.float()
        result = compare_logits(got, expected)
    return next(r for r in collectives.gather_objects(result) if r is not None)


def megatron_logits(model, ids: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    with torch.no_grad():
        return model(ids, positions, None).float()


def pipeline_logits(chunks, ids: torch.Tensor, vocab: int) -> torch.Tensor | None:
    """Full-vocabulary fp32 logits of a model split over pipeline stages (and virtual stages) and tensor
    parallel ranks, through megatron-core's own pipeline schedule. Returned on the last stage, None elsewhere."""
    import torch.distributed as dist
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from .runtime.parallel import current_topology, tp_group

    positions = torch.arange(ids.shape[1]).unsqueeze(0)
    rows = list(ids.split(1))  # one sequence per micro-batch (an interleaved schedule needs >= PP of them)

    def step(data_iterator, model):
        output = model(next(data_iterator), positions, None)
        return output, lambda out: (out.float().sum() * 0, {"logits": out.detach().float()})

    with torch.no_grad():
        stored = get_forward_backward_func()(
            forward_step_func=step, data_iterator=[iter(rows) for _ in chunks], model=chunks,
            num_microbatches=len(rows), seq_length=ids.shape[1], micro_batch_size=1, forward_only=True)
    topology = current_topology()
    if topology.pp_rank != topology.pp_size - 1:
        return None
    local = torch.cat([s["logits"] for s in stored])
    if topology.tp_size > 1:
        shards = [torch.empty_like(local) for _ in range(topology.tp_size)]
        dist.all_gather(shards, local.contiguous(), group=tp_group())
        local = torch.cat(shards, dim=-1)
    return local[..., :vocab]


def compare_logits(got: torch.Tensor, expected: torch.Tensor, name: str = "text") -> Parity:
    """One comparison of [batch, positions, vocab] logits: every position's logit vector, in fp64."""
    if got.shape != expected.shape:
        raise ConversionError(f"logits of shape {tuple(got.shape)} cannot be compared with transformers' "
                              f"{tuple(expected.shape)}")
    return Parity((logit_comparison(name, got, expected),))


def logit_comparison(name: str, got: torch.Tensor, expected: torch.Tensor) -> LogitComparison:
    a, b = got.double().flatten(), expected.double().flatten()
    cosine = (a @ b / (a.norm() * b.norm())).item()
    cosine = cosine if math.isnan(cosine) else max(-1.0, min(1.0, cosine))  # rounding never takes it above 1
    agree = (got.argmax(-1) == expected.argmax(-1)).double().mean().item()
    return LogitComparison(name, got[..., 0].numel(), got.shape[-1], (a - b).abs().max().item(), cosine, agree)
