"""/api/show's pure part: stop texts, the chat template, model_info, the whole answer."""

from __future__ import annotations

import json

from node.api.show import chat_template, model_info, show_view, stop_strings
from protocol.manifest import ManifestFile, build_manifest


def _files(**docs: object) -> dict[str, bytes]:
    return {name.replace("_json", ".json"): json.dumps(doc).encode() for name, doc in docs.items()}


def test_stop_strings_from_the_eos_token_and_the_generation_ids() -> None:
    files = _files(tokenizer_config_json={"eos_token": "<|eot_id|>", "added_tokens_decoder": {
        "1": {"content": "<|end_of_text|>"}, "4": {"content": "<|eot_id|>"}}},
        generation_config_json={"eos_token_id": [4, 1, 99]})
    assert stop_strings(files) == ["<|eot_id|>", "<|end_of_text|>"]
    assert stop_strings(_files(tokenizer_config_json={"eos_token": {"content": "</s>"}})) == ["</s>"]
    assert stop_strings({"tokenizer_config.json": b"not json"}) == []


def test_chat_template_from_the_config_a_named_list_or_the_jinja_file() -> None:
    assert chat_template(_files(tokenizer_config_json={"chat_template": "{{ x }}"})) == "{{ x }}"
    named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    assert chat_template(_files(tokenizer_config_json={"chat_template": named})) == "D"
    assert chat_template({"chat_template.jinja": b"<think>{{ y }}"}) == "<think>{{ y }}"
    assert chat_template({}) == ""


def test_model_info_uses_gguf_names_and_the_text_config() -> None:
    config = {"model_type": "llama", "max_position_embeddings": 4096, "hidden_size": 64, "num_hidden_layers": 3,
              "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 5e5,
              "tie_word_embeddings": True}
    info = model_info(config, {"parameters": 1234})
    assert info == {"general.architecture": "llama", "general.parameter_count": 1234, "llama.context_length": 4096,
                    "llama.embedding_length": 64, "llama.block_count": 3, "llama.attention.head_count": 4,
                    "llama.attention.head_count_kv": 2, "llama.attention.layer_norm_rms_epsilon": 1e-5,
                    "llama.rope.freq_base": 5e5}
    nested = model_info({"model_type": "gemma3", "text_config": {"model_type": "gemma3_text", "hidden_size": 8}}, {})
    assert nested == {"general.architecture": "gemma3_text", "gemma3_text.embedding_length": 8}


def test_show_view_has_ollamas_shape_with_the_license_tools_and_thinking() -> None:
    texts = {
        "config.json": json.dumps({"model_type": "qwen3", "hidden_size": 8, "eos_token_id": 2}).encode(),
        "tokenizer_config.json": json.dumps({"eos_token": "<|im_end|>", "chat_template": "{{ tools }}<think>"}).encode(),
        "LICENSE": b"Apache License\nVersion 2.0\n",
    }
    files = [ManifestFile(path, len(data), ("0" * 64,)) for path, data in texts.items()]
    manifest = build_manifest(files, [], piece_size=16384, summary={
        "format": "safetensors", "model_type": "qwen3", "parameters": 600_000_000, "torch_dtype": "bfloat16"})
    view = show_view("qwen3:latest", manifest, texts, modified=0.0)
    assert view["details"] == {"parent_model": "", "format": "safetensors", "family": "qwen3", "families": ["qwen3"],
                               "parameter_size": "600.0M", "quantization_level": "bfloat16"}
    assert view["capabilities"] == ["completion", "tools", "thinking"] and view["template"] == "{{ tools }}<think>"
    assert view["parameters"] == 'stop                           "<|im_end|>"'
    assert view["license"] == "Apache License\nVersion 2.0\n" and view["modified_at"] == "1970-01-01T00:00:00Z"
    assert view["model_info"] == {"general.architecture": "qwen3", "general.parameter_count": 600_000_000,
                                  "qwen3.embedding_length": 8}
    modelfile = view["modelfile"]
    for line in ("FROM qwen3:latest", 'TEMPLATE """{{ tools }}<think>"""', 'PARAMETER stop "<|im_end|>"',
                 'LICENSE """Apache License'):
        assert line in modelfile, modelfile
    bare = show_view("x:latest", build_manifest([files[0]], [], piece_size=16384), {}, modified=0.0)
    assert "license" not in bare and bare["capabilities"] == ["completion"] and bare["template"] == ""


def test_a_bert_model_shows_the_embedding_capability_only() -> None:
    from types import SimpleNamespace

    manifest: object = SimpleNamespace(files=[], summary={})
    files = {"config.json": json.dumps({"architectures": ["BertModel"], "hidden_size": 32}).encode()}
    assert show_view("bert", manifest, files, modified=0.0)["capabilities"] == ["embedding"]  # type: ignore[arg-type]
