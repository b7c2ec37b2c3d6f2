"""Nothing leaked, nothing executed:

* `trust_remote_code` reaches `from_pretrained` as False unless the config asks for it;
* nothing in the package unpickles: every `torch.load` passes `weights_only=True` (checked on the AST of
  every module), and the score cache reads safetensors only, so a pickle planted in the cache runs nothing;
* with fake WANDB_API_KEY / HF_TOKEN / ... in the environment, no file of a run (manifest, tables, the
  offline W&B run with its config, summary and artifacts) contains any of those values.
"""

from __future__ import annotations

import ast
import os
import pickle
import random
from pathlib import Path

import pytest
import torch

import superweight
from superweight.arguments import parse_config
from superweight.run.cache import ScoreCache
from superweight.commands.run import make_experiment, run_experiment
from superweight.config import ModelConfig
from superweight.inputs.models import load_model

PKG = Path(superweight.__file__).parent
FAKE_SECRETS = {
    "WANDB_API_KEY": "fakewandbkey" + "0123456789abcdef" * 2 + "zz",  # 42 chars, shaped like a real key
    "HF_TOKEN": "hf_fakeHFtoken0123456789ABCDEFGHIJ",
    "HUGGING_FACE_HUB_TOKEN": "hf_fakeHubToken9876543210abcdefghij",
    "AWS_SECRET_ACCESS_KEY": "fakeAWSsecret/0123456789+abcdefXYZ",
    "OPENAI_API_KEY": "sk-fakeOpenAIkey0123456789abcdef",
}


# ---- trust_remote_code -----------------------------------------------------------------------------------

@pytest.fixture
def spy_from_pretrained(monkeypatch):
    import transformers

    calls = []
    for cls_name in ("AutoModelForCausalLM", "AutoTokenizer", "AutoConfig"):
        cls = getattr(transformers, cls_name)
        orig = cls.from_pretrained.__func__

        def spy(cls_, *a, _orig=orig, _name=cls_name, **kw):
            calls.append((_name, kw.get("trust_remote_code", "<absent: library default False>")))
            return _orig(cls_, *a, **kw)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    return calls


pytestmark = pytest.mark.usefixtures("one_thread")


def test_trust_remote_code_false_by_default(tiny_model_dir, spy_from_pretrained):
    assert parse_config([]).model.trust_remote_code is False
    load_model(ModelConfig(name=str(tiny_model_dir), device="cpu"))
    names = {n for n, _ in spy_from_pretrained}
    assert {"AutoModelForCausalLM", "AutoTokenizer"} <= names
    assert all(v is False or v == "<absent: library default False>" for _, v in spy_from_pretrained), spy_from_pretrained
    assert ("AutoModelForCausalLM", False) in spy_from_pretrained  # passed explicitly, not left to chance


def test_trust_remote_code_only_when_asked(tiny_model_dir, spy_from_pretrained):
    cfg = parse_config([f"model={tiny_model_dir}", "model.trust_remote_code=true"])
    assert cfg.model.trust_remote_code is True
    load_model(cfg.model)
    assert ("AutoModelForCausalLM", True) in spy_from_pretrained and ("AutoTokenizer", True) in spy_from_pretrained


def test_no_module_sets_trust_remote_code_itself():
    """Only the config decides: no `trust_remote_code=True` literal anywhere in the package."""
    for py in sorted(PKG.rglob("*.py")):
        for node in ast.walk(ast.parse(py.read_text(), str(py))):
            if isinstance(node, ast.keyword) and node.arg == "trust_remote_code":
                assert not (isinstance(node.value, ast.Constant) and node.value.value is True), f"{py}:{node.lineno}"


# ---- no unpickling ---------------------------------------------------------------------------------------

