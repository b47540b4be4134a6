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
    words = dict.fromkeys([*specials, *WORDS, *pieces, *(f"##{c}" for c in pieces)])  # each once: ids 0..n-1
    vocab = {t: i for i, t in enumerate(words)}
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


def write_bert_gguf(model_dir: Path, out: Path) -> Path:
    """``model_dir`` (make_tiny_bert's) as a ``bert`` GGUF, as llama.cpp's converter writes
    one: its metadata keys, the phantom-space vocabulary, tensors under its names (F32)."""
    import json

    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    from protocol.gguf import hf_name

    cfg = json.loads((model_dir / "config.json").read_text())
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    w = gguf.GGUFWriter(str(out), "bert")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_layer_norm_eps(float(cfg["layer_norm_eps"]))
    w.add_causal_attention(False)
    w.add_pooling_type(gguf.PoolingType.MEAN)
    w.add_token_type_count(cfg["type_vocab_size"])
    vocab = tok["model"]["vocab"]
    words = sorted(vocab, key=vocab.get)

    def phantom(t: str) -> str:
        if t.startswith("[") and t.endswith("]"):
            return t
        return t[2:] if t.startswith("##") else "\u2581" + t

    w.add_tokenizer_model("bert")
    w.add_token_list([phantom(t) for t in words])
    w.add_token_types([3 if t.startswith("[") and t.endswith("]") else 1 for t in words])
    w.add_bos_token_id(vocab["[CLS]"])
    w.add_sep_token_id(vocab["[SEP]"])
    w.add_unk_token_id(vocab["[UNK]"])
    w.add_pad_token_id(vocab["[PAD]"])
    w.add_mask_token_id(vocab["[MASK]"])
    tensors = load_file(str(model_dir / "model.safetensors"))
    names = {}
    for gguf_name in ["token_embd.weight", "position_embd.weight", "token_types.weight", "token_embd_norm.weight",
                      "token_embd_norm.bias"] + [
            f"blk.{i}.{part}.{kind}" for i in range(cfg["num_hidden_layers"])
            for part in ("attn_q", "attn_k", "attn_v", "attn_output", "attn_output_norm", "ffn_up", "ffn_down",
                         "layer_output_norm") for kind in ("weight", "bias")]:
        names[hf_name(gguf_name, "bert")] = gguf_name
    for name in sorted(tensors):
        if name in names:
            w.add_tensor(names[name], tensors[name].astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
