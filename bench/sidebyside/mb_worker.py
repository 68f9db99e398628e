"""Megatron-Bridge side of the side-by-side bench (run with the Megatron-Bridge venv's python).

    mb_worker.py inproc HF_DIR OUT JSON [--tp N]    import into memory, export HF, stream (phases timed)
    mb_worker.py import HF_DIR MCORE_DIR [--tp N]   what `AutoBridge.import_ckpt` does, with a CPU provider
    mb_worker.py export HF_DIR MCORE_DIR OUT [--tp N]   `AutoBridge.export_ckpt`

`import_ckpt` itself builds its provider with TransformerEngine fusions switched on, which cannot run on a CPU;
`import` runs its body (from_hf_pretrained -> provider -> model with the HF weights -> save_megatron_model with
low_memory_save) with the fusions switched off, as on a CPU-only machine a user would have to.
"""

import time

T_START = time.time()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

CPU_OFF = ("gradient_accumulation_fusion", "masked_softmax_fusion", "bias_activation_fusion", "bias_dropout_fusion",
           "apply_rope_fusion", "persist_layer_norm", "sequence_parallel", "moe_permute_fusion", "moe_grouped_gemm")


def _setup(tp, init=True):
    import torch

    import mb_cpu

    mb_cpu.install_te_placeholder()
    if init:
        mb_cpu.init(tp)
    else:  # export_ckpt initialises the process group itself
        mb_cpu.patch_cuda()
    return torch


def _provider(bridge, tp, torch):
    from megatron.bridge.models.gpt_provider import local_layer_spec

    provider = bridge.to_megatron_provider(load_weights=True)
    if "Gemma4" not in type(bridge._model_bridge).__name__:
        provider.transformer_layer_spec = local_layer_spec
    provider.tensor_model_parallel_size, provider.pipeline_model_parallel_size = tp, 1
    provider.pipeline_dtype = provider.params_dtype = torch.bfloat16
    provider.bf16, provider.fp16 = True, False
    provider.use_cpu_initialization = True
    for field in CPU_OFF:
        if hasattr(provider, field):
            setattr(provider, field, False)
    if getattr(provider, "num_moe_experts", None):
        provider.expert_model_parallel_size = 1
        provider.moe_token_dispatcher_type = "alltoall"
    provider.finalize()
    return provider


def _model(bridge, tp, torch):
    return _provider(bridge, tp, torch).provide_distributed_model(wrap_with_ddp=False, use_cpu_initialization=True,
                                                                  bf16=True, fp16=False)


def inproc(args):
    t = time.perf_counter()
    torch = _setup(args.tp)
    import torch.distributed as dist
    from megatron.bridge import AutoBridge
    from workloads import STREAM_AGAIN, import_config_class

    import_config_class(args.hf_dir)  # a library import, before the clock on both sides
    res = {"imports_s": time.time() - T_START}
    t = time.perf_counter()
    bridge = AutoBridge.from_hf_pretrained(args.hf_dir, torch_dtype=torch.bfloat16)
    model = _model(bridge, args.tp, torch)
    res["import_s"] = time.perf_counter() - t
    os.sync()
    dist.barrier()
    t = time.perf_counter()
    bridge.save_hf_pretrained(model, args.out, show_progress=False)
    dist.barrier()
    res["export_s"] = time.perf_counter() - t
    os.sync()  # the export's writeback done: the stream touches no disk and is not measured against it
    passes = []
    for _ in range(1 + STREAM_AGAIN):  # the first pass, then the steady state, as on specbridge's side
        dist.barrier()
        t, nbytes, count = time.perf_counter(), 0, 0
        for item in bridge.export_hf_weights(model, cpu=True, show_progress=False):
            nbytes += item.weight.numel() * item.weight.element_size()
            count += 1
        dist.barrier()
        passes.append(time.perf_counter() - t)
    res.update(stream_s=passes[0], stream_again_s=passes[1:], stream_bytes=nbytes, stream_tensors=count)
    import megatron.bridge
    import megatron.core
    import transformers

    res["versions"] = {"megatron-bridge": getattr(megatron.bridge, "__version__", "?"),
                       "megatron-core": megatron.core.__version__, "transformers": transformers.__version__,
                       "torch": torch.__version__}
    if dist.get_rank() == 0:
        with open(args.json, "w") as f:
            json.dump(res, f)


def import_ckpt(args):
    torch = _setup(args.tp)
    from megatron.bridge import AutoBridge

    bridge = AutoBridge.from_hf_pretrained(args.hf_dir, torch_dtype=torch.bfloat16)
    model = _model(bridge, args.tp, torch)
    bridge.save_megatron_model(model, args.mcore_dir, hf_tokenizer_path=args.hf_dir, low_memory_save=True)


def export_ckpt(args):
    _setup(args.tp, init=False)
    from megatron.bridge import AutoBridge

    bridge = AutoBridge.from_hf_pretrained(args.hf_dir)
    bridge.export_ckpt(args.mcore_dir, args.out, show_progress=False)


def main():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("inproc")
    p.add_argument("hf_dir"), p.add_argument("out"), p.add_argument("json")
    p = sub.add_parser("import")
    p.add_argument("hf_dir"), p.add_argument("mcore_dir")
    p = sub.add_parser("export")
    p.add_argument("hf_dir"), p.add_argument("mcore_dir"), p.add_argument("out")
    for p in sub.choices.values():
        p.add_argument("--tp", type=int, default=1)
    args = parser.parse_args()
    {"inproc": inproc, "import": import_ckpt, "export": export_ckpt}[args.mode](args)


if __name__ == "__main__":
    main()
