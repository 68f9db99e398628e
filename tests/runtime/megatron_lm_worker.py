"""Megatron-LM's own training loader on a checkpoint written by `specbridge import` (run as a script, one process
or under torchrun; megatron-core >= 0.19, which ships `megatron.training`).

    python tests/runtime/megatron_lm_worker.py HF_DIR MCORE_DIR RESULT.json [megatron-LM arguments...]

Megatron-LM's arguments are parsed as `pretrain_gpt.py` parses them, with `--use-checkpoint-args` (the model
arguments come from the checkpoint's `args`); the model is built as its GPT model provider builds it (its own
`core_transformer_config_from_args`, megatron-core's local layer spec, `GPTModel`), loaded with
`megatron.training.checkpointing.load_checkpoint` (fine-tune: no optimizer, no RNG), and its fp32 logits are
compared with transformers' model on the same tokens. Rank 0 writes the comparison to RESULT.json.

The CPU shims are the ones Megatron-LM needs without a GPU (see the project's notes on its loader): none changes
what is loaded or computed.
"""

from __future__ import annotations

import json
import os
import sys
import types
import typing


def cpu_shims() -> None:
    import torch

    typing.override = getattr(typing, "override", lambda f: f)  # megatron.training uses it; Python 3.12+ only
    from specbridge.runtime import cpu_compat

    cpu_compat.apply()
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    from megatron.training import checkpointing

    class CpuTorch(types.ModuleType):  # read_metadata builds a tensor on 'cuda' when distributed
        def tensor(self, *args, **kwargs):
            if str(kwargs.get("device", "")).startswith("cuda"):
                kwargs["device"] = "cpu"
            return torch.tensor(*args, **kwargs)

        def __getattr__(self, name):
            return getattr(torch, name)

    checkpointing.torch = CpuTorch("torch")
    from megatron.training import arguments

    arguments.get_device_arch_version = lambda: 10  # validate_args asks the GPU's architecture at TP > 1


def megatron_args(mcore_dir: str, extra: list[str]):
    from megatron.training.arguments import parse_args, validate_args
    from megatron.training.checkpointing import load_args_from_checkpoint
    from megatron.training.global_vars import set_args

    sys.argv = ["pretrain_gpt.py", "--load", mcore_dir, "--use-checkpoint-args", "--finetune", "--no-load-optim",
                "--no-load-rng", "--ckpt-format", "torch_dist", "--micro-batch-size", "1",
                "--no-gradient-accumulation-fusion", "--no-masked-softmax-fusion", "--no-bias-swiglu-fusion",
                "--no-bias-dropout-fusion", "--no-rope-fusion", "--no-persist-layer-norm",
                "--transformer-impl", "local", *extra]
    args = parse_args()
    load_args_from_checkpoint(args)
    validate_args(args)
    set_args(args)
    return args


def build_gpt(args):
    """As Megatron-LM's GPT model provider does, from its arguments."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.training.arguments import core_transformer_config_from_args

    config = core_transformer_config_from_args(args)
    spec = get_gpt_layer_local_spec(args.num_experts, False, args.qk_layernorm, normalization=args.normalization)
    return GPTModel(config=config, transformer_layer_spec=spec, vocab_size=args.padded_vocab_size,
                    max_sequence_length=args.max_position_embeddings, pre_process=True, post_process=True,
                    share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
                    position_embedding_type=args.position_embedding_type, rotary_base=args.rotary_base,
                    rotary_percent=args.rotary_percent).eval()


def main() -> None:
    hf_dir, mcore_dir, result_path, *extra = sys.argv[1:]
    import torch
    import torch.distributed as dist

    cpu_shims()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    dist.init_process_group("gloo", rank=int(os.environ.get("RANK", 0)), world_size=int(os.environ.get("WORLD_SIZE", 1)))
    args = megatron_args(mcore_dir, extra)
    from megatron.core import parallel_state, tensor_parallel

    parallel_state.initialize_model_parallel(args.tensor_model_parallel_size, args.pipeline_model_parallel_size)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    model = build_gpt(args)
    from megatron.training.checkpointing import load_checkpoint

    iteration, _ = load_checkpoint([model], None, None, strict=True)
    ids = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids, torch.arange(16).unsqueeze(0).expand_as(ids), None).float()
    group = parallel_state.get_tensor_model_parallel_group()
    shards = [torch.empty_like(logits) for _ in range(dist.get_world_size(group))]
    dist.all_gather(shards, logits.contiguous(), group=group)
    logits = torch.cat(shards, dim=-1)
    if dist.get_rank() == 0:
        from specbridge.verify import hf_model

        expected = hf_model(hf_dir, json.load(open(os.path.join(hf_dir, "config.json")))["architectures"][0])
        with torch.no_grad():
            reference = expected(input_ids=ids).logits.float()
        vocab = reference.shape[-1]
        result = {"iteration": iteration, "max_abs_diff": (logits[..., :vocab] - reference).abs().max().item(),
                  "params_dtype": str(args.params_dtype), "num_layers": args.num_layers}
        with open(result_path, "w") as f:
            json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
