"""Configuration sections owned by the data pipeline: `data` and `tokenizer`.

`pretrain.config` composes these into the full run configuration; the base class every
section shares and the rule-violation helper are in `data_pipeline.config_base`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    model_validator,
)

from .config_base import ConfigSection, rule_violation

Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
# n-gram sizes as mapping keys: YAML and JSON dumps write them as text, so "5" reads as 5.
NgramSize = Annotated[int, Field(ge=1, le=64, strict=False)]


class BlendEntry(ConfigSection):
    """One shard set in a weighted blend."""

    path: str
    weight: PositiveFloat = 1.0


class InputConfig(ConfigSection):
    """One corpus: a file, directory, glob or fsspec URL (s3://, gs://, ...), or `stdlib://`,
    the source files of this Python's standard library (real text present on every machine)."""

    path: str
    format: Literal["auto", "jsonl", "parquet", "text"] = Field(
        default="auto", description="auto: from the file name (.jsonl[.gz|.zst], .parquet, .txt)"
    )
    text_field: str = Field(default="text", description="JSON / Parquet field holding the text.")
    text_mode: Literal["document", "line"] = Field(
        default="document", description="Plain text: one document per file, or per line."
    )
    weight: PositiveFloat = Field(
        default=1.0,
        description="Copies of each kept document in the shards: 2.0 writes each twice, "
        "0.5 keeps a deterministic half (the rest counted as filtered by `input_weight`).",
    )
    limit: PositiveInt | None = Field(
        default=None, description="Read at most this many documents from this input."
    )


class NormalizeConfig(ConfigSection):
    unicode_nfc: bool = True
    whitespace: bool = Field(
        default=True,
        description="\\r\\n to \\n, no trailing spaces, at most one blank line in a row, "
        "control characters removed, no leading or trailing blank lines.",
    )


STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with")


class FilterConfig(ConfigSection):
    """Document filters. Each threshold is one rule, named by its key in the manifest's counts;
    `null` switches that rule off. Defaults are Gopher's (Rae et al. 2021, appendix A) for web
    text. A *word* is a run of non-whitespace characters; a *line* (*paragraph*) one holding a
    non-whitespace character, between newlines (blank lines); fractions "of the text" are over
    its characters, `len(text)`. Rules are tried step by step, a document leaving at its first
    failure: length, Gopher quality, stop words, Gopher repetition."""

    enabled: bool = True
    min_chars: NonNegativeInt | None = Field(default=None, description="characters, at least")
    max_chars: PositiveInt | None = Field(default=None, description="characters, at most")
    min_words: NonNegativeInt | None = Field(default=50, description="words, at least")
    max_words: PositiveInt | None = Field(default=100_000, description="words, at most")
    min_mean_word_length: NonNegativeFloat | None = Field(
        default=3.0,
        description="mean characters per word, punctuation and symbols not counted (words "
        "made only of them left out), at least",
    )
    max_mean_word_length: PositiveFloat | None = Field(
        default=10.0, description="the same mean, at most"
    )
    max_symbol_word_ratio: NonNegativeFloat | None = Field(
        default=0.1, description="('#' + '...' + '…') per word, at most"
    )
    max_bullet_lines_ratio: Fraction | None = Field(
        default=0.9, description="share of lines starting with a bullet (•, -, *, ...), at most"
    )
    max_ellipsis_lines_ratio: Fraction | None = Field(
        default=0.3, description="share of lines ending with '...' or '…', at most"
    )
    min_alpha_words_ratio: Fraction | None = Field(
        default=0.8, description="share of words holding at least one letter, at least"
    )
    min_stop_words: NonNegativeInt | None = Field(
        default=2,
        description="occurrences of the stop words (exact, punctuation around a word ignored), "
        "at least",
    )
    stop_words: list[str] = Field(
        default_factory=lambda: list(STOP_WORDS),
        description="the words `min_stop_words` counts (Gopher's English list by default)",
    )
    max_duplicate_paragraph_fraction: Fraction | None = Field(
        default=0.3, description="share of paragraphs equal to an earlier one, at most"
    )
    max_duplicate_paragraph_char_fraction: Fraction | None = Field(
        default=0.2, description="characters of those repeated paragraphs, share of the text"
    )
    max_duplicate_line_fraction: Fraction | None = Field(
        default=0.3, description="share of lines equal to an earlier one, at most"
    )
    max_duplicate_line_char_fraction: Fraction | None = Field(
        default=0.2, description="characters of those repeated lines, share of the text"
    )
    max_top_ngram_char_fraction: dict[NgramSize, Fraction] | None = Field(
        default_factory=lambda: {2: 0.20, 3: 0.18, 4: 0.16},
        description="n -> of the word n-grams occurring at least twice, the most frequent one's "
        "characters (single spaces between its words) times its count, share of the text; "
        "0 when no n-gram repeats",
    )
    max_duplicate_ngram_char_fraction: dict[NgramSize, Fraction] | None = Field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10},
        description="n -> characters of the word n-grams that repeat an earlier one (found "
        "scanning from the start, a repeat skipped whole; first occurrences not counted), "
        "share of the text",
    )

    def active_rules(self) -> dict[str, object]:
        """The rules that are on, by name, with their thresholds."""
        if not self.enabled:
            return {}
        return {
            name: value
            for name, value in self.model_dump().items()
            if name not in ("enabled", "stop_words") and value is not None
        }


