"""``fusion_bench extract-lora`` (mergekit-extract-lora semantics) on tiny Llama / Qwen2 checkpoints.

A fine-tune is built as base + a delta of known rank R on every linear layer (plus changed norms and
embeddings). Extraction at rank >= R gives the fine-tune back through PEFT (``PeftModel`` +
``merge_and_unload``); at rank k < R the error of each linear layer is the tail of its singular values
(Eckart-Young), computed here independently with ``torch.linalg.svd``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.test_streaming_helpers import make_model, tiny_config

peft = pytest.importorskip("peft")

R = 3
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _zoo(root: Path, family: str = "llama", rank: int = R, dtype: torch.dtype = torch.float32):
    """base and a fine-tune whose linear deltas have rank ``rank``; returns (base dir, ft dir, ft state dict)."""
    cfg = tiny_config(family, 96)
    base = make_model(cfg, 0, dtype)
    base.save_pretrained(root / "base")
    g = torch.Generator().manual_seed(7)
    sd = {}
    for k, t in base.state_dict().items():
        if k.endswith(".weight") and k.split(".")[-2] in LINEAR:
            out, inp = t.shape
            d = (torch.randn(out, rank, generator=g) @ torch.randn(rank, inp, generator=g)) * 0.05
        else:  # embeddings, norms, lm_head, biases: any change
            d = 0.02 * torch.randn(t.shape, generator=g)
        sd[k] = (t.float() + d).to(dtype)
    ft = make_model(cfg, 0, dtype)
    ft.load_state_dict(sd)
    ft.save_pretrained(root / "ft")
    return str(root / "base"), str(root / "ft"), {k: v.clone() for k, v in ft.state_dict().items()}


def _applied(base_dir: str, adapter: str) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
    merged = peft.PeftModel.from_pretrained(base, adapter).merge_and_unload()
    return {k: v.detach() for k, v in merged.state_dict().items()}


def _run(argv: list[str]) -> int:
    from fusion_bench.compat.lora_extract import main

    return main(argv)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_rank_at_least_r_reconstructs_the_fine_tune(tmp_path, family):
    base, ft, ft_sd = _zoo(tmp_path, family)
    out = tmp_path / "lora"
    assert _run(["--model", ft, "--base-model", base, "--out-path", str(out), "--max-rank", str(R + 2)]) == 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == R + 2 and cfg["lora_alpha"] == R + 2
    # embeddings, lm_head and norms are saved whole (mergekit's default)
    assert "model.embed_tokens" in cfg["modules_to_save"] and "lm_head" in cfg["modules_to_save"]
    assert "model.norm" in cfg["modules_to_save"] and "model.layers.0.input_layernorm" in cfg["modules_to_save"]
    assert cfg["lora_bias"] is False
    if family == "qwen2":  # changed q/k/v biases among unbiased targets: those modules are saved whole
        assert "model.layers.0.self_attn.q_proj" in cfg["modules_to_save"]
        assert "model.layers.0.self_attn.q_proj" not in cfg["target_modules"]
    got = _applied(base, str(out))
    assert set(got) == set(ft_sd)
    for k, v in ft_sd.items():
        torch.testing.assert_close(got[k], v, atol=2e-5, rtol=1e-5, msg=k)


@pytest.mark.parametrize("distribute", [True, False])
def test_lower_rank_error_is_the_tail_of_singular_values(tmp_path, distribute):
    base, ft, ft_sd = _zoo(tmp_path, rank=6)
    from tests.test_streaming_helpers import load_sd

    base_sd = load_sd(base)
    k = 2
    out = tmp_path / "lora"
    argv = ["--model", ft, "--base-model", base, "--out-path", str(out), "--max-rank", str(k)]
    _run(argv + ([] if distribute else ["--no-distribute-scale"]))
    got = _applied(base, str(out))
    n = 0
    for name, w in ft_sd.items():
        if not (name.endswith(".weight") and name.split(".")[-2] in LINEAR):
            torch.testing.assert_close(got[name], w, msg=name)  # saved whole
            continue
        s = torch.linalg.svd((w - base_sd[name]).double()).S
        err = (got[name].double() - w.double())
        frob = float(err.norm())
        assert frob == pytest.approx(float(s[k:].pow(2).sum().sqrt()), rel=1e-4, abs=1e-6), name
        assert float(torch.linalg.matrix_norm(err, ord=2)) == pytest.approx(float(s[k]), rel=1e-4), name
        n += 1
    assert n == 2 * len(LINEAR)


def test_factors_and_sv_epsilon(tmp_path):
    from safetensors.torch import load_file

    from fusion_bench.compat.lora_extract import decompose

    g = torch.Generator().manual_seed(0)
    d = torch.randn(10, 3, generator=g) @ torch.randn(3, 8, generator=g)
    s = torch.linalg.svd(d).S
    a, b = decompose(d, max_rank=8)
    assert a.shape == (8, 8) and b.shape == (10, 8)
    torch.testing.assert_close(b @ a, d, atol=1e-5, rtol=1e-5)
    a, b = decompose(d, max_rank=8, sv_epsilon=float(s[1]) * 0.999)  # keeps s_0, s_1
    assert a.shape[0] == 2
    a, b = decompose(d, max_rank=8, distribute_scale=False)
    torch.testing.assert_close(b.T @ b, torch.eye(8), atol=1e-5, rtol=1e-5)  # B = U: orthonormal columns

    base, ft, _ = _zoo(tmp_path)
    out = tmp_path / "lora"
    _run(["--model", ft, "--base-model", base, "--out-path", str(out), "--max-rank", "16", "--sv-epsilon", "1e-4"])
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == R and cfg["rank_pattern"] == {}  # the delta has rank R: the rest is float noise
    t = load_file(str(out / "adapter_model.safetensors"))
    assert t["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (R, 32)


def test_module_selection_options(tmp_path):
    from safetensors.torch import load_file

    base, ft, ft_sd = _zoo(tmp_path)
    out = tmp_path / "a"
    _run(["--model", ft, "--base-model", base, "--out-path", str(out), "--max-rank", "4",
          "-i", r"self_attn", "-e", r"layers\.1\.", "--skip-undecomposable", "--embed-lora"])
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == sorted(f"model.layers.0.self_attn.{p}"
                                                   for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
    assert cfg["modules_to_save"] is None  # embeddings not selected by -i, norms skipped
    out2 = tmp_path / "b"
    _run(["--model", ft, "--base-model", base, "--out-path", str(out2), "--max-rank", "4", "--embed-lora",
          "--save-module", "down_proj", "--skip-undecomposable"])
    cfg = json.loads((out2 / "adapter_config.json").read_text())
    assert "model.embed_tokens" in cfg["target_modules"] and "lm_head" in cfg["target_modules"]
    assert cfg["modules_to_save"] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    t = load_file(str(out2 / "adapter_model.safetensors"))
    assert t["base_model.model.model.embed_tokens.lora_embedding_A"].shape == (4, 96)
    assert t["base_model.model.model.embed_tokens.lora_embedding_B"].shape == (32, 4)
    got = _applied(base, str(out2))
    # embedding delta is full rank here: its LoRA is the best rank-4 approximation of the (transposed) delta
    from tests.test_streaming_helpers import load_sd

    name = "model.embed_tokens.weight"
    s = torch.linalg.svd((ft_sd[name] - load_sd(base)[name]).double()).S
    assert float((got[name] - ft_sd[name]).double().norm()) == pytest.approx(float(s[4:].pow(2).sum().sqrt()),
                                                                               rel=1e-4)
    torch.testing.assert_close(got["model.layers.1.mlp.down_proj.weight"], ft_sd["model.layers.1.mlp.down_proj.weight"])


def test_output_guards_and_one_line_errors(tmp_path, capsys):
    from fusion_bench.errors import ConfigError, FusionBenchError

    base, ft, _ = _zoo(tmp_path)
    out = tmp_path / "lora"
    argv = ["--model", ft, "--base-model", base, "--out-path", str(out), "--max-rank", "4"]
    _run(argv)
    with pytest.raises(FusionBenchError, match="overwrite"):
        _run(argv)
    assert _run(argv + ["--overwrite"]) == 0
    (tmp_path / "mine").mkdir()
    with pytest.raises(FusionBenchError):
        _run(["--model", ft, "--base-model", base, "--out-path", str(tmp_path / "mine"), "--overwrite"])
    with pytest.raises(FusionBenchError):  # an input is never an output
        _run(["--model", ft, "--base-model", base, "--out-path", ft, "--overwrite"])
    with pytest.raises(ConfigError, match="max-rank"):
        _run(["--model", ft, "--base-model", base, "--out-path", str(tmp_path / "x"), "--max-rank", "0"])
    with pytest.raises(ConfigError, match="model\\+lora"):
        _run(["--model", f"{ft}+{tmp_path}/nope", "--base-model", base, "--out-path", str(tmp_path / "x")])
    with pytest.raises(FusionBenchError, match="config.json"):
        _run(["--model", str(tmp_path / "mine"), "--base-model", base, "--out-path", str(tmp_path / "x")])
    with pytest.raises(ConfigError, match="nothing to extract"):
        _run(["--model", ft, "--base-model", base, "--out-path", str(tmp_path / "x"), "-i", "nomatch",
              "-e", "embed|lm_head"])
    assert not (tmp_path / "x").exists()


def test_cli_registered(tmp_path, capsys):
    from fusion_bench import cli

    assert cli.SUBCOMMANDS["extract-lora"] == "fusion_bench.compat.lora_extract:main"
    base, ft, _ = _zoo(tmp_path)
    with pytest.raises(SystemExit) as e:
        cli.main(["extract-lora", "--model", ft, "--base-model", base, "--out-path", str(tmp_path / "o"),
                  "--max-rank", "2"])
    assert e.value.code == 0
    assert "LoRA adapter (r = 2" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        cli.main(["extract-lora", "--model", ft, "--base-model", base, "--out-path", str(tmp_path / "o")])
    assert e.value.code != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--overwrite" in err


def test_lora_bias_when_every_target_has_a_bias(tmp_path):
    base, ft, ft_sd = _zoo(tmp_path, "qwen2")
    out = tmp_path / "lora"
    _run(["--model", ft, "--base-model", base, "--out-path", str(out), "--max-rank", str(R),
          "-i", r"(q|k|v)_proj", "--skip-undecomposable"])
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["lora_bias"] is True and len(cfg["target_modules"]) == 6
    got = _applied(base, str(out))
    for k in ("model.layers.1.self_attn.k_proj.weight", "model.layers.1.self_attn.k_proj.bias"):
        torch.testing.assert_close(got[k], ft_sd[k], atol=2e-5, rtol=1e-5)
