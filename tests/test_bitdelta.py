"""BitDelta (method ``bitdelta``, kernels.compression.bitdelta) against references written from the paper:
delta -> mean|delta| * sign(delta), scale distillation = Adam on the logits' MSE w.r.t. the scales only."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from fusion_bench.errors import ConfigError
from fusion_bench.kernels.compression import bitdelta as K
from fusion_bench.methods import get_method_class
from fusion_bench.methods.compression.bitdelta import apply_bitdelta
from fusion_bench.modelpool import build_modelpool
from fusion_bench.testing.tiny_lm import save_tiny_llama_pool

TARGET_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
def test_compress_is_sign_times_mean_abs():
    g = torch.Generator().manual_seed(0)
    base, ft = torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)
    ft[0, 0] = base[0, 0]  # a zero delta gets +1
    bits, alpha = K.compress(base, ft)
    d = ft - base
    assert alpha.item() == pytest.approx(float(sum(abs(x) for x in d.flatten().tolist()) / d.numel()), rel=1e-6)
    expect = [[1.0 if d[i, j] >= 0 else -1.0 for j in range(5)] for i in range(7)]
    assert K.signs(bits).tolist() == expect and bool(bits[0, 0])
    # alpha is the L2-optimal scale of these signs
    err = lambda a: float(((d - a * K.signs(bits)) ** 2).sum())  # noqa: E731
    assert err(alpha) < err(alpha * 1.01) and err(alpha) < err(alpha * 0.99)
    torch.testing.assert_close(K.rebuild(base, bits, alpha), base + alpha * torch.tensor(expect))


def test_rebuild_rounds_once_to_the_dtype():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(16, 8, generator=g).bfloat16()
    bits = torch.rand(16, 8, generator=g) > 0.5
    out = K.rebuild(base, bits, 0.0123)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, (base.float() + 0.0123 * (bits.float() * 2 - 1)).bfloat16())


@pytest.mark.parametrize("shape", [(1,), (8,), (3, 5), (17, 9), (4, 8)])
def test_pack_bits_round_trip(shape):
    bits = torch.rand(shape, generator=torch.Generator().manual_seed(2)) > 0.5
    packed = K.pack_bits(bits)
    n = math.prod(shape)
    assert packed.dtype == torch.uint8 and packed.numel() == (n + 7) // 8 == K.packed_nbytes(n)
    flat = bits.flatten().tolist()
    assert packed[0].item() == sum(1 << i for i, b in enumerate(flat[:8]) if b)  # least significant first
    assert torch.equal(K.unpack_bits(packed, shape), bits)
    with pytest.raises(ValueError):
        K.unpack_bits(packed, (n + 8,))


# ----------------------------------------------------------------------------------------------
# the method
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("bitdelta")
    paths = save_tiny_llama_pool(root / "zoo", n=1, seed=7, scale=0.03)
    return root, paths


def pool_of(paths):
    return build_modelpool({"type": "causal_lm", "models": {"_pretrained_": paths["base"], "ft": paths["ft1"]}})


def load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def run(paths, **cfg):
    return get_method_class("bitdelta")({"device": "cpu", "progress": False, **cfg}).run(pool_of(paths))


def test_initial_scales_match_formula(zoo, tmp_path):
    _, paths = zoo
    res = run(paths, num_steps=0, save_delta=str(tmp_path / "delta"))
    base, ft = load(paths["base"]).state_dict(), load(paths["ft1"]).state_dict()
    out = res.model.state_dict()
    n_targets = 0
    for k, v in out.items():
        if k.endswith(".weight") and k.split(".")[-2] in TARGET_SUFFIXES:
            d = ft[k] - base[k]
            ref = base[k] + d.abs().mean() * torch.where(d >= 0, 1.0, -1.0)
            torch.testing.assert_close(v, ref, rtol=0, atol=1e-7)
            n_targets += 1
        else:  # embeddings, norms, lm_head: the fine-tune's own
            assert torch.equal(v, ft[k]), k
    assert n_targets == 14 == res.metadata["compressed_matrices"]
    b = res.metadata["bytes"]
    numels = [ft[k].numel() for k in ft if k.endswith(".weight") and k.split(".")[-2] in TARGET_SUFFIXES]
    assert b["delta_full"] == 4 * sum(numels)
    assert b["delta_1bit_packed"] == sum((n + 7) // 8 + 4 for n in numels)
    # the storage form reloads onto the base to the same model
    restored = apply_bitdelta(load(paths["base"]), tmp_path / "delta")
    for k, v in restored.state_dict().items():
        assert torch.equal(v, out[k]), k
    meta = json.loads((tmp_path / "delta" / "bitdelta.json").read_text())
    assert meta["format"] == "fusion_bench.bitdelta" and len(meta["shapes"]) == 14
    assert res.metadata["save_delta"]["bytes_on_disk"] > b["delta_1bit_packed"]
    # an existing folder is not replaced without overwrite_delta
    from fusion_bench.io.outputs import OutputExistsError

    with pytest.raises(OutputExistsError):
        run(paths, num_steps=0, save_delta=str(tmp_path / "delta"))


def reference_first_step(paths, ids: torch.Tensor, lr: float) -> tuple[dict[str, float], float]:
    """Scales after one Adam step from mean|delta|: gradient of MSE(logits(W_base + a S), logits(W_ft)) w.r.t.
    each a by functional_call on the fine-tuned model; Adam's first step is a - lr * g / (|g| + eps)."""
    from torch.func import functional_call

    ft_model, base = load(paths["ft1"]), load(paths["base"]).state_dict()
    ft = ft_model.state_dict()
    keys = [k for k in ft if k.endswith(".weight") and k.split(".")[-2] in TARGET_SUFFIXES]
    alphas = {k: (ft[k] - base[k]).abs().mean().clone().requires_grad_(True) for k in keys}
    signs = {k: torch.where(ft[k] - base[k] >= 0, 1.0, -1.0) for k in keys}
    with torch.no_grad():
        target = ft_model(input_ids=ids).logits
    weights = {k: base[k] + alphas[k] * signs[k] for k in keys}
    out = functional_call(ft_model, weights, args=(), kwargs={"input_ids": ids}).logits
    loss = ((out - target) ** 2).mean()
    grads = torch.autograd.grad(loss, [alphas[k] for k in keys])
    with torch.no_grad():
        return ({k[: -len(".weight")]: float(alphas[k] - lr * g / (g.abs() + 1e-8)) for k, g in zip(keys, grads)},
                float(loss))


