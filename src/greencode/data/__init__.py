"""greencode.data: CodeXGLUE token-level completion data, from the hub or from local
source files turned into the same token format; the tokenizer; completion samples.

    corpus_dir, tok_dir = prepare_data(cfg)      # build or reuse runs/<name>/{corpus,tokenizer}
    dsd = load_corpus(cfg)                       # DatasetDict train / validation / test
    tok = load_tokenizer(cfg)
    samples = samples_for_config(cfg, tok)       # the paper's line-completion samples

Heavy libraries (datasets, transformers, tokenizers) are imported inside the functions.
"""

from greencode.data.corpus import code_text, load_corpus, prepare_corpus, read_manifest
from greencode.data.hub import HubUnavailableError, load_hub_corpus
from greencode.data.lexers import (
    BOS, CHAR_LIT, EOL, EOS, NUM_LIT, STR_LIT, LexError, SyntaxCheckError, source_to_text, tokenize_java_source,
    tokenize_python_source, tokenize_source,
)
from greencode.data.local import build_local_corpus, find_jdk_src_zip, list_source_files, resolve_source
from greencode.data.prepare import prepare_data
from greencode.data.samples import Sample, make_samples, samples_for_config
from greencode.data.tokenizer import encode_context, encode_record, load_tokenizer, prepare_tokenizer, train_bpe

__all__ = [
    "prepare_data", "load_corpus", "code_text", "load_tokenizer", "make_samples", "samples_for_config", "Sample",
    "encode_context", "encode_record", "build_local_corpus", "tokenize_python_source", "tokenize_java_source",
    "tokenize_source", "source_to_text", "load_hub_corpus", "HubUnavailableError", "prepare_corpus",
    "prepare_tokenizer", "train_bpe", "read_manifest", "find_jdk_src_zip", "list_source_files", "resolve_source",
    "LexError", "SyntaxCheckError", "BOS", "EOS", "EOL", "STR_LIT", "NUM_LIT", "CHAR_LIT",
]
