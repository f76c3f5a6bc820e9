"""Untrusted inputs: configs are data (nothing named in a config is imported or called unless it is on
the model-class allow-list) and checkpoint readers are strict (every malformed file is a one-line
CheckpointError naming the model, the file and the tensor, raised before any tensor byte is used)."""

import json
import struct
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from fusion_bench.errors import CheckpointError, ConfigError, RegistryError
from fusion_bench.io.checkpoint import SafetensorsSource, TorchFileSource, open_checkpoint
from fusion_bench.io.stream import StreamReader
from fusion_bench.modelpool import ModelPool
from fusion_bench.modelpool.base import resolve_model_class
from fusion_bench.models.registry import list_model_classes, register_model_class, unregister_model_class
from tests.conftest import make_toy, run_cli


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """A config folder with a state-dict pool of nn.Linear(4, 6) weights and a parameter-count task pool."""
    monkeypatch.chdir(tmp_path)
    return make_toy(tmp_path, "ab", prefix="")


def one_line(msg: str) -> str:
    assert "\n" not in msg.strip(), msg
    return msg





# ------------------------------------------------------------------------------------------------
# A. configs are data
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dry_run", [True, False])
def test_architecture_class_cannot_run_code(toy, capsys, dry_run):
    marker = toy["root"] / "marker"
    args = ["--config-dir", toy["cfg"], "modelpool=toy", "taskpool=count",
            f'+modelpool.architecture={{class:os.system,kwargs:{{command:"touch {marker}"}}}}']
    if dry_run:
        args.append("dry_run=true")
    code, out, err = run_cli(args, capsys)
    assert code == 2
    assert not marker.exists()
    line = one_line(err.strip())
    assert "modelpool.architecture.class='os.system'" in line and "register_model_class" in line


@pytest.mark.parametrize("value", ["os.system", "builtins.eval", "subprocess.Popen", "transformersevil.Model",
                                   "torch.nnx.Linear", "transformers..CLIPModel"])
def test_model_class_off_the_allow_list(toy, capsys, value):
    code, out, err = run_cli(["--config-dir", toy["cfg"], "modelpool=toy", "taskpool=count", "dry_run=true",
                              f"+modelpool.model_class={value}"], capsys)
    assert code == 2
    line = one_line(err.strip())
    assert f"modelpool.model_class='{value}'" in line and "register_model_class" in line


