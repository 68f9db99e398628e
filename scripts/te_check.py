"""TransformerEngine check, for a machine with a GPU and TransformerEngine (the CPU test suite proves the keys on a
TE stand-in, `tests/runtime/test_te_keys.py`; this proves the numbers). For a tiny Llama and Qwen3-MoE:

1. `specbridge import` writes a Megatron checkpoint (TE keys, the default);
2. a GPTModel with megatron-core's TransformerEngine layer spec (grouped experts: TEGroupedMLP) loads it with
   megatron-core's own `dist_checkpointing.load`, as Megatron training does;
3. its fp32 logits are compared with transformers' model; then `Converter.import_weights` fills a second TE
   model straight from the HF checkpoint (same logits) and `export_weights` writes it back (bit for bit).

    python scripts/te_check.py [--atol 1e-4]       # one process, one GPU; exit 0 when every check holds

Written by reading megatron-core's TE spec and loader; it has not been run yet (no GPU where it was written).
If TE's fp32 GEMMs use TF32 on your GPU, the logits differ by more than 1e-4: pass a looser --atol.
"""

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def te_model(conv):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt import gpt_layer_specs as specs

    extra = {"use_cpu_initialization": False, **({"moe_grouped_gemm": True} if conv.plan.num_experts else {})}
    config, model_args = conv.megatron_config(params_dtype=torch.float32, extra_transformer=extra)
    if config.num_moe_experts and isinstance(config.moe_layer_freq, list):
        spec = specs.get_gpt_decoder_block_spec(config, use_transformer_engine=True)
    else:
        spec = specs.get_gpt_layer_with_transformer_engine_spec(config.num_moe_experts, moe_grouped_gemm=True,
                                                                qk_layernorm=config.qk_layernorm)
    return GPTModel(config=config, transformer_layer_spec=spec, **model_args).cuda().eval()


def logits(model, ids, vocab):
    positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0).expand_as(ids)
    with torch.no_grad():
        return model(ids, positions, None).float()[..., :vocab]


def check(family: str, work: Path, atol: float) -> bool:
    from megatron.core import dist_checkpointing

    from specbridge.api import Converter
    from specbridge.cli import main
    from specbridge.demo import tiny_model
    from specbridge.verify import compare_checkpoints, hf_model

    hf = work / family / "hf"
    tiny_model(family).save_pretrained(str(hf))
    assert main(["import", str(hf), str(work / family / "mcore")]) == 0
    conv = Converter.from_pretrained(hf)
    vocab = conv.plan.model_kwargs()["vocab_size"]
    ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        expected = hf_model(hf, conv.plan.architecture).cuda()(input_ids=ids).logits.float()

    loaded = te_model(conv)
    state = dist_checkpointing.load(loaded.sharded_state_dict(), str(work / family / "mcore" / "release"))
    missing = [k for k in loaded.load_state_dict(state, strict=False).missing_keys if "_extra_state" not in k]
    imported = te_model(conv)
    conv.import_weights([imported], hf)
    conv.export_weights([imported], work / family / "back")
    ok = not missing and compare_checkpoints(hf, work / family / "back").exact
    for name, model in (("loaded", loaded), ("imported", imported)):
        got = logits(model, ids, vocab)
        diff = (got - expected).abs().max().item()
        same = torch.equal(got.argmax(-1), expected.argmax(-1))
        print(f"{family} {name}: max|dlogits| {diff:.2e}, same argmax {same}")
        ok = ok and diff <= atol and same
    print(f"{family}: {'PASS' if ok else 'FAIL'} (missing keys {missing})")
    return ok


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--atol", type=float, default=1e-4)
    args = parser.parse_args()
    import transformer_engine  # noqa: F401  (the point of this script)

    from specbridge.runtime.parallel import init_parallel

    init_parallel()
    with tempfile.TemporaryDirectory() as tmp:
        results = [check(family, Path(tmp), args.atol) for family in ("llama", "qwen3_moe")]
    sys.exit(0 if all(results) else 1)
