"""Model fixtures: tiny random Hugging Face models (seconds on a CPU) and the packaged real ones.

Tiny models get a real `PreTrainedTokenizerFast` with a word-level vocabulary that covers every
template and label word, so prompts tokenise into single-token label words as real tokenizers do;
a label word of several words ("not good") is several tokens. Encoder-decoders (T5, BART) get the same
vocabulary plus "</s>", appended to every input as T5's tokenizer does.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from raee.tasks import builtin_tasks

SENTENCES = [
    "a stirring , funny and finally transporting film .",
    "one long string of cliches .",
    "it 's not as good as i hoped",
    "How far is it from Denver to Aspen ?",
    "The sailors rode the breeze clear of the rocks .",
    "complaining",
    "the plot is a mess but the acting is great and the music is okay",
    "What is the best movie of all time ?",
]
_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<s>"]


def _vocabulary() -> list[str]:
    words: list[str] = []
    for task in builtin_tasks().values():
        for style in ("causal", "mlm"):
            words += task.prompt("", style, "").split() + list(task.label_words(style))
    for sentence in SENTENCES:
        words += sentence.split()
    return _SPECIALS + sorted(set(words) - set(_SPECIALS))


def word_tokenizer(style: str) -> transformers.PreTrainedTokenizerFast:
    """Word-level tokenizer: causal prompts start with <s>, masked-LM prompts are [CLS] ... [SEP], seq2seq
    prompts end with </s> (the last id; pad [PAD] = 0 is T5's decoder start)."""
    words = _vocabulary() + (["</s>"] if style == "seq2seq" else [])  # appended: other ids stay as they were
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if style == "seq2seq":
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", vocab["</s>"])])
        extra = {"eos_token": "</s>"}
    elif style == "mlm":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
        )
        extra = {"cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]"}
    else:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
        extra = {"bos_token": "<s>"}
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", model_max_length=64, **extra
    )


def _tiny_config(family: str, vocab_size: int) -> transformers.PretrainedConfig:
    common = {"vocab_size": vocab_size, "hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 4,
              "intermediate_size": 37}
    if family == "llama":
        return transformers.LlamaConfig(**common, num_key_value_heads=2)
    if family == "gemma3":  # sliding window 4 puts local-attention layers in play on short prompts
        return transformers.Gemma3TextConfig(**common, num_key_value_heads=2, head_dim=8, sliding_window=4,
                                             final_logit_softcapping=30.0,
                                             layer_types=["sliding_attention", "full_attention"] * 2)
    if family == "qwen2":
        return transformers.Qwen2Config(**common, num_key_value_heads=2)
    if family == "gpt2":
        return transformers.GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=4, n_head=4, n_positions=128,
                                       bos_token_id=0, eos_token_id=0)
    if family == "bert":
        return transformers.BertConfig(**common, max_position_embeddings=128)
    if family == "roberta":
        return transformers.RobertaConfig(**common, max_position_embeddings=130, pad_token_id=0)
    if family == "distilbert":
        return transformers.DistilBertConfig(vocab_size=vocab_size, dim=32, n_layers=4, n_heads=4, hidden_dim=37,
                                             max_position_embeddings=128, pad_token_id=0)
    # encoder-decoders: 3 encoder + 2 decoder blocks (L = 5), so encoder and decoder layer numbers differ
    eos = vocab_size - 1
    if family in ("t5", "t5v11"):  # t5: tied head scaled by d_model**-0.5; t5v11 (flan-t5 style): gated, unscaled
        v11 = {"feed_forward_proj": "gated-gelu", "tie_word_embeddings": False} if family == "t5v11" else {}
        return transformers.T5Config(vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=37, num_layers=3,
                                     num_decoder_layers=2, num_heads=4, relative_attention_num_buckets=8,
                                     relative_attention_max_distance=16, decoder_start_token_id=0, pad_token_id=0,
                                     eos_token_id=eos, **v11)
    if family == "bart":  # decoder start = </s>, as in facebook/bart-*
        return transformers.BartConfig(vocab_size=vocab_size, d_model=32, encoder_layers=3, decoder_layers=2,
                                       encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=37,
                                       decoder_ffn_dim=37, max_position_embeddings=128, pad_token_id=0,
                                       bos_token_id=5, eos_token_id=eos, decoder_start_token_id=eos,
                                       forced_eos_token_id=None)
    raise ValueError(family)


CAUSAL_FAMILIES = ["llama", "gemma3", "qwen2", "gpt2"]
MLM_FAMILIES = ["bert", "roberta", "distilbert"]
SEQ2SEQ_FAMILIES = ["t5", "t5v11", "bart"]


def tiny_model(family: str) -> tuple[torch.nn.Module, transformers.PreTrainedTokenizerFast]:
    """A randomly initialised model of `family` (4 blocks; encoder-decoders 3 + 2) with its word-level tokenizer."""
    style = "mlm" if family in MLM_FAMILIES else "seq2seq" if family in SEQ2SEQ_FAMILIES else "causal"
    tokenizer = word_tokenizer(style)
    config = _tiny_config(family, len(tokenizer))
    torch.manual_seed(0)
    auto = {"mlm": transformers.AutoModelForMaskedLM, "seq2seq": transformers.AutoModelForSeq2SeqLM,
            "causal": transformers.AutoModelForCausalLM}[style]
    model = auto.from_config(config, attn_implementation="eager" if family == "gemma3" else None)
    return model.eval(), tokenizer


@functools.cache
def tiny_backbone(family: str):
    """A tiny Backbone of `family` (batch size 3), built once per process: calls leave no state on it."""
    from raee.backbones import Backbone

    model, tokenizer = tiny_model(family)
    return Backbone(model, tokenizer, name=f"tiny-{family}", device="cpu", batch_size=3)


@pytest.fixture(scope="session", params=CAUSAL_FAMILIES + MLM_FAMILIES + SEQ2SEQ_FAMILIES)
def tiny_backbone_reused(request):
    """Session-scoped tiny Backbone of every supported architecture (one per param)."""
    return tiny_backbone(request.param)


@pytest.fixture(scope="session")
def tiny_llama_backbone():
    from raee.backbones import Backbone

    model, tokenizer = tiny_model("llama")
    return Backbone(model, tokenizer, name="tiny-llama", device="cpu", batch_size=4)


@pytest.fixture(scope="session")
def model_cache_dir(tmp_path_factory):
    """Converted real models: $RAEE_CACHE_DIR when set (CI warms it once), else a per-session folder."""
    return os.environ.get("RAEE_CACHE_DIR") or str(tmp_path_factory.mktemp("raee-cache"))


@pytest.fixture(scope="session")
def gemma_backbone_reused(model_cache_dir):
    """The packaged Gemma 3 270M (real weights), converted once and cached."""
    from raee.models import load_backbone

    torch.set_num_threads(max(1, torch.get_num_threads()))
    return load_backbone("gemma-3-270m", cache_dir=model_cache_dir, device="cpu")


@pytest.fixture(scope="session")
def data_dir():
    """The LM-BFF data: $RAEE_DATA_DIR, else the shared folder beside the checkout."""
    from pathlib import Path

    path = Path(os.environ.get("RAEE_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "datasets")
    if not (path / "SST-2" / "test.tsv").is_file():
        pytest.fail(f"LM-BFF data not found at {path}: set RAEE_DATA_DIR")
    return path
