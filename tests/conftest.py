"""Shared test fixtures."""

from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
FIXTURE_TEXTS = sorted((FIXTURES / "text").glob("*.txt"))


def pytest_configure(config):
    config.addinivalue_line("markers", "network: fetches real packages from PyPI/npm (slow, needs the internet)")


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    """A prepared data directory (byte-level BPE, vocab 512) built from the fixture texts in a few seconds."""
    from ponderlm.data import prepare

    out = tmp_path_factory.mktemp("tiny_data")
    prepare(out, source="files", files=FIXTURE_TEXTS, vocab_size=512, cache_dir=tmp_path_factory.mktemp("cache"))
    return out


CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
          "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")  # SmolLM2-Instruct's


@pytest.fixture(scope="session")
def instruct_tokenizer_dir(tmp_path_factory) -> Path:
    """The tokenizer files of an instruct model: chat tokens, `<|im_end|>` (id 0) the end of a turn and of a
    document, `<|endoftext|>` (id 1) a second stop token, a ChatML chat template, a 400-token byte-level BPE."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    out = tmp_path_factory.mktemp("instruct_tokenizer")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|im_end|>", "<|endoftext|>", "<|im_start|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([path.read_text() for path in FIXTURE_TEXTS], trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "bos_token": "<|im_start|>",
        "pad_token": "<|im_end|>", "chat_template": CHATML, "model_max_length": 64,
        "clean_up_tokenization_spaces": False}))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 2, "eos_token_id": [0, 1]}))
    return out
