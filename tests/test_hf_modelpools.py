"""Model pools of real (tiny, random) transformers models merged end to end.

For each family a base and three perturbed "fine-tuned" copies are saved with ``save_pretrained``;
``run_program`` merges them with ``merged_model_path``; the result is reloaded with the family's
``from_pretrained`` and compared with a merge computed here from the saved tensors:

- task arithmetic: theta = theta_0 + lambda * sum_i (theta_i - theta_0)   (Ilharco et al. 2023)
- simple average:  theta = (1/n) sum_i theta_i                            (Wortsman et al. 2022)

Other registered tensor-wise methods are checked for plumbing: the pool path must equal the method's
own ``prepare`` + ``merge_one`` applied to the raw saved tensors (their kernels are tested against
paper references in the kernel tests).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from fusion_bench.errors import ConfigError, ModelMismatchError
from tests.conftest import perturbed

N_FT = 3
TA_LAMBDA = 0.3


# ------------------------------------------------------------------------------------------------
# tiny families
# ------------------------------------------------------------------------------------------------
def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM, LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel, GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                       bos_token_id=0, eos_token_id=0)


def _t5():
    from transformers import T5Config, T5ForConditionalGeneration

    return T5ForConditionalGeneration, T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=40, num_layers=2,
                                                num_heads=4, decoder_start_token_id=0)


def _bert():
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification, BertConfig(vocab_size=64, hidden_size=32, intermediate_size=40,
                                                     num_hidden_layers=2, num_attention_heads=4,
                                                     max_position_embeddings=64, num_labels=3)


FAMILIES = {  # name -> (builder, model_class key of the pool)
    "llama": (_llama, "causal_lm"),
    "gpt2": (_gpt2, "causal_lm"),
    "t5": (_t5, "seq2seq_lm"),
    "bert": (_bert, "sequence_classification"),
}


def _save_family(root: Path, family: str) -> dict:
    builder, model_class = FAMILIES[family]
    cls, cfg = builder()
    torch.manual_seed(0)
    base = cls(cfg).eval()
    base.save_pretrained(root / "base")
    paths = {"_pretrained_": str(root / "base")}
    for i in range(1, N_FT + 1):
        m = cls(cfg)
        m.load_state_dict(perturbed(base.state_dict(), seed=i))
        m.save_pretrained(root / f"ft{i}")
        paths[f"ft{i}"] = str(root / f"ft{i}")
    return {"cls": cls, "model_class": model_class, "paths": paths}


def _save_clip(root: Path) -> dict:
    """Base: a full CLIPModel (keys 'vision_model.*', 'text_model.*'); fine-tuned: CLIPVisionModels under
    both names transformers writes: 'vision_model.embeddings.*' (a model loaded from a CLIP checkpoint,
    as FusionBench's Hub checkpoints) and 'embeddings.*' (a CLIPVisionModel built from its config)."""
    from transformers import CLIPVisionModel

    from fusion_bench.modelpool.base import _quiet_from_pretrained
    from tests.test_taskpool_clip import build_tiny_clip

    build_tiny_clip(root / "base")
    vision = _quiet_from_pretrained(CLIPVisionModel, root / "base")
    paths = {"_pretrained_": str(root / "base")}
    for i in range(1, N_FT + 1):
        m = _quiet_from_pretrained(CLIPVisionModel, root / "base") if i == 1 else CLIPVisionModel(vision.config)
        m.load_state_dict(perturbed(vision.state_dict(), seed=i))
        m.save_pretrained(root / f"ft{i}")
        paths[f"ft{i}"] = str(root / f"ft{i}")
    with safe_open(str(root / "ft1" / "model.safetensors"), "pt") as f:
        assert all(k.startswith("vision_model.") for k in f.keys())
    with safe_open(str(root / "ft2" / "model.safetensors"), "pt") as f:
        assert not any(k.startswith("vision_model.") for k in f.keys())
    return {"cls": CLIPVisionModel, "model_class": "clip_vision", "paths": paths}


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_pools")
    out = {f: _save_family(root / f, f) for f in FAMILIES}
    out["clip_vision"] = _save_clip(root / "clip")
    return out


# ------------------------------------------------------------------------------------------------
# independent references from the saved files
# ------------------------------------------------------------------------------------------------
def read_tensors(folder: str) -> dict[str, torch.Tensor]:
    with safe_open(str(Path(folder) / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def saved_family_tensors(fam: dict) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Base and fine-tuned tensors keyed like the module's state dict (CLIP: the vision tower's keys)."""
    base = read_tensors(fam["paths"]["_pretrained_"])
    fts = [read_tensors(fam["paths"][f"ft{i}"]) for i in range(1, N_FT + 1)]
    if fam["model_class"] == "clip_vision":
        base = {k[len("vision_model."):]: v for k, v in base.items() if k.startswith("vision_model.")}
        fts = [{k.removeprefix("vision_model."): v for k, v in sd.items()} for sd in fts]
    return base, fts


def reference_task_arithmetic(base, fts, lam):
    out = {}
    for k, b in base.items():
        if not b.is_floating_point():
            out[k] = b
            continue
        acc = b.clone()
        for sd in fts:
            acc = acc + lam * (sd[k] - b)
        out[k] = acc
    return out


def reference_simple_average(base, fts):
    out = {}
    for k, b in base.items():
        if not b.is_floating_point():
            out[k] = b
            continue
        s = torch.zeros_like(b)
        for sd in fts:
            s = s + sd[k]
        out[k] = s / len(fts)
    return out


def assert_module_matches(module: nn.Module, ref: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    sd = module.state_dict()
    assert set(ref) <= set(sd), sorted(set(ref) - set(sd))[:5]
    for k, v in ref.items():
        torch.testing.assert_close(sd[k].float(), v.float(), atol=atol, rtol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


def pool_config(fam: dict, **kw) -> dict:
    return {"models": dict(fam["paths"]), "model_class": fam["model_class"], **kw}


def run(fam, method: dict, out: Path, **kw):
    from fusion_bench.programs.fusion import run_program

    return run_program({"method": method, "modelpool": pool_config(fam, **kw), "taskpool": {},
                        "merged_model_path": str(out), "print_table": False}, log=lambda *a: None)


FAMILY_NAMES = ["clip_vision", *FAMILIES]


# ------------------------------------------------------------------------------------------------
# data-free merges of every family
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_task_arithmetic_and_simple_average(families, family, tmp_path):
    fam = families[family]
    base, fts = saved_family_tensors(fam)
    rep = run(fam, {"name": "task_arithmetic", "scaling_factor": TA_LAMBDA}, tmp_path / "ta")
    assert rep["merged_model_path"] == str(tmp_path / "ta")
    merged = fam["cls"].from_pretrained(tmp_path / "ta")
    assert_module_matches(merged, reference_task_arithmetic(base, fts, TA_LAMBDA))
    run(fam, {"name": "simple_average"}, tmp_path / "avg")
    assert_module_matches(fam["cls"].from_pretrained(tmp_path / "avg"), reference_simple_average(base, fts))
    # side files (config, tokenizer/processor of the base) are saved beside the weights
    assert (tmp_path / "ta" / "config.json").exists()
    assert json.loads((tmp_path / "ta" / "config.json").read_text())["model_type"] == merged.config.model_type


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_engine_auto_without_evaluation(families, family, tmp_path):
    """evaluate=false streams to disk where the files are the merged module; a CLIP vision tower of a full
    CLIP base (or prefix-renamed checkpoints) falls back to the in-memory engine. Same numbers either way."""
    from fusion_bench.programs.fusion import run_program

    fam = families[family]
    base, fts = saved_family_tensors(fam)
    rep = run_program({"method": {"name": "task_arithmetic", "scaling_factor": TA_LAMBDA},
                       "modelpool": pool_config(fam), "merged_model_path": str(tmp_path / "out"), "evaluate": False,
                       "print_table": False}, log=lambda *a: None)
    assert rep["engine"] == ("memory" if family == "clip_vision" else "streaming")
    assert_module_matches(fam["cls"].from_pretrained(tmp_path / "out"), reference_task_arithmetic(base, fts, TA_LAMBDA))


OTHER_METHODS = {
    "ties_merging": {"scaling_factor": 0.5, "density": 0.4},
    "dare_task_arithmetic": {"scaling_factor": 0.5, "sparsity_ratio": 0.3, "seed": 3},
    "dare_ties": {"scaling_factor": 0.5, "sparsity_ratio": 0.3, "seed": 3},
    "magmax": {},
    "model_stock": {},
    "slerp": {"t": 0.3},
    "weighted_average": {"weights": [0.2, 0.3, 0.5]},
}


def _method_reference(method, base_file: dict, ft_files: list[dict], names: list[str]) -> dict[str, torch.Tensor]:
    """The method's own per-tensor merge applied directly to the saved tensors (base file naming)."""
    from fusion_bench.io.checkpoint import StateDictSource

    keys = [k for k, v in base_file.items() if method.should_merge(k, v.dtype)]
    method.check_pool(names, True)
    method.prepare(StateDictSource(base_file, "_pretrained_"),
                   [StateDictSource(sd, n) for sd, n in zip(ft_files, names)], names, keys)
    with torch.no_grad():
        return {k: method.merge_one(k, b, [sd[k] for sd in ft_files], names) for k, b in base_file.items()}


def _tensorwise_methods() -> list[str]:
    """Every registered tensor-wise method (the suite follows the registry)."""
    from fusion_bench.methods.base import TensorwiseMerge, get_method_class, list_methods

    return [n for n in list_methods() if issubclass(get_method_class(n), TensorwiseMerge)]


@pytest.mark.parametrize("family", ["clip_vision", "gpt2", "t5"])  # renamed keys, tied weights
@pytest.mark.parametrize("method_name", _tensorwise_methods())
def test_other_methods_pool_plumbing(families, family, method_name, tmp_path):
    from fusion_bench.errors import FusionBenchError
    from fusion_bench.methods.base import TensorwiseMerge, build_method

    fam = families[family]
    method_cfg = {"name": method_name, **OTHER_METHODS.get(method_name, {})}
    names = [f"ft{i}" for i in range(1, N_FT + 1)]
    select = None
    for n in (len(names), 2, 1):  # the most models the method takes: two (slerp, ...) or one (expo, pruning)
        try:
            build_method(dict(method_cfg)).check_pool(names[:n], True)
        except FusionBenchError:
            continue
        if n < len(names):
            names = select = names[:n]
        break
    method = build_method(dict(method_cfg))
    assert isinstance(method, TensorwiseMerge)
    # reference: the base file's naming (the merge may key randomness by tensor name)
    base_file = read_tensors(fam["paths"]["_pretrained_"])
    ft_files = [read_tensors(fam["paths"][n]) for n in names]
    if family == "clip_vision":
        base_file = {k: v for k, v in base_file.items() if k.startswith("vision_model.")}
        ft_files = [{(k if k.startswith("vision_model.") else "vision_model." + k): v for k, v in sd.items()}
                    for sd in ft_files]
    ref = _method_reference(method, base_file, ft_files, names)
    if family == "clip_vision":
        ref = {k[len("vision_model."):]: v for k, v in ref.items()}
    run(fam, method_cfg, tmp_path / "out", **({"select": select} if select else {}))
    assert_module_matches(fam["cls"].from_pretrained(tmp_path / "out"), ref, atol=1e-5)


def test_causal_lm_pool_type(families, tmp_path):
    """The specialised causal LM pool (modelpool.type=causal_lm) gives the same task arithmetic."""
    from fusion_bench.modelpool.registry import get_modelpool_class

    try:
        get_modelpool_class("causal_lm")
    except Exception:
        pytest.skip("modelpool.type=causal_lm is not registered")
    fam = families["llama"]
    base, fts = saved_family_tensors(fam)
    run(fam, {"name": "task_arithmetic", "scaling_factor": TA_LAMBDA}, tmp_path / "ta", type="causal_lm")
    assert_module_matches(fam["cls"].from_pretrained(tmp_path / "ta"), reference_task_arithmetic(base, fts, TA_LAMBDA))


def test_select_restricts_the_pool(families, tmp_path):
    fam = families["bert"]
    base, fts = saved_family_tensors(fam)
    rep = run(fam, {"name": "simple_average"}, tmp_path / "avg", select=["ft1", "ft3"])
    assert rep["modelpool"]["models"].keys() == {"_pretrained_", "ft1", "ft3"}
    assert_module_matches(fam["cls"].from_pretrained(tmp_path / "avg"), reference_simple_average(base, [fts[0], fts[2]]))
    with pytest.raises(ConfigError, match="unknown model.*'ft9'"):
        run(fam, {"name": "simple_average"}, tmp_path / "bad", select=["ft9"])
    assert not (tmp_path / "bad").exists()


# ------------------------------------------------------------------------------------------------
# state-dict file pools and live modules (Python API)
# ------------------------------------------------------------------------------------------------
class MLP(nn.Module):
    def __init__(self, d_in: int = 6, hidden: int = 8, d_out: int = 3):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, d_out)
        self.register_buffer("steps", torch.tensor(7, dtype=torch.long))

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _mlp_state_dicts() -> list[dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    base = MLP().state_dict()
    return [base] + [perturbed(base, seed=i) for i in range(1, N_FT + 1)]


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".bin"])
def test_state_dict_file_pools(tmp_path, suffix):
    from fusion_bench.programs.fusion import run_program

    sds = _mlp_state_dicts()
    models = {}
    for i, sd in enumerate(sds):
        name = "_pretrained_" if i == 0 else f"m{i}"
        path = tmp_path / f"{name}{suffix}"
        if suffix == ".safetensors":
            save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
        else:
            torch.save(sd, path)
        models[name] = str(path)
    from fusion_bench.models.registry import register_model_class

    register_model_class("test_hf_modelpools_mlp", MLP)  # configs name only registered classes (or transformers)
    arch = {"class": f"{__name__}.MLP", "kwargs": {}}
    out = tmp_path / "merged.safetensors"
    rep = run_program({"method": {"name": "task_arithmetic", "scaling_factor": TA_LAMBDA},
                       "modelpool": {"models": models, "architecture": arch}, "merged_model_path": str(out),
                       "print_table": False}, log=lambda *a: None)
    assert rep["merged_model_path"] == str(out)
    with safe_open(str(out), "pt") as f:
        merged = {k: f.get_tensor(k) for k in f.keys()}
    ref = reference_task_arithmetic(sds[0], sds[1:], TA_LAMBDA)
    assert set(merged) == set(ref)
    for k in ref:
        torch.testing.assert_close(merged[k], ref[k], atol=1e-6, rtol=1e-5)
    assert merged["steps"].dtype == torch.long and int(merged["steps"]) == 7
    # without an architecture the merge is a bag of tensors with the same values
    from fusion_bench.methods.base import build_method
    from fusion_bench.modelpool import ModelPool, TensorBag

    res = build_method({"name": "task_arithmetic", "scaling_factor": TA_LAMBDA}).run(ModelPool(models))
    assert isinstance(res.model, TensorBag)
    for k, v in res.model.state_dict().items():
        torch.testing.assert_close(v, ref[k], atol=1e-6, rtol=1e-5)


