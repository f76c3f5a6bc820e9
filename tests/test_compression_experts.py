"""Expert pruning and dynamic skipping (Lu et al. 2024) on tiny Mixtral / Qwen2-MoE models built offline, against
naive per-token references; reload with from_pretrained."""

from __future__ import annotations

import itertools

import pytest
import torch

from fusion_bench.methods import build_method
from fusion_bench.methods.compression.expert_pruning import enable_dynamic_skipping, expert_output, moe_block

pytestmark = pytest.mark.usefixtures("one_thread")


def _mixtral(experts=6, layers=2):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=258, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=experts, num_experts_per_tok=2,
                        max_position_embeddings=256, bos_token_id=256, eos_token_id=257, pad_token_id=257)
    m = MixtralForCausalLM(cfg).eval()
    with torch.no_grad():  # spread the routers so that subsets differ clearly
        for layer in m.model.layers:
            layer.mlp.gate.weight.mul_(20)
    return m


def _qwen_moe():
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(1)
    cfg = Qwen2MoeConfig(vocab_size=258, hidden_size=32, intermediate_size=48, moe_intermediate_size=24,
                         shared_expert_intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, num_experts=5, num_experts_per_tok=2, norm_topk_prob=False,
                         max_position_embeddings=256, bos_token_id=256, eos_token_id=257, pad_token_id=257)
    return Qwen2MoeForCausalLM(cfg).eval()


def _save(model, folder):
    from fusion_bench.testing.tiny_lm import byte_tokenizer

    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return str(folder)


def _pool(path):
    from fusion_bench.modelpool.causal_lm import CausalLMPool

    return CausalLMPool({"_pretrained_": path})


def _ids(n=4, seq=40):
    from fusion_bench.data.lm_text import calibration_batches, load_texts
    from fusion_bench.testing.tiny_lm import byte_tokenizer

    return calibration_batches(byte_tokenizer(), load_texts("builtin", split="train"), n_samples=n, seq_len=seq, seed=0)


@torch.no_grad()
def naive_routed(block, x, keep, top_k, normalize=True):
    """Token by token: softmax over the kept experts' logits, top-k, (renormalise), weighted sum of their outputs."""
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float64)
    W = block.gate.weight.double()
    for t in range(x.shape[0]):
        logits = torch.stack([x[t].double() @ W[e] for e in keep])
        p = torch.softmax(logits, 0)
        order = sorted(range(len(keep)), key=lambda i: -float(p[i]))[:top_k]
        w = torch.stack([p[i] for i in order])
        if normalize:
            w = w / w.sum()
        for wi, i in zip(w, order):
            out[t] += wi * expert_output(block, keep[i], x[t:t + 1].float())[0].double()
    return out


def _moe_inputs(model, ids, layer_index):
    seen = []
    block = moe_block(model.model.layers[layer_index])
    h = block.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1]).detach()))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    h.remove()
    return torch.cat(seen)


def test_expert_math_equals_the_transformers_blocks():
    m = _mixtral()
    q = _qwen_moe()
    x = torch.randn(7, 32, generator=torch.Generator().manual_seed(3))
    for model, normalize in ((m, True), (q, False)):
        block = moe_block(model.model.layers[0])
        with torch.no_grad():
            got = block(x.unsqueeze(0))[0].double()
            if hasattr(block, "shared_expert"):
                got -= (torch.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)).double()
        ref = naive_routed(block, x, list(range(block.gate.weight.shape[0])), 2, normalize)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["layerwise", "progressive"])
def test_expert_pruning_picks_the_naive_best_subset_and_reloads(tmp_path, mode):
    from transformers import AutoModelForCausalLM

    orig = _mixtral()
    path = _save(orig, tmp_path / "mixtral")
    r = 3
    res = build_method({"name": "expert_pruning", "num_preserved_experts": r, "n_samples": 2, "seq_len": 32,
                        "batch_size": 2, "mode": mode}).run(_pool(path))
    ids = _ids(2, 32)
    ref = AutoModelForCausalLM.from_pretrained(path).eval()
    for li in range(2):
        x = _moe_inputs(ref, ids, li)
        block = moe_block(ref.model.layers[li])
        full = naive_routed(block, x, list(range(6)), 2)
        losses = {s: float(((full - naive_routed(block, x, list(s), 2)) ** 2).sum().sqrt())
                  for s in itertools.combinations(range(6), r)}
        best = min(losses, key=losses.get)
        assert res.metadata["kept_experts"][str(li)] == list(best)
        if mode == "progressive":  # the next layer sees the pruned layer's outputs
            from fusion_bench.methods.compression.expert_pruning import keep_experts_

            keep_experts_(block, list(best))
    assert res.model.config.num_local_experts == r
    out = tmp_path / "pruned"
    res.model.save_pretrained(out)
    back = AutoModelForCausalLM.from_pretrained(out).eval()
    assert back.config.num_local_experts == r and back.model.layers[0].mlp.gate.weight.shape == (r, 32)
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, res.model(ids).logits)
    # the pruned block computes F_S exactly
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(9))
    kept = res.metadata["kept_experts"]["0"]
    with torch.no_grad():
        got = back.model.layers[0].mlp(x.unsqueeze(0))[0].double()
    torch.testing.assert_close(got, naive_routed(moe_block(orig.model.layers[0]), x, kept, 2), rtol=1e-4, atol=1e-5)


