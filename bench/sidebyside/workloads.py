"""The three side-by-side workloads (~1 GB each, bf16, 400 MB shards), made with transformers' own classes so both
tools read a checkpoint transformers wrote: W1 Llama, W2 Qwen3-MoE (32 experts), W3 Gemma 4 dense (sliding and
full layers, K=V on the full one). A WordLevel tokenizer is saved beside the weights (Megatron-Bridge's
`save_hf_pretrained` copies one).

    python workloads.py NAME OUT    (run with the python whose transformers both tools can read: the MB venv's)
"""

import sys
import time

import torch

WORKLOADS = ("w1_llama", "w2_qwen3moe", "w3_gemma4")
STREAM_AGAIN = 2  # weight-sync passes after the first (a sync runs every training step), timed on both sides


def model_for(name: str):
    import transformers as tf

    if name == "w1_llama":
        return tf.LlamaForCausalLM, tf.LlamaConfig(
            hidden_size=2048, num_attention_heads=16, num_key_value_heads=8, intermediate_size=5632,
            num_hidden_layers=8, vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False,
            rms_norm_eps=1e-5, rope_theta=10000.0)
    if name == "w2_qwen3moe":
        return tf.Qwen3MoeForCausalLM, tf.Qwen3MoeConfig(
            hidden_size=1024, num_attention_heads=16, num_key_value_heads=4, head_dim=128, num_experts=32,
            moe_intermediate_size=512, num_experts_per_tok=2, num_hidden_layers=6, vocab_size=32000,
            intermediate_size=3072, max_position_embeddings=4096, tie_word_embeddings=False, norm_topk_prob=True,
            decoder_sparse_step=1, mlp_only_layers=[])
    if name == "w3_gemma4":
        return tf.Gemma4ForCausalLM, tf.Gemma4TextConfig(
            hidden_size=2048, num_attention_heads=8, num_key_value_heads=4, head_dim=256, global_head_dim=512,
            num_global_key_value_heads=1, attention_k_eq_v=True, intermediate_size=8192, num_hidden_layers=6,
            layer_types=["sliding_attention"] * 5 + ["full_attention"], sliding_window=1024, vocab_size=32000,
            hidden_size_per_layer_input=0, num_kv_shared_layers=0, enable_moe_block=False,
            final_logit_softcapping=30.0, tie_word_embeddings=True, max_position_embeddings=8192)
    raise SystemExit(f"unknown workload {name!r}; one of {WORKLOADS}")


def save_tokenizer(out: str) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, **{f"w{i}": i for i in range(4, 1000)}}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(out)


def main(name: str, out: str) -> None:
    cls, config = model_for(name)
    config.architectures = [cls.__name__]
    start = time.time()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in cls(config).named_parameters()}
    model = cls(config)  # bf16, then every parameter overwritten with seeded values
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for n, p in model.named_parameters():
            assert p.shape == shapes[n]
            p.copy_(torch.randn(p.shape, generator=generator).mul_(0.02).add_(0.01 if p.ndim == 1 else 0.0))
    model.config.dtype = torch.bfloat16
    model.save_pretrained(out, max_shard_size="400MB")
    save_tokenizer(out)
    count = sum(p.numel() for p in model.parameters())
    print(f"{name}: {count / 1e6:.1f}M parameters in {time.time() - start:.1f} s")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])


def import_config_class(hf_dir: str) -> None:
    """Import the transformers configuration module of the checkpoint's model type, as a library import before
    the clock: both in-process workers call it (Megatron-Bridge's own package import already loads most of them)."""
    import json
    import os

    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    with open(os.path.join(hf_dir, "config.json")) as f:
        CONFIG_MAPPING[json.load(f)["model_type"]]