def test_live_module_pool_is_not_modified():
    from fusion_bench.methods.base import build_method
    from fusion_bench.modelpool import ModelPool

    sds = _mlp_state_dicts()
    mods = []
    for sd in sds:
        m = MLP()
        m.load_state_dict(sd)
        mods.append(m)
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in mods]
    pool = ModelPool({"_pretrained_": mods[0], "a": mods[1], "b": mods[2], "c": mods[3]})
    res = build_method({"name": "simple_average"}).run(pool)
    assert isinstance(res.model, MLP) and res.model is not mods[0]
    ref = reference_simple_average(sds[0], sds[1:])
    for k, v in res.model.state_dict().items():
        torch.testing.assert_close(v, ref[k], atol=1e-6, rtol=1e-5)
    for m, b in zip(mods, before):
        for k, v in m.state_dict().items():
            assert torch.equal(v, b[k])
    # in-memory state dicts work the same way
    res2 = build_method({"name": "simple_average"}).run(ModelPool({"a": sds[1], "b": sds[2], "c": sds[3]}))
    for k, v in res2.model.state_dict().items():
        torch.testing.assert_close(v, ref[k], atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# errors: clear, naming the model and tensor, and nothing written
# ------------------------------------------------------------------------------------------------
def _broken_copy(src: str, dst: Path, edit) -> str:
    """Copy an HF folder, applying ``edit(tensors) -> tensors`` to its weights."""
    import shutil

    shutil.copytree(src, dst)
    sd = edit(read_tensors(src))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return str(dst)


def _assert_fails(fam, paths, tmp_path, match, method="task_arithmetic", streaming_match=None):
    """The in-memory engine (with evaluation) and the streaming engine both refuse, naming the model and
    the tensor, and leave nothing at (or beside) merged_model_path."""
    from fusion_bench.programs.fusion import run_program

    for engine, pattern in (("memory", match), ("streaming", streaming_match or match)):
        out = tmp_path / f"merged_{engine}"
        with pytest.raises(ModelMismatchError, match="(?i)" + pattern):
            run_program({"method": {"name": method}, "modelpool": {"models": paths, "model_class": fam["model_class"]},
                         "merged_model_path": str(out), "print_table": False, "engine": engine,
                         "evaluate": engine == "memory"}, log=lambda *a: None)
        assert not out.exists(), engine
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".merged_{engine}")], engine