class ExactDedupConfig(ConfigSection):
    enabled: bool = True


class NearDedupConfig(ConfigSection):
    """MinHash + LSH over word n-grams of the normalised text (lower case, punctuation removed,
    any run of whitespace one separator), so re-wrapped or re-indented copies match and the
    result does not depend on the tokenizer: documents agreeing on every row of some band are
    candidates; a candidate pair whose estimated Jaccard similarity reaches `threshold` is a
    near duplicate, and of each cluster only the earliest document is kept."""

    enabled: bool = True
    ngram: PositiveInt = Field(default=5, description="Words per shingle.")
    bands: PositiveInt = Field(
        default=14,
        description="LSH bands. A pair with word n-gram Jaccard J becomes a candidate with "
        "probability 1 - (1 - J^rows)^bands: about 0.5 at J = 0.72 and 0.99 at J = 0.9 for the "
        "defaults (FineWeb's).",
    )
    rows: PositiveInt = Field(default=8, description="MinHash values per band.")
    threshold: Fraction = Field(
        default=0.5,
        description="Candidates whose estimated Jaccard (over all bands x rows values) is lower "
        "are not duplicates. The default only sets aside chance band collisions, so recall "
        "follows the curve above (datatrove keeps every candidate); 0.8 keeps near-identical "
        "copies only.",
    )
    seed: NonNegativeInt = 1


class DedupConfig(ConfigSection):
    exact: ExactDedupConfig = Field(default_factory=ExactDedupConfig)
    near: NearDedupConfig = Field(default_factory=NearDedupConfig)


class TokenizeConfig(ConfigSection):
    batch_documents: PositiveInt = Field(default=256, description="Documents per encode batch.")
    max_piece_chars: PositiveInt = Field(
        default=100_000,
        description="Longer documents are cut into pieces of about this many characters, "
        "encoded separately so that time and memory stay bounded; each cut is made where the "
        "pieces encode to exactly the whole document's tokens (checked at every cut).",
    )
    actors: PositiveInt | None = Field(
        default=None, description="Tokeniser actors; default: from the CPUs Ray reports."
    )


class ShardConfig(ConfigSection):
    max_tokens: PositiveInt = Field(
        default=250_000_000, description="A shard is closed once it holds this many tokens."
    )
    validation_fraction: float = Field(
        default=0.01,
        ge=0.0,
        lt=1.0,
        description="Share of documents for validation, chosen by a hash of each document's "
        "text: stable when the corpus grows.",
    )