def _unsafe_loads(tree: ast.AST) -> list[str]:
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            bad += [f"import {m}" for m in mods if m.split(".")[0] in ("pickle", "dill", "cloudpickle", "joblib", "shelve")]
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
        owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else ""
        kw = {k.arg: k.value for k in node.keywords}
        if name == "load" and owner == "torch":
            wo = kw.get("weights_only")
            if not (isinstance(wo, ast.Constant) and wo.value is True):
                bad.append(f"torch.load without weights_only=True at line {node.lineno}")
        if name == "load" and owner in ("np", "numpy"):
            ap = kw.get("allow_pickle")
            if isinstance(ap, ast.Constant) and ap.value is True:
                bad.append(f"np.load(allow_pickle=True) at line {node.lineno}")
        if name in ("read_pickle", "loads") and owner in ("pd", "pandas", "pickle", "marshal"):
            bad.append(f"{owner}.{name} at line {node.lineno}")
    return bad


def test_checker_catches_unsafe_loads():
    src = "import torch, pickle\nx = torch.load('f')\ny = torch.load('f', weights_only=False)\nz = torch.load('f', weights_only=True)\n"
    assert len(_unsafe_loads(ast.parse(src))) == 3  # the import and two unsafe loads; the safe one passes


def test_package_never_unpickles():
    found = {str(py.relative_to(PKG)): b for py in sorted(PKG.rglob("*.py")) if (b := _unsafe_loads(ast.parse(py.read_text())))}
    assert found == {}


class _Planted:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['SW_PLANTED_SENTINEL']}",))


def test_planted_pickle_in_score_cache_is_never_executed(tmp_path, monkeypatch):
    sentinel = tmp_path / "pwned"
    monkeypatch.setenv("SW_PLANTED_SENTINEL", str(sentinel))
    cache = ScoreCache(tmp_path / "cache", "full")  # the full form stores what put() is given
    key = "0" * 32
    cache.path(key).parent.mkdir(parents=True)
    cache.path(key).write_bytes(pickle.dumps(_Planted()))
    import torch

    torch.save(_Planted(), cache.path("1" * 32))  # what a naive torch.load would run
    assert cache.get(key) is None and cache.get("1" * 32) is None  # unreadable: recomputed, not executed
    assert not sentinel.exists()
    # and the real thing round-trips through safetensors
    cache.put("2" * 32, {"w": torch.arange(6.0).reshape(2, 3)})
    assert cache.path("2" * 32).read_bytes()[8:9] == b"{"  # safetensors: 8-byte length, then a JSON header
    assert cache.get("2" * 32)["w"].equal(torch.arange(6.0).reshape(2, 3))


# ---- no secrets in outputs -------------------------------------------------------------------------------

def test_no_secret_from_the_environment_in_any_output(tiny_model_dir, tmp_path, monkeypatch):
    for k, v in FAKE_SECRETS.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    rng = random.Random(2)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(["alpha", "beta", "gamma", "delta", "the", "a", "of"])
                                         for _ in range(25)) for _ in range(40)) + "\n")
    out = tmp_path / "out"
    cfg = parse_config([f"model={tiny_model_dir}", f"corpus={corpus}", "metric=magnitude,grad_x_weight", "seeds=0",
                        "topk=1,3", "controls=random_k", "data.seq_len=16", "data.eval_windows=2",
                        "data.calib_windows=1", "wandb.mode=offline", "wandb.project=sectest", "plots=none",
                        f"out_dir={out}", f"cache_dir={tmp_path / 'cache'}"])
    run_experiment(make_experiment(cfg, progress=False))
    files = [p for p in out.rglob("*") if p.is_file()]
    wandb_files = [p for p in files if "wandb" in p.relative_to(out).parts[0]]
    run_records = [p for p in wandb_files if p.suffix == ".wandb"]
    assert run_records, f"no offline W&B run under {out}: {[str(p.relative_to(out)) for p in files]}"
    # the run record really holds the config (so the check below is not vacuous)
    assert str(corpus).encode() in run_records[0].read_bytes() and b"grad_x_weight" in run_records[0].read_bytes()
    assert (out / "manifest.json").exists() and len(files) >= 8
    leaks = []
    for p in files:
        data = p.read_bytes()
        for k, v in FAKE_SECRETS.items():
            if v.encode() in data or v[4:-4].encode() in data:
                leaks.append(f"{p.relative_to(out)} contains {k}")
    assert leaks == []
    # the cache and the working tree around the run hold none either
    for p in (tmp_path / "cache").rglob("*"):
        if p.is_file():
            assert not any(v.encode() in p.read_bytes() for v in FAKE_SECRETS.values()), p
