"""Data pipeline: text sources, tokenizers, memory-mapped token shards and `prepare`."""

from ponderlm.data.corpus import Document, fetch_default_corpus, load_ptb, split_documents
from ponderlm.data.inputs import expand_inputs, iter_texts, piece_texts, read_pieces
from ponderlm.data.prepare import SplitRule, prepare, resolve_cache_dir
from ponderlm.data.shards import SplitWriter, TokenShards, read_metadata, write_split
from ponderlm.data.tokenizer import (EOS_TOKEN, ModelTokenizer, copy_tokenizer_files, gpt2_tokenizer, load_tokenizer,
                                     train_tokenizer)

__all__ = [
    "Document", "EOS_TOKEN", "ModelTokenizer", "SplitRule", "SplitWriter", "TokenShards", "copy_tokenizer_files",
    "expand_inputs",
    "fetch_default_corpus", "gpt2_tokenizer", "iter_texts", "load_ptb", "load_tokenizer", "piece_texts", "prepare",
    "read_metadata", "read_pieces", "resolve_cache_dir", "split_documents", "train_tokenizer", "write_split",
]
