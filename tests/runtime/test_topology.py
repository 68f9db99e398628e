"""The topology before anything runs in parallel: parallel sizes refused in one line, the uneven pipeline split
(checked against megatron-core's own layer counts), the model-size checks, global names from the module tree,
a spec's unknown TransformerConfig field reported at its place in the spec, and the process groups destroyed at exit."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from specbridge.api import Converter, builtin_specs
from specbridge.errors import ConversionError, UsageError
from specbridge.runtime.build import check_model_sizes, model_vocab_size, stage_layers
from specbridge.runtime.naming import local_to_global
from specbridge.runtime.parallel import Topology, check_sizes
from tests.support import tiny_model


@pytest.mark.parametrize("world, sizes, launched, message", [
    (1, dict(tp=2), False, "--tp 2 needs 2 processes (or a multiple), and this is one: launch it with torchrun "
                           "--nproc-per-node 2"),
    (1, dict(tp=2, ep=2), False, "--tp 2 --ep 2 needs 4 processes"),
    (1, dict(pp=2, vpp=2), False, "--pp 2 --vpp 2 needs 2 processes"),
    (3, dict(tp=2), True, "3 processes do not split into tensor x pipeline parallel groups of --tp 2 x --pp 1 = 2"),
    (4, dict(tp=2, pp=4), True, "--tp 2 x --pp 4 = 8"),
    (2, dict(ep=4), True, "2 processes do not split into expert groups of --etp 1 x --ep 4 x --pp 1 = 4"),
    (4, dict(tp=2, etp=4, ep=2), True, "expert groups of --etp 4 x --ep 2 x --pp 1 = 8"),
    (2, dict(tp=0), True, "parallel sizes must be at least 1 (got --tp 0"),
    (2, dict(ep=-1), True, "got --ep -1"),
    (2, dict(vpp=2), True, "--vpp 2 interleaves pipeline stages and needs --pp > 1"),
])
def test_parallel_size_mistakes_are_one_line(world, sizes, launched, message):
    with pytest.raises(UsageError) as info:
        check_sizes(world, launched=launched, **sizes)
    assert message in str(info.value) and "\n" not in str(info.value) and info.value.on_every_rank


@pytest.mark.parametrize("world, sizes", [(1, {}), (2, dict(tp=2)), (4, dict(tp=2, ep=2)), (8, dict(tp=2, pp=2)),
                                          (4, dict(pp=2, vpp=2)), (4, dict(tp=2, etp=1, ep=4))])
def test_parallel_sizes_that_fit(world, sizes):
    check_sizes(world, **sizes)


@pytest.mark.parametrize("layers, pp, vpp, expected", [
    (4, 2, 1, [2, 2]), (5, 2, 1, [3, 2]), (7, 4, 1, [3, 1, 1, 2]), (9, 4, 1, [3, 2, 2, 2]), (3, 3, 1, [1, 1, 1]),
    (10, 2, 2, [6, 4]), (8, 2, 2, [4, 4]), (6, 1, 1, [6]), (2, 2, 1, [1, 1]),
])
def test_stage_layers_match_megatron_core(layers, pp, vpp, expected):
    assert stage_layers(layers, pp, vpp) == expected
    if len(set(expected)) > 1:  # megatron-core builds exactly these counts from the first/last-stage fields
        assert _megatron_counts(layers, pp, vpp, expected) == expected


def _megatron_counts(layers: int, pp: int, vpp: int, counts: list[int]) -> list[int]:
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(num_layers=layers, hidden_size=8, num_attention_heads=1,
                               pipeline_model_parallel_size=pp, pipeline_dtype=torch.float32,
                               virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None,
                               num_layers_in_first_pipeline_stage=counts[0],
                               num_layers_in_last_pipeline_stage=counts[-1])
    stages = range(vpp) if vpp > 1 else [None]
    return [sum(get_num_layers_to_build(config, vp_stage=v, pp_rank=r) for v in stages) for r in range(pp)]


@pytest.mark.parametrize("layers, pp, vpp, message", [
    (1, 2, 1, "1 layers cannot fill --pp 2 pipeline stages"), (5, 2, 2, "5 layers do not split into --vpp 2"),
    (3, 2, 3, "cannot fill --pp 2"),
])
def test_stage_layers_refusals(layers, pp, vpp, message):
    with pytest.raises(UsageError, match=message):
        stage_layers(layers, pp, vpp)


def _plan(family: str, **overrides):
    return Converter.from_config(tiny_model(family, **overrides).config).plan


@pytest.mark.parametrize("family, overrides, topology, message", [
    ("llama", {}, Topology(world_size=3, tp_size=3), "--tp 3 does not divide num_attention_heads = 4 "
                                                    "(mcore.transformer at "),
    ("llama", {}, Topology(world_size=5, tp_size=5), "choose --tp among 1, 2, 4"),
    ("qwen3_moe", {}, Topology(world_size=3, ep_size=3), "--ep 3 does not divide num_moe_experts = 4"),
    ("qwen3_moe", {}, Topology(world_size=3, etp_size=3), "--etp 3 does not divide moe_ffn_hidden_size = 40"),
    ("llama", {}, Topology(world_size=2, ep_size=2), "--ep 2 splits experts, and this llama model has none"),
    ("llama", dict(num_attention_heads=8, num_key_value_heads=3), Topology(world_size=2, tp_size=2),
     "--tp 2 does not divide num_query_groups = 3"),
])
def test_model_size_mistakes_name_the_field_and_its_place(family, overrides, topology, message):
    plan = _plan(family, **overrides)
    with pytest.raises(UsageError) as info:
        check_model_sizes(plan, plan.transformer_kwargs(), topology)
    assert message in str(info.value), str(info.value)
    assert info.value.on_every_rank


def test_model_sizes_that_fit():
    plan = _plan("qwen3_moe")  # 2 KV groups on TP 4: megatron-core replicates them
    for topology in (Topology(), Topology(world_size=4, tp_size=4), Topology(world_size=4, ep_size=4),
                     Topology(world_size=2, etp_size=2, ep_size=2)):
        check_model_sizes(plan, plan.transformer_kwargs(), topology)


def test_recorded_vocab_padding():
    assert model_vocab_size(251, 2) == 256 and model_vocab_size(251, 4) == 512
    assert model_vocab_size(251, 4, padded=256) == 256  # a checkpoint written at TP 2, loaded at TP 4
    with pytest.raises(UsageError, match="padded to 256 rows, which --tp 3 does not divide"):
        model_vocab_size(251, 3, padded=256)


class _Layer(torch.nn.Module):
    def __init__(self, layer_number: int, experts: list[int] | None = None):
        super().__init__()
        self.layer_number = layer_number
        self.norm = torch.nn.LayerNorm(2)
        if experts is not None:
            self.mlp = _MoE(experts)


class _MoE(torch.nn.Module):
    def __init__(self, indices: list[int]):
        super().__init__()
        self.local_expert_indices = indices
        self.experts = torch.nn.Module()
        self.experts.local_experts = torch.nn.ModuleList(torch.nn.Linear(2, 2, bias=False) for _ in indices)


def test_global_names_come_from_layer_number_and_local_expert_indices():
    model = torch.nn.Module()
    model.decoder = torch.nn.Module()
    model.decoder.layers = torch.nn.ModuleList([_Layer(4, [6, 7]), _Layer(5)])
    model.decoder.final_layernorm = torch.nn.LayerNorm(2)
    names = local_to_global(model)
    assert names["decoder.layers.0.norm.weight"] == "decoder.layers.3.norm.weight"
    assert names["decoder.layers.1.norm.bias"] == "decoder.layers.4.norm.bias"
    assert names["decoder.layers.0.mlp.experts.local_experts.1.weight"] == \
        "decoder.layers.3.mlp.experts.local_experts.7.weight"
    assert names["decoder.final_layernorm.weight"] == "decoder.final_layernorm.weight"


def test_unknown_transformer_field_is_reported_at_its_place_in_the_spec(tmp_path, parallel):
    text = builtin_specs()["llama"].read_text()
    assert "  transformer:\n" in text
    spec = tmp_path / "llama_typo.yaml"
    spec.write_text(text.replace("  transformer:\n", "  transformer:\n    num_layer_typo: 3\n", 1))
    line = spec.read_text().splitlines().index("    num_layer_typo: 3") + 1
    conv = Converter.from_config(tiny_model("llama").config, spec)
    with pytest.raises(ConversionError) as info:
        conv.build_model()
    message = str(info.value)
    assert "mcore.transformer field 'num_layer_typo'" in message and "TransformerConfig" in message
    assert f"llama_typo.yaml:{line}:" in message and "\n" not in message



def test_process_groups_are_destroyed_before_the_interpreter_exits():
    """A gloo group left to the interpreter's teardown can abort the process after its work is done; the group
    specbridge creates is destroyed by an exit handler (handlers run last-registered first, so one registered
    before `init_parallel` sees the state after ours)."""
    script = textwrap.dedent("""
        import atexit, torch.distributed as dist
        atexit.register(lambda: print("initialised at exit:", dist.is_initialized()))
        from specbridge.runtime.parallel import destroy_parallel, init_parallel
        init_parallel()
        destroy_parallel()
        init_parallel()  # a second group: one handler all the same
        print("initialised:", dist.is_initialized())
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).parents[2])
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == ["initialised: True", "initialised at exit: False"]