def test_one_distillation_step_matches_reference(zoo):
    _, paths = zoo
    lr = 1e-3
    res = run(paths, num_steps=1, lr=lr, batch_size=2, seq_len=32, seed=5, schedule="constant")
    from fusion_bench.data.lm_text import calibration_batches, load_texts
    from fusion_bench.testing.tiny_lm import byte_tokenizer

    ids = calibration_batches(byte_tokenizer(), load_texts("builtin", split="train"), n_samples=2, seq_len=32, seed=5)
    ref, ref_loss = reference_first_step(paths, ids, lr)
    got = {n: s["final"] for n, s in res.metadata["scales"].items()}
    assert set(got) == set(ref)
    for n in ref:
        assert got[n] == pytest.approx(ref[n], rel=1e-5, abs=1e-8), n
        assert got[n] != pytest.approx(res.metadata["scales"][n]["initial"], rel=1e-6)  # it moved
    d = res.metadata["distillation"]
    assert d["loss_first"] == pytest.approx(ref_loss, rel=1e-5)  # the MSE of the logits at the initial scales
    assert d["calibration"]["n_samples"] == 2 and d["calibration"]["seq_len"] == 32


def test_distillation_lowers_the_loss_and_writes_the_scales(zoo):
    _, paths = zoo
    res = run(paths, num_steps=12, lr=2e-3, batch_size=2, n_samples=2, seq_len=32, schedule="constant")
    d = res.metadata["distillation"]
    assert len(d["loss"]) == 12 and d["loss_last"] < d["loss_first"]
    base, ft = load(paths["base"]).state_dict(), load(paths["ft1"]).state_dict()
    for n, s in res.metadata["scales"].items():
        k = f"{n}.weight"
        ref = base[k] + s["final"] * torch.where(ft[k] - base[k] >= 0, 1.0, -1.0)
        torch.testing.assert_close(res.model.state_dict()[k], ref, rtol=0, atol=1e-7)


def test_config_errors(zoo):
    _, paths = zoo
    with pytest.raises(ConfigError, match="names the base"):
        run(paths, model="_pretrained_", num_steps=0)
    with pytest.raises(ConfigError, match="Did you mean 'ft'"):
        run(paths, model="ft2", num_steps=0)
    with pytest.raises(ConfigError, match="num_step"):
        get_method_class("bitdelta")({"num_step": 3})
    nobase = build_modelpool({"type": "causal_lm", "models": {"a": paths["ft1"], "b": paths["base"]}})
    with pytest.raises(ConfigError, match="_pretrained_"):
        get_method_class("bitdelta")({"num_steps": 0}).run(nobase)


def test_cli_bitdelta_then_perplexity(zoo, tmp_path, capsys, monkeypatch):
    from tests.conftest import run_cli

    _, paths = zoo
    monkeypatch.chdir(tmp_path)
    rep = tmp_path / "report.json"
    code, out, err = run_cli(["method=bitdelta", "method.num_steps=3", "method.seq_len=32",
                              "method.perplexity_data=builtin", "method.perplexity_max_length=128",
                              "method.perplexity_max_tokens=300", "modelpool=causal_lm_merge",
                              f"modelpool.models._pretrained_={paths['base']}", f"modelpool.models.math={paths['ft1']}",
                              "~modelpool.models.code", "modelpool.dtype=float32", "taskpool=causal_lm_perplexity",
                              "taskpool.max_length=128", "taskpool.stride=64", "taskpool.max_tokens=300",
                              f"merged_model_path={tmp_path / 'out'}", f"report_path={rep}", "device=cpu"], capsys)
    assert code == 0, err
    report = json.loads(rep.read_text())
    md = report["metadata"]
    assert md["model"] == "math" and md["compressed_matrices"] == 14
    assert set(md["perplexity"]) == {"base", "finetuned", "bitdelta_initial_scales", "bitdelta"}
    assert report["evaluation"]["tasks"]["builtin"]["perplexity"] > 0
    reloaded = load(tmp_path / "out")
    ft = load(paths["ft1"]).state_dict()
    k = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(reloaded.state_dict()[k], ft[k])
    assert torch.equal(reloaded.state_dict()["lm_head.weight"], ft["lm_head.weight"])
    with torch.no_grad():
        x = torch.randint(0, 256, (1, 16))
        assert F.mse_loss(reloaded(input_ids=x).logits, load(paths["ft1"])(input_ids=x).logits) < 1.0
