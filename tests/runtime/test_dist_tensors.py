"""Reading a Megatron checkpoint's tensors directly (`runtime.dist_tensors`), without building a model: the same
tensors, bit for bit and by the same names, as megatron-core's loader puts into a model; the export split over
ranks by bytes; and checkpoints that record no shapes still exported through a model."""

from __future__ import annotations

import json

import pytest
import torch

from specbridge.api import Converter, hf_config_from_dict
from specbridge.cli import main
from specbridge.runtime import mcore_checkpoint
from specbridge.runtime.exporter import export_groups
from specbridge.runtime.placement import checkpoint_share, local_tensors
from specbridge.verify import compare_checkpoints
from tests.support import save_tiny


def _converter(mcore):
    meta = mcore_checkpoint.read_metadata(mcore)
    conv = Converter.from_config(hf_config_from_dict(meta["hf_config"]), mcore_checkpoint.recorded_spec(mcore, meta),
                                 meta["architecture"], meta["format"])
    return conv, meta


@pytest.mark.parametrize("family,flags", [("llama", []), ("qwen3_moe_mixed", []), ("deepseek_v3", []),
                                          ("gemma4_e2b_vlm", []), ("qwen3_moe", ["--layer-spec", "local"])])
def test_same_tensors_as_megatron_core_loads(family, flags, tmp_path, parallel):
    hf, mcore = save_tiny(family, tmp_path / "hf", vocab_size=203), tmp_path / "mcore"
    assert main(["import", str(hf), str(mcore), *flags]) == 0
    conv, meta = _converter(mcore)
    chunks = conv.build_model(params_dtype=mcore_checkpoint.tensor_dtype(mcore),
                              padded_vocab=meta.get("padded_vocab_size"))
    mcore_checkpoint.load(chunks, mcore)
    loaded = {k: v.detach() for k, v in local_tensors(chunks).items()}
    with mcore_checkpoint.read_tensors(mcore, meta, conv.expanded_plan()) as tensors:
        assert set(tensors) == set(loaded)
        for name, expected in loaded.items():
            got = tensors[name]
            assert got.dtype == expected.dtype and torch.equal(got, expected), name
        assert tensors.bytes_read == sum(t.numel() * t.element_size() for t in loaded.values())


def test_share_splits_every_group_once_by_bytes(tmp_path):
    hf, mcore = save_tiny("qwen3_moe_mixed", tmp_path / "hf"), tmp_path / "mcore"
    assert main(["import", str(hf), str(mcore)]) == 0
    conv, meta = _converter(mcore)
    plan = conv.expanded_plan()
    with mcore_checkpoint.read_tensors(mcore, meta, plan) as tensors:
        groups = list(export_groups(plan))
        shares = [checkpoint_share(groups, tensors.nbytes, rank, 3) for rank in range(3)]
        assert set().union(*shares) == {m.mcore for m in plan.mappings}
        assert sum(map(len, shares)) == len({m.mcore for m in plan.mappings})  # disjoint
        for group in groups:  # the experts of one layer and rule stay together (one stacked HF tensor)
            assert sum(any(m.mcore in share for m in group) for share in shares) == 1
        load = [sum(map(tensors.nbytes, share)) for share in shares]
        largest = max(sum(tensors.nbytes(m.mcore) for m in g) for g in groups)
        assert max(load) - min(load) <= largest


def test_checkpoint_without_recorded_shapes_exports_through_a_model(tmp_path):
    hf, mcore, back = save_tiny("qwen3", tmp_path / "hf"), tmp_path / "mcore", tmp_path / "back"
    assert main(["import", str(hf), str(mcore)]) == 0
    meta = json.loads((mcore / "specbridge.json").read_text())
    del meta["tensor_shapes"]  # as written before shapes were recorded
    (mcore / "specbridge.json").write_text(json.dumps(meta))
    assert main(["export", str(mcore), str(back)]) == 0
    assert compare_checkpoints(hf, back).exact
