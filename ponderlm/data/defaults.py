"""What `ponderlm data prepare` does when not told otherwise, declared once: the command line, `prepare()`, the
split rule and the shard writer read them here."""

VOCAB_SIZE = 8192  # tokens of a trained BPE
VAL_FRACTION = 0.05  # share of documents for val
TEST_FRACTION = 0.05  # share of documents for test
SHARD_TOKENS = 50_000_000  # tokens per shard file
SAMPLE_BYTES = 256 << 20  # BPE training text: enough for a stable vocabulary, bounded memory
