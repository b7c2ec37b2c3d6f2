"""Shared fixtures. Tiny random models build in milliseconds; the real shipped model (SmolLM2-135M) is
converted once into a cache that persists between test runs (.cache/ at the repo root, git-ignored)."""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import settings

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("SUPERWEIGHT_CACHE", str(ROOT / ".cache"))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Property tests are reproducible: examples derive from each test's source (derandomize), and no example
# database carries failures from one run into the next (a clean clone has none), so a red run is a regression.
settings.register_profile("superweight", derandomize=True, database=None, print_blob=True)
settings.load_profile("superweight")


def make_tiny_llama(vocab_size: int = 64, hidden: int = 16, layers: int = 2, seed: int = 0, **kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                      max_position_embeddings=256, tie_word_embeddings=kw.pop("tie_word_embeddings", True),
                      attn_implementation=kw.pop("attn_implementation", "eager"), **kw)
    return LlamaForCausalLM(cfg).eval()


def make_int8_linear(n_in: int, n_out: int):
    """(fp32 reference Linear, bitsandbytes Linear8bitLt with the same weights quantized on the CPU: weight is
    Int8Params holding int8 codes, row scales SCB separate). Skips where bitsandbytes cannot do it."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    ref = torch.nn.Linear(n_in, n_out, bias=False)
    lin = bnb.nn.Linear8bitLt(n_in, n_out, bias=False, has_fp16_weights=False)
    lin.load_state_dict(ref.state_dict())
    try:
        lin = lin.to("cpu")  # quantizes: weight.data becomes int8
    except Exception as e:  # an older bitsandbytes without a CPU backend
        pytest.skip(f"bitsandbytes cannot quantize on CPU here: {e}")
    if lin.weight.dtype != torch.int8:
        pytest.skip("bitsandbytes did not quantize on CPU")
    return ref, lin


def _main_in_child(argv: list[str], env: dict[str, str], out: str, err: str, cwd: str, full_env: bool) -> None:
    """Body of a `run_forked` child: stdout/stderr to files, `superweight.commands.main(argv)`, exit with its code."""
    fo, fe = os.open(out, os.O_WRONLY | os.O_CREAT), os.open(err, os.O_WRONLY | os.O_CREAT)
    os.dup2(fo, 1)
    os.dup2(fe, 2)
    sys.stdout, sys.stderr = open(1, "w", closefd=False), open(2, "w", closefd=False)
    code = 1
    try:
        os.chdir(cwd)
        if full_env:
            os.environ.clear()
        for k, v in env.items():
            if v:
                os.environ[k] = v
            else:
                os.environ.pop(k, None)
        from superweight.commands import main

        code = main(argv)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(int(code) if isinstance(code, int) else 1)


# What the fork server imports once, so that a forked run starts warm. `superweight.commands` imports
# transformers, wandb and the rest on first use, about 4 s per cold child, so they are named here too. Only
# installed modules: Python 3.11's fork server ignores the parent's sys.path while it preloads, and skips a
# module it cannot import without a word (tests/ is not on its path: a test module here would be skipped).
FORK_PRELOAD = ["superweight.commands", "superweight.run.experiment", "transformers",
                "transformers.models.auto.configuration_auto", "transformers.models.auto.modeling_auto",
                "transformers.models.auto.tokenization_auto", "transformers.models.llama.modeling_llama",
                "accelerate", "git", "wandb", "plotly.graph_objects", "pandas"]


# The environment of this process as the tests begin: a forked run starts from it (plus its own `env`), never
# from the fork server's, which is whatever environment the test that happened to start the server had
# patched in (with xdist, any test file can be a worker's first to fork).
BASE_ENV = dict(os.environ)


def start_forked(argv: list[str], env: dict[str, str] | None, out: str, err: str, full_env: bool = False):
    """Start `superweight <argv>` as its own process, forked from a fork server that imported the package once
    (a cold interpreter costs seconds of imports per call), in this process's working directory; stdout/stderr
    go to the files out/err. env: variables to set in the child over BASE_ENV ("" = unset), or with full_env
    its whole environment. Returns the started multiprocessing.Process."""
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(FORK_PRELOAD)
    env = dict(env or {}) if full_env else {**BASE_ENV, **(env or {})}
    p = ctx.Process(target=_main_in_child, args=(list(argv), env, out, err, os.getcwd(), True))
    p.start()
    return p


def run_forked(argv: list[str], env: dict[str, str] | None = None, full_env: bool = False
               ) -> subprocess.CompletedProcess:
    """`start_forked` and wait: returncode is negative when a signal killed it, as subprocess reports it."""
    with tempfile.TemporaryDirectory() as d:
        out, err = os.path.join(d, "out"), os.path.join(d, "err")
        p = start_forked(argv, env, out, err, full_env)
        p.join()
        return subprocess.CompletedProcess(argv, p.exitcode, Path(out).read_text(), Path(err).read_text())


def fork_sweep_runs(monkeypatch) -> None:
    """`superweight sweep` starts each run as the sweep YAML's command (`/usr/bin/env python -m superweight run
    ...`, a cold interpreter each): here a command of that form runs the same argv in a `run_forked` process
    with the environment the sweep gave it. The sweep's own logic (plan, param files, env, resume) is
    unchanged; the slow set keeps real interpreters (tests/test_resume.py::test_killed_sweep_resumes)."""
    import superweight.commands.sweep as sweep_cmd

    real_run = sweep_cmd.subprocess.run

    def run(cmd, *a, env=None, **kw):
        cmd = [str(c) for c in cmd]
        if "-m" in cmd and cmd[cmd.index("-m") + 1:cmd.index("-m") + 2] == ["superweight"] and not a and not kw:
            p = run_forked(cmd[cmd.index("-m") + 2:], dict(env if env is not None else os.environ), full_env=True)
            sys.stdout.write(p.stdout)
            sys.stderr.write(p.stderr)
            return p
        return real_run(cmd, *a, env=env, **kw)

    monkeypatch.setattr(sweep_cmd.subprocess, "run", run)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: as fast for tiny models, and several times faster on a loaded shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture(scope="session")
def smollm():
    """(model, tokenizer, device) of the real shipped SmolLM2-135M on CPU, loaded once per session. Only the
    tests that need the real model use it (all marked slow); the others use the small tokenizer below."""
    from superweight.config import ModelConfig
    from superweight.inputs.models import load_model

    return load_model(ModelConfig(device="cpu"))


SMALL_VOCAB = 512


@pytest.fixture(scope="session")
def small_tokenizer():
    """A byte-level BPE tokenizer of 512 tokens trained on the first 400 shipped BoolQ passages: any UTF-8 text
    encodes, English words are a few tokens each, and the special tokens follow SmolLM2's (`<|im_start|>` is
    BOS = EOS = pad, no BOS added to a text). A tiny model with the real 49,152-token vocabulary spends most of
    every forward and backward in its embedding and head; with this one the weights it scores dominate."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from superweight.inputs.data import boolq_passages

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=SMALL_VOCAB, show_progress=False,
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(boolq_passages().docs[:400], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_start|>",
                                   pad_token="<|im_start|>", unk_token="<|endoftext|>")


def save_tiny_model(d: Path, tok, seed: int, **kw) -> Path:
    """A local HF model dir: a tiny random Llama (hidden 32, 2 layers) with the small tokenizer."""
    model = make_tiny_llama(vocab_size=len(tok), hidden=32, layers=2, seed=seed, **kw)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, small_tokenizer):
    """A local HF model dir: a tiny random Llama with the small tokenizer (fast CLI end-to-end)."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), small_tokenizer, seed=1)


def _imported(names: list[str], path: str) -> None:
    """Body of a fork-server child for test_fork_server_preloads: which of `names` it has already imported."""
    Path(path).write_text(" ".join(n for n in names if n in sys.modules))
