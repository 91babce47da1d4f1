"""Fixtures shared by test modules of several folders (a folder's own are in its conftest.py)."""

import pytest
import torch

from tests.helpers.cli import collect_args, run_ok


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory):
    """A complete store of the tiny random model (`collect_args(4000)`: 4,000 training tokens at
    tests.helpers.cli.HOOK, 512-row chunks). Tests read it, and copy it before they change anything."""
    path = tmp_path_factory.mktemp("tiny-store") / "s.zarr"
    run_ok(*collect_args(4000), "--out", path)
    return path


MLP_IN, MLP_OUT = "blocks.1.mlp.hook_in", "blocks.1.hook_mlp_out"


@pytest.fixture(scope="session")
def mlp_store(tmp_path_factory):
    """A complete store of the tiny random model's MLP input and output at layer 1 (MLP_IN, MLP_OUT;
    6,000 training tokens, tests.helpers.collect.SETTINGS): what transcoders train on. Read only."""
    from stages import collect as collect_stage
    from stages.collect.config import CollectConfig
    from tests.helpers.collect import SETTINGS

    path = tmp_path_factory.mktemp("mlp-store") / "s.zarr"
    collect_stage.run_collect(CollectConfig(out=str(path), **dict(SETTINGS, hooks=(MLP_IN, MLP_OUT), tokens=6000)))
    return path


def _save_tiny_hf_model(path, hf):
    """Save a random HF model beside a byte-level BPE tokenizer of 257 ids, like any local HF model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = 256
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    hf.save_pretrained(path)
    tok.save_pretrained(path)
    return path, hf


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory):
    """A 3-layer random GPT-2 with a byte-level BPE tokenizer, saved like any local HF model."""
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        hf = GPT2LMHeadModel(
            GPT2Config(
                vocab_size=257, n_positions=64, n_embd=32, n_layer=3, n_head=4, bos_token_id=256, eos_token_id=256
            )
        ).eval()
    return _save_tiny_hf_model(tmp_path_factory.mktemp("tiny-gpt2"), hf)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A 3-layer random Llama shaped like the default model (grouped-query attention, rotary positions,
    a gated MLP, RMSNorm, tied embeddings), with the byte-level tokenizer of tiny_gpt2_dir."""
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        hf = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=257,
                hidden_size=48,
                intermediate_size=128,
                num_hidden_layers=3,
                num_attention_heads=6,
                num_key_value_heads=2,
                max_position_embeddings=128,
                tie_word_embeddings=True,
                bos_token_id=256,
                eos_token_id=256,
            )
        ).eval()
    return _save_tiny_hf_model(tmp_path_factory.mktemp("tiny-llama"), hf)


class _Crash(Exception):
    """What `crash_training` raises: a training run dying mid-way."""


class _CrashTraining:
    """Make Adam's step raise after `n` more steps (`arm`), and undo it (`disarm`)."""

    Crash = _Crash

    def __init__(self, monkeypatch):
        self.monkeypatch, self.real_step = monkeypatch, torch.optim.Adam.step

    def arm(self, n: int) -> None:
        real_step, calls = self.real_step, {"n": 0}

        def step(optimizer, *args, **kwargs):
            calls["n"] += 1
            if calls["n"] > n:
                raise _Crash()
            return real_step(optimizer, *args, **kwargs)

        self.monkeypatch.setattr(torch.optim.Adam, "step", step)

    def disarm(self) -> None:
        self.monkeypatch.setattr(torch.optim.Adam, "step", self.real_step)


@pytest.fixture
def crash_training(monkeypatch):
    """Interrupt a training run after a number of optimizer steps, as a crash would (in-process)."""
    return _CrashTraining(monkeypatch)
