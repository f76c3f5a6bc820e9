"""Benchmark of the streaming merge engine on a random-weight Llama-style zoo (issue 4).

    python benchmarks/streaming_merge.py ZOO_DIR                 # base + 8 variants of ~155 M params, bf16
    python benchmarks/streaming_merge.py ZOO_DIR --scale 4       # a zoo about four times larger
    python benchmarks/streaming_merge.py ZOO_DIR --methods task_arithmetic ties_merging
    python benchmarks/streaming_merge.py ZOO_DIR --methods tsv_merging iso_c wudi_merging   # any tensor-wise method

The zoo is built once into ZOO_DIR (cached: a folder with a complete ``zoo.json`` is reused) tensor
by tensor, without holding a model in memory. Each merge then runs in a fresh Python process (the
``fusion_bench mergekit`` command on a generated mergekit YAML for the methods mergekit has; any other
registered tensor-wise method through ``fusion_bench method=NAME ... engine=streaming``, with its
defaults and the Hydra overrides given by ``--option``), so the number includes interpreter
start, imports, planning, reading, merging, writing and the config/tokenizer files), and the table
shows its whole-process wall time, CPU time (user + system) and peak RSS (``os.wait4`` rusage of
that child). On a shared machine the wall time includes waiting for a CPU; the CPU time does not.
Delete ZOO_DIR
afterwards: the default zoo takes ~2.9 GB of disk, the 4x zoo ~11 GB.

Shapes (scale 1): hidden 576, 30 layers, 9 heads (3 KV heads), MLP 1536, vocabulary 49152, untied
embeddings: 162.8 M parameters (the SmolLM-135M layout plus an untied output head). Scale 4: hidden
1152, 38 layers, 18 heads (6 KV), MLP 3072: 651 M parameters.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ZOOS = {
    1: dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
            intermediate_size=1536, vocab_size=49152),
    4: dict(hidden_size=1152, num_hidden_layers=38, num_attention_heads=18, num_key_value_heads=6,
            intermediate_size=3072, vocab_size=49152),
}
N_VARIANTS = 8

METHOD_YAML = {
    "task_arithmetic": {"merge_method": "task_arithmetic", "parameters": {"weight": 0.3}},
    "ties_merging": {"merge_method": "ties", "parameters": {"weight": 0.3, "density": 0.2},
                     "global": {"normalize": False}},
    "dare_ties": {"merge_method": "dare_ties", "parameters": {"weight": 0.3, "density": 0.5},
                  "global": {"normalize": False}},
}


def llama_tensors(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = h // cfg["num_attention_heads"]
    kv = hd * cfg["num_key_value_heads"]
    out = [("model.embed_tokens.weight", (v, h))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                (p + "mlp.gate_proj.weight", (f, h)), (p + "mlp.up_proj.weight", (f, h)),
                (p + "mlp.down_proj.weight", (h, f)), (p + "input_layernorm.weight", (h,)),
                (p + "post_attention_layernorm.weight", (h,))]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return out


def build_zoo(root: Path, scale: int) -> dict[str, str]:
    """Write base + 8 variants (bf16, 2 GB shards) with the project's sharded writer."""
    import torch
    from transformers import LlamaConfig

    from fusion_bench.io.stream import ShardedWriter

    marker = root / "zoo.json"
    if marker.exists():
        return json.loads(marker.read_text())["models"]
    root.mkdir(parents=True, exist_ok=True)
    cfg = ZOOS[scale]
    tensors = llama_tensors(cfg)
    n_params = sum(torch.Size(s).numel() for _, s in tensors)
    print(f"building zoo scale {scale}: {n_params / 1e6:.1f} M parameters per model, 1 base + {N_VARIANTS} variants",
          flush=True)
    hf_cfg = LlamaConfig(**cfg, tie_word_embeddings=False, max_position_embeddings=2048, dtype="bfloat16")
    models = {}
    for m in range(N_VARIANTS + 1):
        name = "_pretrained_" if m == 0 else f"variant{m}"
        d = root / ("base" if m == 0 else name)
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        w = ShardedWriter(d, [(k, s, torch.bfloat16) for k, s in tensors], max_shard_bytes=2 * 10**9)
        for i, (k, s) in enumerate(tensors):
            g = torch.Generator().manual_seed(i)  # the base tensor, identical in every model
            t = torch.randn(s, generator=g) * 0.02 if len(s) > 1 else torch.ones(s)
            if m:
                g2 = torch.Generator().manual_seed(10_000 * m + i)
                t += torch.randn(s, generator=g2) * 0.002
            w.write(k, t.to(torch.bfloat16))
            del t
        w.finish()
        hf_cfg.save_pretrained(d)
        models[name] = str(d)
        print(f"  wrote {d}", flush=True)
    marker.write_text(json.dumps({"scale": scale, "config": cfg, "parameters": n_params, "models": models}))
    return models