def test_prefix_checked_before_import(tmp_path, monkeypatch):
    """A module that acts on import is never imported: the allow-list is checked on the name first."""
    marker = tmp_path / "imported"
    (tmp_path / "evil_mod_fb.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass Net: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sd = {"w": torch.zeros(2)}
    with pytest.raises(ConfigError, match=r"modelpool.architecture.class='evil_mod_fb.Net'"):
        ModelPool({"a": sd}, architecture={"class": "evil_mod_fb.Net"})
    with pytest.raises(ConfigError, match=r"modelpool.model_class='evil_mod_fb.Net'"):
        ModelPool({"a": sd}, model_class="evil_mod_fb.Net")
    assert not marker.exists() and "evil_mod_fb" not in sys.modules


@pytest.mark.parametrize("arch, needle", [
    ({"class": "torch.nn.functional.relu"}, "is not a class"),
    ({"class": "transformers.AutoModel"}, "is not an nn.Module class"),
    ({"class": "transformers.pipeline"}, "is not a class"),
    ({"class": "torch.nn.Linear", "kwargs": {"in_features": 4, "out_features": object()}},
     "modelpool.architecture.kwargs.out_features is of type object"),
    ({"class": "torch.nn.Linear", "kwargs": {"x": [1, {"y": print}]}}, "modelpool.architecture.kwargs.x[1].y"),
    ({"class": "torch.nn.Linear", "kwargs": "in_features=4"}, "modelpool.architecture.kwargs must be a mapping"),
    ({"class": "os.system", "args": []}, "Unknown key(s) ['args']"),
])
def test_architecture_refusals(arch, needle):
    with pytest.raises(ConfigError) as ei:
        ModelPool({"a": {"weight": torch.zeros(6, 4)}}, architecture=arch).build_architecture()
    assert needle in one_line(str(ei.value))


def test_model_class_must_load_checkpoints():
    with pytest.raises(ConfigError, match="has no from_pretrained"):
        resolve_model_class("torch.nn.Linear")
    with pytest.raises(ConfigError, match="is not a class"):
        resolve_model_class("transformers.pipeline")


def test_transformers_classes_still_allowed():
    import transformers

    assert resolve_model_class("clip_vision") is transformers.CLIPVisionModel
    assert resolve_model_class("transformers.CLIPVisionModel") is transformers.CLIPVisionModel
    assert resolve_model_class("transformers.AutoModelForCausalLM") is transformers.AutoModelForCausalLM
    cls = resolve_model_class("transformers.models.bert.modeling_bert.BertModel")
    assert cls is transformers.BertModel


def test_torch_nn_architecture_merges(toy):
    from fusion_bench.programs.fusion import run_program

    m = toy["models"]
    out = toy["root"] / "merged.safetensors"
    rep = run_program({"method": {"name": "simple_average"},
                       "modelpool": {"models": {"_pretrained_": str(m / "base.safetensors"), "a": str(m / "a.safetensors"),
                                                "b": str(m / "b.safetensors")},
                                     "architecture": {"class": "torch.nn.Linear",
                                                      "kwargs": {"in_features": 4, "out_features": 6}}},
                       "merged_model_path": str(out), "print_table": False}, log=lambda *a: None)
    assert rep["merged_model_path"] == str(out) and out.exists()


class _UserNet(nn.Module):
    def __init__(self, d_in: int = 4, d_out: int = 6):
        super().__init__()
        self.lin = nn.Linear(d_in, d_out)


def test_user_registered_class(toy, capsys):
    """A class registered from Python is named in a config by its name or dotted path."""
    register_model_class("trust_test_usernet", _UserNet)
    try:
        assert "trust_test_usernet" in list_model_classes() and "TinyNet" in list_model_classes()
        register_model_class("trust_test_usernet", _UserNet)  # the same class again is fine
        with pytest.raises(RegistryError, match="already registered"):
            register_model_class("trust_test_usernet", nn.Linear)
        sd = {"lin.weight": torch.ones(6, 4), "lin.bias": torch.zeros(6)}
        for ref in ("trust_test_usernet", f"{__name__}._UserNet"):
            pool = ModelPool({"_pretrained_": sd, "a": sd}, architecture={"class": ref, "kwargs": {"d_in": 4}})
            model = pool.load_model("a")
            assert isinstance(model, _UserNet) and torch.equal(model.lin.weight, torch.ones(6, 4))
        # also from the command line (the toy files hold 'weight'/'bias', so the names do not fit: a
        # ModelMismatchError, which proves the class was resolved and built)
        code, out, err = run_cli(["--config-dir", toy["cfg"], "modelpool=toy", "taskpool=count",
                                  "+modelpool.architecture={class:trust_test_usernet}", "method=simple_average",
                                  "merged_model_path=m.safetensors"], capsys)
        assert code == 2 and "does not fit modelpool.architecture trust_test_usernet" in err
    finally:
        unregister_model_class("trust_test_usernet")


def test_register_model_class_as_decorator():
    @register_model_class
    class TrustTestDecorated(nn.Module):
        pass

    @register_model_class("trust_test_named")
    class TrustTestNamed(nn.Module):
        pass

    try:
        assert {"TrustTestDecorated", "trust_test_named"} <= set(list_model_classes())
        assert isinstance(ModelPool({"a": {"x": torch.zeros(1)}},
                                    architecture={"class": "trust_test_named"}).build_architecture(), TrustTestNamed)
    finally:
        unregister_model_class("TrustTestDecorated")
        unregister_model_class("trust_test_named")


def test_trust_remote_code_off_by_default(tmp_path):
    from fusion_bench.data import load_dataset_ref

    with pytest.raises(ConfigError, match="trust_remote_code .* must be true or false"):
        load_dataset_ref({"path": str(tmp_path), "trust_remote_code": "yes"})
    assert ModelPool({"a": {"x": torch.zeros(1)}}).config.trust_remote_code is False


def test_no_trust_remote_code_true_in_package():
    """Nothing in the package turns trust_remote_code on by itself."""
    import re

    root = Path(__file__).resolve().parents[1] / "fusion_bench"
    bad = [f"{p}:{i}" for p in root.rglob("*.py") for i, line in enumerate(p.read_text().splitlines(), 1)
           if re.search(r"trust_remote_code\s*=\s*True", line)
           or (re.search(r"[\"']trust_remote_code[\"']\s*:\s*True", line)
               and "if self.config.trust_remote_code" not in line)]
    assert not bad, bad


# ------------------------------------------------------------------------------------------------
# B. strict safetensors headers (our reader vs the safetensors library)
# ------------------------------------------------------------------------------------------------
def _write(path: Path, header: bytes, data: bytes, n: int | None = None) -> Path:
    path.write_bytes(struct.pack("<Q", len(header) if n is None else n) + header + data)
    return path


def _h(d) -> bytes:
    return json.dumps(d).encode()


def _e(dtype, shape, offs):
    return {"dtype": dtype, "shape": shape, "data_offsets": offs}


# name -> (header bytes, data bytes, header length override, expected text, tensor named, library refuses)
CASES = {
    "overlap": (_h({"a": _e("F32", [4], [0, 16]), "b": _e("F32", [4], [8, 24])}), bytes(24), None,
                "overlaps the previous tensor", "b", True),
    "hole": (_h({"a": _e("F32", [2], [0, 8]), "b": _e("F32", [4], [16, 32])}), bytes(32), None,
             "leaves a hole of 8 bytes", "b", True),
    "trailing": (_h({"a": _e("F32", [4], [0, 16])}), bytes(32), None, "(trailing bytes)", None, True),
    "truncated": (_h({"a": _e("F32", [4], [0, 16])}), bytes(10), None, "(truncated)", None, True),
    "bad_dtype": (_h({"a": _e("F33", [4], [0, 16])}), bytes(16), None, "unsupported dtype 'F33'", "a", True),
    "wrong_size": (_h({"a": _e("F32", [3], [0, 16])}), bytes(16), None, "hold 16 bytes but shape [3] of F32 needs 12",
                   "a", True),
    "negative_shape": (_h({"a": _e("F32", [-4], [0, 16])}), bytes(16), None, "not a list of non-negative integers",
                       "a", True),
    "float_shape": (_h({"a": _e("F32", [4.0], [0, 16])}), bytes(16), None, "not a list of non-negative integers",
                    "a", True),
    "begin_after_end": (_h({"a": _e("F32", [0], [16, 0])}), bytes(16), None, "begin after they end", "a", True),
    "duplicate_keys": (b'{"a": {"dtype":"F32","shape":[4],"data_offsets":[0,16]}, '
                       b'"a": {"dtype":"F32","shape":[4],"data_offsets":[0,16]}}', bytes(16), None,
                       "names 'a' twice", None, False),  # the library keeps the last: a silent choice
    "extra_field": (_h({"a": {**_e("F32", [4], [0, 16]), "x": 1}}), bytes(16), None,
                    "exactly dtype, shape, data_offsets", "a", False),
    "non_utf8": (b'{"a\xff": {"dtype":"F32","shape":[4],"data_offsets":[0,16]}}', bytes(16), None, "not UTF-8",
                 None, True),
    "not_json": (b'{"a": {"dtype":"F32",', bytes(16), None, "not valid JSON", None, True),
    "not_object": (b"[1, 2]", b"", None, "JSON list, not an object", None, True),
    "metadata_not_str": (_h({"__metadata__": {"x": 1}, "a": _e("F32", [4], [0, 16])}), bytes(16), None,
                         "__metadata__ must map strings to strings", None, True),
    "header_too_long": (_h({"a": _e("F32", [4], [0, 16])}), bytes(16), 10_000,
                        "runs past the end of the", None, True),
    "header_too_large": (_h({"a": _e("F32", [4], [0, 16])}), bytes(16), 2**40, "out of bounds", None, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_safetensors_header_strict(tmp_path, case):
    header, data, n, needle, tensor, library_refuses = CASES[case]
    f = _write(tmp_path / f"{case}.safetensors", header, data, n)
    for reader in (StreamReader, SafetensorsSource):
        with pytest.raises(CheckpointError) as ei:
            reader(f, "m1")
        msg = one_line(str(ei.value))
        assert msg.startswith("Model 'm1': invalid safetensors file") and str(f) in msg, msg
        assert needle in msg and "Re-download or re-save that file." in msg, msg
        if tensor is not None:
            assert f"tensor '{tensor}'" in msg, msg
    if library_refuses:  # parity with the safetensors library
        with pytest.raises(Exception):  # noqa: B017 - SafetensorError
            with safe_open(str(f), "pt") as h:
                [h.get_tensor(k) for k in h.keys()]
    else:  # the library accepts it; we refuse what it would silently read differently
        with safe_open(str(f), "pt") as h:
            list(h.keys())


def test_short_file(tmp_path):
    f = tmp_path / "short.safetensors"
    f.write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match="too short for the 8-byte header length"):
        StreamReader(f, "m1")
    with pytest.raises(Exception):  # noqa: B017
        safe_open(str(f), "pt")


def test_valid_files_still_read(tmp_path):
    """Files the library writes (including zero-size tensors, reversed header order, null metadata) read."""
    t = {"a": torch.arange(4.0), "empty": torch.zeros(0), "b": torch.ones(2, 3, dtype=torch.bfloat16)}
    save_file(t, tmp_path / "ok.safetensors", metadata={"format": "pt"})
    r = StreamReader(tmp_path / "ok.safetensors", "ok")
    s = SafetensorsSource(tmp_path / "ok.safetensors", "ok")
    for k, v in t.items():
        assert torch.equal(r.read(k), v) and torch.equal(s.get(k), v)
    f = _write(tmp_path / "rev.safetensors", _h({"__metadata__": None, "b": _e("F32", [4], [16, 32]),
                                                  "a": _e("F32", [4], [0, 16])}), bytes(32))
    assert StreamReader(f, "x").keys() == ["a", "b"] == SafetensorsSource(f, "x").keys()


# ------------------------------------------------------------------------------------------------
# B. every read failure is one line naming the model and file
# ------------------------------------------------------------------------------------------------
def test_truncated_file_in_memory_engine(toy, capsys):
    f = toy["models"] / "a.safetensors"
    f.write_bytes(f.read_bytes()[:-7])
    code, out, err = run_cli(["--config-dir", toy["cfg"], "modelpool=toy", "taskpool=count", "engine=memory",
                              "method=simple_average"], capsys)
    assert code == 2
    line = one_line(err.strip())
    assert "Model 'a'" in line and str(f) in line and "(truncated)" in line and "Re-download" in line


@pytest.mark.parametrize("index", ["model.safetensors.index.json", "pytorch_model.bin.index.json"])
@pytest.mark.parametrize("content, needle", [
    (b"not json {", "is not valid JSON"),
    (b'{"metadata": {}}', "has no 'weight_map' object"),
    (b'{"weight_map": {"w": "../../etc/passwd"}}', "not a shard file name in that folder"),
    (b'{"weight_map": {"w": "missing.bin"}}', "does not exist"),
    (b"[" * 100_000, "nested too deeply"),
])
def test_bad_shard_index(tmp_path, index, content, needle):
    folder = tmp_path / "sharded"
    folder.mkdir()
    if index.startswith("model.safetensors"):
        save_file({"w": torch.zeros(2)}, folder / "model-00001-of-00001.safetensors")
        readers = (open_checkpoint, StreamReader)
    else:
        torch.save({"w": torch.zeros(2)}, folder / "pytorch_model-00001-of-00001.bin")
        readers = (open_checkpoint,)
    (folder / index).write_bytes(content)
    for reader in readers:
        with pytest.raises(CheckpointError) as ei:
            reader(folder, "sharded_model")
        msg = one_line(str(ei.value))
        assert "Model 'sharded_model'" in msg and index in msg and needle in msg, msg


class _Boom:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("kind", ["garbage", "pickle_code", "not_tensors"])
def test_unreadable_bin(tmp_path, kind):
    f = tmp_path / "model.bin"
    marker = tmp_path / "marker"
    if kind == "garbage":
        f.write_bytes(b"\x00garbage" * 10)
    elif kind == "pickle_code":
        torch.save({"w": torch.zeros(2), "x": _Boom(marker)}, f)
    else:
        torch.save({"w": [1, 2]}, f)
    with pytest.raises(CheckpointError) as ei:
        TorchFileSource(f, "binmodel")
    msg = one_line(str(ei.value))
    assert "Model 'binmodel'" in msg and str(f) in msg and "re-save" in msg.lower(), msg
    assert not marker.exists()
    if kind == "pickle_code":
        assert "unpickling them could run code" in msg and "weights_only` set to `False`" not in msg


def test_legacy_bin_format_still_loads(tmp_path):
    f = tmp_path / "legacy.bin"
    torch.save({"w": torch.arange(3.0)}, f, _use_new_zipfile_serialization=False)
    assert torch.equal(TorchFileSource(f, "old").get("w"), torch.arange(3.0))


def _hf_folder(root: Path, name: str, config: bytes) -> Path:
    d = root / name
    d.mkdir()
    (d / "config.json").write_bytes(config)
    save_file({"w": torch.zeros(2)}, d / "model.safetensors")
    return d


@pytest.mark.parametrize("config, needle", [
    (b'{"model_type": "bert\xff"}', "is not UTF-8"),
    (b'{"model_type": ', "is not valid JSON"),
    (b'["bert"]', "holds a JSON list, not an object"),
    (b'{"a": ' * 50_000 + b"1" + b"}" * 50_000, "nested too deeply"),
])
def test_bad_config_json(tmp_path, config, needle):
    good = _hf_folder(tmp_path, "good", b'{"model_type": "bert"}')
    bad = _hf_folder(tmp_path, "bad", config)
    pool = ModelPool({"_pretrained_": str(good), "ft": str(bad)}, model_class="auto")
    with pytest.raises(CheckpointError) as ei:
        pool.check_architectures()
    msg = one_line(str(ei.value))
    assert "Model 'ft'" in msg and str(bad / "config.json") in msg and needle in msg, msg


def test_bad_config_json_causal_lm_tokenizer(tmp_path):
    from fusion_bench.modelpool.causal_lm import CausalLMPool

    d = _hf_folder(tmp_path, "lm", b'{"model_type": "llama"}')
    (d / "tokenizer.json").write_bytes(b"\xff\xfe")
    pool = CausalLMPool({"_pretrained_": str(d)})
    with pytest.raises(CheckpointError) as ei:
        pool._tokenizer_vocab("_pretrained_")
    msg = one_line(str(ei.value))
    assert "Model '_pretrained_'" in msg and "tokenizer.json" in msg and "not UTF-8" in msg