def test_expert_pruning_on_qwen2_moe_reloads(tmp_path):
    from transformers import AutoModelForCausalLM

    path = _save(_qwen_moe(), tmp_path / "qwen")
    res = build_method({"name": "expert_pruning", "num_preserved_experts": 3, "n_samples": 2, "seq_len": 32}).run(
        _pool(path))
    res.model.save_pretrained(tmp_path / "out")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert back.config.num_experts == 3
    ids = _ids(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, res.model(ids).logits)


def test_dynamic_skipping_betas_and_outputs(tmp_path):
    from transformers import AutoModelForCausalLM

    path = _save(_mixtral(), tmp_path / "mixtral")
    res = build_method({"name": "expert_skipping", "n_samples": 4, "seq_len": 40, "batch_size": 2}).run(_pool(path))
    ref = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = _ids()
    for li in range(2):
        x = _moe_inputs(ref, ids, li)
        p = torch.softmax((x.double() @ moe_block(ref.model.layers[li]).gate.weight.double().T), -1)
        top = torch.topk(p, 2, -1).values
        ratios = sorted((top[:, 1] / top[:, 0]).tolist())
        lower_median = ratios[(len(ratios) - 1) // 2]
        assert res.metadata["betas"][li] == pytest.approx(lower_median, rel=1e-5)
    # skipping: per token, the second expert dropped when w2 < beta w1
    block = moe_block(res.model.model.layers[0])
    beta = res.metadata["betas"][0]
    x = _moe_inputs(ref, ids[:1, :12], 0)
    with torch.no_grad():
        got = block(x.unsqueeze(0))[0].double()
    W = block.gate.weight.double()
    skipped = 0
    for t in range(x.shape[0]):
        p = torch.softmax(x[t].double() @ W.T, 0)
        w, i = torch.topk(p, 2)
        ref_t = expert_output(block, int(i[0]), x[t:t + 1])[0].double()
        if w[1] >= beta * w[0]:
            ref_t = (w[0] * ref_t + w[1] * expert_output(block, int(i[1]), x[t:t + 1])[0].double()) / w.sum()
        else:
            skipped += 1
        torch.testing.assert_close(got[t], ref_t, rtol=1e-4, atol=1e-5)
    assert 0 < skipped < x.shape[0]
    # reload: betas in the config, skipping re-enabled by enable_dynamic_skipping
    res.model.save_pretrained(tmp_path / "skip")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "skip").eval()
    assert back.config.dynamic_skipping_betas == pytest.approx(res.metadata["betas"])
    enable_dynamic_skipping(back)
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, res.model(ids).logits)


def test_expert_methods_refuse_dense_models(tmp_path):
    from fusion_bench.errors import ConfigError, ModelMismatchError
    from fusion_bench.testing.tiny_lm import save_tiny_llama_pool

    paths = save_tiny_llama_pool(tmp_path, n=0)
    with pytest.raises(ModelMismatchError, match="mixture-of-experts"):
        build_method({"name": "expert_pruning", "n_samples": 2, "seq_len": 16}).run(_pool(paths["base"]))
    path = _save(_mixtral(), tmp_path / "mixtral")
    with pytest.raises(ConfigError, match="num_preserved_experts"):
        build_method({"name": "expert_pruning", "num_preserved_experts": 1, "n_samples": 2, "seq_len": 16}).run(
            _pool(path))


def test_expert_pruning_cli_on_tiny_mixtral(tmp_path, capsys):
    import json

    from transformers import AutoModelForCausalLM

    from tests.conftest import run_cli

    path = _save(_mixtral(experts=4), tmp_path / "mixtral")
    cfg = tmp_path / "cfg"
    (cfg / "modelpool").mkdir(parents=True)
    (cfg / "modelpool" / "tiny_moe.yaml").write_text(
        "# fusion_bench --config-dir cfg method=expert_pruning modelpool=tiny_moe\n"
        f"type: causal_lm\nmodels:\n  _pretrained_: {path}\n")
    out = tmp_path / "pruned"
    report = tmp_path / "report.json"
    code, _, err = run_cli(["--config-dir", str(cfg), "method=expert_pruning", "modelpool=tiny_moe", "~taskpool",
                            "evaluate=false", "method.num_preserved_experts=2", "method.n_samples=2",
                            "method.seq_len=24", f"merged_model_path={out}", f"report_path={report}"], capsys)
    assert code == 0, err
    assert json.loads(report.read_text())["metadata"]["experts_after"] == 2
    assert AutoModelForCausalLM.from_pretrained(out).config.num_local_experts == 2