def mergekit_yaml(models: dict[str, str], method: str) -> str:
    import yaml

    spec = METHOD_YAML[method]
    doc = {"merge_method": spec["merge_method"], "base_model": models["_pretrained_"], "dtype": "bfloat16",
           "models": [{"model": p, "parameters": dict(spec["parameters"])}
                      for n, p in models.items() if n != "_pretrained_"]}
    if spec.get("global"):
        doc["parameters"] = dict(spec["global"])
    return yaml.safe_dump(doc, sort_keys=False)


def native_command(models: dict[str, str], method: str, out: Path, options: list[str]) -> list[str]:
    """``fusion_bench method=NAME`` on the zoo as a causal-LM pool, merged by the streaming engine."""
    pool = [f"+modelpool.models.{n}={p}" for n, p in models.items()]
    return [sys.executable, "-m", "fusion_bench.cli", f"method={method}", "modelpool=causal_lm_merge",
            "~modelpool.models", *pool, "~taskpool", "evaluate=false", "engine=streaming",
            f"merged_model_path={out}", "overwrite=true", *options]


def run_child(cmd: list[str], env: dict[str, str]) -> tuple[float, int, int, float]:
    """Run ``cmd``; return (wall seconds, peak RSS bytes of that process, exit code, CPU seconds)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    return (wall, int(ru.ru_maxrss * (1 if sys.platform == "darwin" else 1024)), p.returncode,
            ru.ru_utime + ru.ru_stime)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("zoo_dir", type=Path, help="where the zoo is built (reused when complete)")
    ap.add_argument("--scale", type=int, default=1, choices=sorted(ZOOS))
    ap.add_argument("--methods", nargs="+", default=list(METHOD_YAML),
                    help=f"mergekit-backed: {', '.join(METHOD_YAML)}; or any registered tensor-wise method name")
    ap.add_argument("--option", action="append", default=[],
                    help="a Hydra override for the non-mergekit methods, e.g. method.scaling_factor=0.3 (repeatable)")
    ap.add_argument("--out", type=Path, default=None, help="merge output folder (default: ZOO_DIR/merged)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per method (the table shows each)")
    ap.add_argument("--warm", action="store_true", help="read every zoo file once first (warm page cache)")
    args = ap.parse_args(argv)
    models = build_zoo(args.zoo_dir, args.scale)
    info = json.loads((args.zoo_dir / "zoo.json").read_text())
    if args.warm:
        for p in models.values():
            for f in Path(p).glob("*.safetensors"):
                with open(f, "rb") as fh:
                    while fh.read(1 << 24):
                        pass
    out = args.out or (args.zoo_dir / "merged")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    rows = []
    for method in args.methods:
        if method in METHOD_YAML:
            cfg_path = args.zoo_dir / f"{method}.yaml"
            cfg_path.write_text(mergekit_yaml(models, method))
            cmd = [sys.executable, "-m", "fusion_bench.cli", "mergekit", str(cfg_path), str(out), "--overwrite"]
        else:
            cmd = native_command(models, method, out, args.option)
        for _ in range(args.repeat):
            wall, rss, rc, cpu = run_child(cmd, env)
            rows.append((method, wall, rss, rc, cpu))
    print()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"zoo scale {args.scale}: {info['parameters'] / 1e6:.1f} M parameters x (1 base + {N_VARIANTS}), bf16, "
          f"{os.cpu_count()} CPUs visible, load average {load:.1f} at the end")
    print(f"{'method':<18}{'wall s':>9}{'CPU s':>9}{'peak RSS MiB':>15}{'exit':>6}")
    for method, wall, rss, rc, cpu in rows:
        print(f"{method:<18}{wall:>9.2f}{cpu:>9.2f}{rss / 2**20:>15.1f}{rc:>6}")
    if out.exists():
        shutil.rmtree(out)
    return 0 if all(r[3] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
