"""Proofs on real checkpoints: round trip (HF -> Megatron -> HF, bit for bit) and logit parity (fp32,
Megatron model vs transformers' own model on the same tokens). Used by the CLI and the tests."""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path

import torch

from .api import Converter, config_dtype
from .errors import ConversionError
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
        raise ConversionError(f"{architecture}.from_pretrained('{hf_dir}') did not load the checkpoint cleanly: {bad}")
    return model.eval()


def parity(hf_dir: str | Path, spec=None, seq_len: int = 16, batch: int = 2, seed: int = 0) -> Parity:
    """Logits of the converted Megatron model vs transformers' model, fp32, same random tokens."""
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
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    positions = torch.arange(ids.shape[1]).unsqueeze(0)
    rows = list(ids.split(1))  # one sequence per micro-batch (an interleaved schedule needs >= PP of them)

    def step(data_iterator, model):
        output = model(next(data_iterator), positions, None)
        return output, lambda out: (out.float().sum() * 0, {"logits": out.detach().float()})

    with torch.no_grad():
        stored = get_forward_backward_func()(
            forward_step_func=step, data_iterator=[iter(rows) for _ in chunks], model=chunks,
            num_microbatches=len(rows), seq_length=ids.shape[1], micro_batch_size=1, forward_only=True)
    if not ps.is_pipeline_last_stage(ignore_virtual=True):
        return None
    local = torch.cat([s["logits"] for s in stored])
    size = ps.get_tensor_model_parallel_world_size()
    if size > 1:
        shards = [torch.empty_like(local) for _ in range(size)]
        dist.all_gather(shards, local.contiguous(), group=ps.get_tensor_model_parallel_group())
        local = torch.cat(shards, dim=-1)
    return local[..., :vocab]


def compare_logits(got: torch.Tensor, expected: torch.Tensor) -> Parity:
    diff = (got - expected).abs().max().item()
    cosine = torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0).item()
    agree = (got.argmax(-1) == expected.argmax(-1)).float().mean().item()
    return Parity(diff, cosine, agree, got.shape[0] * got.shape[1])