def test_missing_tensor_error(families, tmp_path):
    fam = families["llama"]
    key = "model.layers.1.mlp.up_proj.weight"
    bad = _broken_copy(fam["paths"]["ft2"], tmp_path / "bad", lambda sd: {k: v for k, v in sd.items() if k != key})
    _assert_fails(fam, {**fam["paths"], "ft2": bad}, tmp_path, rf"Model 'ft2' lacks tensor '{key}'")


def test_extra_tensor_error(families, tmp_path):
    fam = families["bert"]
    bad = _broken_copy(fam["paths"]["ft1"], tmp_path / "bad", lambda sd: {**sd, "adapter.weight": torch.ones(2, 2)})
    _assert_fails(fam, {**fam["paths"], "ft1": bad}, tmp_path, r"Model 'ft1' has tensor 'adapter.weight'")


def test_shape_mismatch_error(families, tmp_path):
    fam = families["llama"]
    cls, cfg = _llama()
    cfg.intermediate_size = 48
    torch.manual_seed(1)
    cls(cfg).save_pretrained(tmp_path / "wide")
    _assert_fails(fam, {**fam["paths"], "ft3": str(tmp_path / "wide")}, tmp_path,
                  r"Tensor 'model.layers.0.mlp.\w+_proj.weight' has shape \[\d+, \d+\] in model 'ft3'")


def test_model_type_mismatch_error(families, tmp_path):
    fam = families["llama"]
    _assert_fails(fam, {**fam["paths"], "ft3": families["gpt2"]["paths"]["ft1"]}, tmp_path,
                  r"different architectures.*'ft3': 'gpt2'")


def test_nan_weights_error(families, tmp_path):
    fam = families["t5"]
    key = "encoder.block.1.layer.1.DenseReluDense.wo.weight"

    def poison(sd):
        sd = dict(sd)
        sd[key] = sd[key].clone()
        sd[key][0, 0] = float("nan")
        return sd

    bad = _broken_copy(fam["paths"]["ft1"], tmp_path / "bad", poison)
    _assert_fails(fam, {**fam["paths"], "ft1": bad}, tmp_path, rf"Model 'ft1' has non-finite values.*'{key}'",
                  method="simple_average")


def test_dry_run_validates_hf_pools(families, tmp_path):
    from fusion_bench.programs.fusion import run_program

    for family in FAMILY_NAMES:
        fam = families[family]
        rep = run_program({"method": {"name": "task_arithmetic"}, "modelpool": pool_config(fam), "dry_run": True},
                          log=lambda *a: None)
        assert rep["dry_run"] and rep["plan"]["tensors"] > 0, family