class DataConfig(ConfigSection):
    """Where the training shards are, and how `kiln data prepare` makes them."""

    path: str | None = Field(
        default=None, description="Directory written by `kiln data prepare` (shards + manifest)."
    )
    blend: list[BlendEntry] | None = Field(
        default=None, description="Several prepared directories mixed by weight."
    )
    inputs: list[InputConfig] = Field(default_factory=list)
    part_size_mb: PositiveFloat = Field(
        default=8.0,
        description="Unit of parallel work: consecutive files of an input are grouped into parts "
        "of about this size (a larger file is a part of its own).",
    )
    normalize: NormalizeConfig = Field(default_factory=NormalizeConfig)
    filters: FilterConfig = Field(default_factory=FilterConfig)
    removed_sample: NonNegativeInt = Field(
        default=100,
        description="Documents kept in OUTPUT/removed/RULE.jsonl for each filter rule and each "
        "dedup kind (with the document a duplicate repeats), chosen by hash; 0: none.",
    )
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    tokenize: TokenizeConfig = Field(default_factory=TokenizeConfig)
    shards: ShardConfig = Field(default_factory=ShardConfig)

    @model_validator(mode="before")
    @classmethod
    def _inputs_may_be_paths(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("inputs"), list):
            inputs = [{"path": i} if isinstance(i, str) else i for i in data["inputs"]]
            data = {**data, "inputs": inputs}
        return data

    @model_validator(mode="after")
    def _path_or_blend(self) -> DataConfig:
        if self.path is not None and self.blend is not None:
            raise rule_violation("blend", self.blend, "give data.path or data.blend, not both")
        if self.blend is not None and not self.blend:
            raise rule_violation("blend", self.blend, "a blend needs at least one entry")
        return self


class TokenizerConfig(ConfigSection):
    """The tokenizer: a byte-level BPE trained on a sample of the cleaned corpus, or an existing
    tokenizer.json loaded as it is."""

    vocab_size: int | None = Field(
        default=None,
        ge=256,
        description="Vocabulary size to train; defaults to model.vocab_size (32000 without one).",
    )
    path: str | None = Field(
        default=None, description="An existing tokenizer.json to load instead of training one."
    )
    special_tokens: list[str] = Field(default_factory=lambda: ["<|endoftext|>", "<|pad|>"])
    eos_token: str = Field(default="<|endoftext|>", description="Appended after each document.")
    mask_token: str | None = Field(
        default=None,
        description="The masked-LM objective's token (set from masking.token for a bert "
        "model): a trained tokenizer gets it as a special token, a loaded one must have it.",
    )
    required_tokens: list[str] = Field(
        default_factory=list,
        description="Further tokens the objective needs (set from the spans section for a t5 "
        "model: the decoder's start token and the sentinels): trained in as special tokens, "
        "required of a loaded tokenizer.",
    )
    train_sample_mb: PositiveFloat = Field(
        default=64.0, description="Megabytes of cleaned text to train the tokenizer on."
    )
    min_frequency: PositiveInt = 2

    @model_validator(mode="after")
    def _resolve_special_tokens(self) -> TokenizerConfig:
        """The objective's tokens (mask, required) are special tokens too."""
        needed = [self.mask_token] if self.mask_token is not None else []
        for token in [*needed, *self.required_tokens]:
            if token not in self.special_tokens:
                self.special_tokens = [*self.special_tokens, token]
        return self

    @model_validator(mode="after")
    def _eos_is_special(self) -> TokenizerConfig:
        if self.path is None and self.eos_token not in self.special_tokens:
            raise rule_violation(
                "eos_token", self.eos_token, "must be one of tokenizer.special_tokens"
            )
        return self


class ResolvedTokenizer(TokenizerConfig):
    """A validated tokenizer section: its vocabulary size resolved (`pretrain.config` sets an
    unset one to the model's, 32000 without a model)."""

    vocab_size: PositiveInt
