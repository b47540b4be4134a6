"""A tiny random BERT embedding model written by transformers itself (BertModel, saved with
save_pretrained) with a small WordPiece tokenizer built by the `tokenizers` library and
saved as BertTokenizerFast: what all-MiniLM looks like on disk, in a few hundred KB."""

from __future__ import annotations

from pathlib import Path

WORDS = ("hola mundo una frase bastante más larga que la otra el gato come pescado y duerme al sol "
         "the cat eats fish and sleeps in sun embedding vector model text").split()


def make_tiny_bert(out: Path, *, seed: int = 3, max_positions: int = 64) -> Path:
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    pieces = sorted({c for w in WORDS for c in w})
    vocab = {t: i for i, t in enumerate([*specials, *dict.fromkeys(WORDS), *pieces, *(f"##{c}" for c in pieces)])}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    tok.decoder = decoders.WordPiece()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                                cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=max_positions)
    model = transformers.BertModel(cfg).eval()
    with torch.no_grad():  # random init leaves LayerNorms at 1/0 and biases at 0: make them matter
        for name, p in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.normal_(0.0 if name.endswith("bias") else 1.0, 0.1)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    fast.save_pretrained(out)
    return out
