"""Tiny real models for tests: a byte-level BPE tokenizer trained here on slices of the
shared datasets, and a 2-layer Llama built from a config. Nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

from tasc.data.spec import default_data_dir

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def training_texts(limit: int = 400) -> list[str]:
    """A few hundred real lines from SNIPS and MBPP, so merges look like a real tokenizer's."""
    data = default_data_dir()
    texts: list[str] = []
    for f in sorted((data / "snips" / "validate").glob("*.json")):
        obj = json.loads(f.read_bytes().decode("utf-8", errors="replace"))
        for items in obj.values():
            for item in items[: limit // 14]:
                texts.append("".join(seg["text"] for seg in item["data"]))
    with open(data / "mbpp" / "mbpp.jsonl", encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            if i >= limit // 2:
                break
            row = json.loads(line)
            texts += [row["text"], row["code"].replace("\r\n", "\n")]
    texts.append('{"intent": "GetWeather", "slots": {"city": "Paris"}}')
    return texts


def build_tiny_tokenizer(out_dir: Path, vocab_size: int = 800):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(training_texts(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


def build_tiny_model(out_dir: Path, seed: int = 0):
    """A 2-layer Llama (about 0.2M parameters) saved as a normal HF folder with its tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    tok = build_tiny_tokenizer(out_dir)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    # Larger weights than the default init, so greedy outputs vary and repeat like a real model's.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.25)
    model.save_pretrained(out_dir)
    return out_dir
