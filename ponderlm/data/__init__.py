"""Data pipeline: text sources, tokenizers, memory-mapped token shards and `prepare`."""

from ponderlm.data.corpus import (Document, fetch_default_corpus, load_ptb, read_user_files,
                                  split_documents)
from ponderlm.data.prepare import prepare, resolve_cache_dir
from ponderlm.data.shards import TokenShards, read_metadata, write_split
from ponderlm.data.tokenizer import EOS_TOKEN, end_of_document_id, gpt2_tokenizer, load_tokenizer, train_tokenizer

__all__ = [
    "Document", "EOS_TOKEN", "TokenShards", "end_of_document_id", "fetch_default_corpus", "gpt2_tokenizer", "load_ptb",
    "load_tokenizer", "prepare", "read_metadata", "read_user_files", "resolve_cache_dir", "split_documents",
    "train_tokenizer", "write_split",
]
