"""A tiny checkpoint whose greedy output follows a script, with a tokenizer and a chat template.

No weights can be downloaded, yet the OpenAI API's chat, tool calls and phases need a model that
says something on purpose. This llama's decoder layers add nothing (their output projections
are zero), its embeddings are one-hot and its head maps each word to a chosen successor, so
greedy decoding follows ``SCRIPT``: after ``assistant`` it says ``hello world hello world ...``;
after ``:`` (how the template ends when tools are offered) it emits a Hermes tool call for
``get_weather`` and then the end-of-sequence token. Tests and ``djinn demo`` serve it.
"""

from __future__ import annotations

from pathlib import Path

CALL = ['{"name":', '"get_weather",', '"arguments":', '{"city":', '"paris"}}']
WORDS = ["<unk>", "<s>", "</s>", "user", "assistant", "system", "tool", ":", "hello", "world", "the", "weather",
         "in", "paris", "is", "sunny", "what", "<tool_call>", "</tool_call>", *CALL]
#: the greedy successor of each scripted token; every other token is followed by "hello"
SCRIPT = {"hello": "world", "world": "hello", ":": "<tool_call>", "<tool_call>": CALL[0],
          **{a: b for a, b in zip(CALL, CALL[1:])}, CALL[-1]: "</tool_call>", "</tool_call>": "</s>"}
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}{% if tools %}assistant :{% else %}assistant{% endif %}{% endif %}"
)
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}}]


def build_model_dir(path: str | Path) -> str:
    """Save the scripted model and its tokenizer into ``path``; returns the directory."""
    import torch

    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(WORDS)}
    core = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tokenizer.chat_template = TEMPLATE
    hidden = 64
    config = LlamaConfig(
        vocab_size=len(WORDS), hidden_size=hidden, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.copy_(torch.eye(len(WORDS), hidden))
        head = torch.zeros(len(WORDS), hidden)
        for word, i in vocab.items():
            head[vocab[SCRIPT.get(word, "hello")], i] = 1.0
        model.lm_head.weight.copy_(head)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
