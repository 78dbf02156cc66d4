"""Regenerates the built-in default of ``kt-sft train`` beside this file: ``data.jsonl`` (a
small instruction dataset of short factual and pattern questions), ``eval.jsonl`` (held-out
questions: the same facts asked in words the training set never uses), a byte-level BPE
``tokenizer.json`` trained on it with a chat template, and the Qwen3-MoE ``config.json`` of
the tiny model. The model's weights are not shipped: :mod:`kt_ops.default` draws them from a
fixed seed. Run ``python -m kt_ops.default.make_assets``; the output is deterministic.
"""
from __future__ import annotations

import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB_SIZE = 1024
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

CAPITALS = {"France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
            "China": "Beijing", "Canada": "Ottawa", "Egypt": "Cairo", "Kenya": "Nairobi", "Peru": "Lima",
            "Chile": "Santiago", "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki",
            "Poland": "Warsaw", "Greece": "Athens", "Portugal": "Lisbon", "Ireland": "Dublin", "Austria": "Vienna",
            "Hungary": "Budapest", "Russia": "Moscow", "India": "New Delhi", "Thailand": "Bangkok",
            "Vietnam": "Hanoi", "Mexico": "Mexico City", "Argentina": "Buenos Aires", "Cuba": "Havana",
            "Turkey": "Ankara", "Iran": "Tehran", "Australia": "Canberra"}
OPPOSITES = {"hot": "cold", "big": "small", "fast": "slow", "up": "down", "left": "right", "day": "night",
             "happy": "sad", "open": "closed", "early": "late", "light": "dark", "full": "empty", "hard": "soft",
             "old": "new", "rich": "poor", "strong": "weak", "wet": "dry", "loud": "quiet", "high": "low",
             "long": "short", "thick": "thin", "first": "last", "inside": "outside", "push": "pull",
             "win": "lose", "buy": "sell", "give": "take", "begin": "end", "true": "false", "clean": "dirty",
             "near": "far"}
PLURALS = {"cat": "cats", "dog": "dogs", "mouse": "mice", "child": "children", "foot": "feet", "tooth": "teeth",
           "box": "boxes", "city": "cities", "leaf": "leaves", "man": "men", "woman": "women", "goose": "geese",
           "knife": "knives", "baby": "babies", "bus": "buses", "fish": "fish", "sheep": "sheep",
           "person": "people", "wolf": "wolves", "story": "stories", "glass": "glasses", "hero": "heroes"}
SOUNDS = {"dog": "woof", "cat": "meow", "cow": "moo", "duck": "quack", "sheep": "baa", "lion": "roar",
          "owl": "hoot", "pig": "oink", "horse": "neigh", "frog": "ribbit", "bee": "buzz", "snake": "hiss",
          "mouse": "squeak", "goat": "bleat", "crow": "caw"}
COLORS = {"the sky": "blue", "grass": "green", "snow": "white", "coal": "black", "a banana": "yellow",
          "a strawberry": "red", "an orange": "orange", "a plum": "purple", "chocolate": "brown",
          "a lemon": "yellow", "a tomato": "red", "the sea": "blue", "milk": "white", "a crow": "black"}
WORDS = ["apple", "house", "river", "green", "table", "music", "light", "water", "stone", "cloud", "bread",
         "chair", "plant", "night", "smile", "train", "paper", "horse", "ocean", "tiger"]
SYSTEM = "You are a helpful assistant. Answer in one short sentence."


def _examples(rng: random.Random) -> list[dict]:
    out = []

    def chat(question: str, answer: str) -> None:
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        if rng.random() < 0.25:
            messages.insert(0, {"role": "system", "content": SYSTEM})
        out.append({"messages": messages})

    # (table, two phrasings of the question, the answer) for {a} -> {b}
    for table, questions, answer in [
            (CAPITALS, ("What is the capital of {a}?", "Name the capital city of {a}."), "The capital of {a} is {b}."),
            (OPPOSITES, ("What is the opposite of {a}?", "Give the opposite of the word {a}."),
             "The opposite of {a} is {b}."),
            (PLURALS, ("What is the plural of {a}?", "How do you say more than one {a}?"), "The plural of {a} is {b}."),
            (SOUNDS, ("What sound does a {a} make?", "How does a {a} sound?"), "A {a} says {b}.")]:
        for a, b in table.items():
            for q in questions:
                chat(q.format(a=a), answer.format(a=a, b=b))
    for thing, color in COLORS.items():
        chat(f"What color is {thing}?", f"{thing[0].upper() + thing[1:]} is {color}.")
    for start in range(1, 31):
        end = start + rng.randint(3, 6)
        chat(f"Count from {start} to {end}.", ", ".join(str(n) for n in range(start, end + 1)) + ".")
    letters = "abcdefghijklmnopqrstuvwxyz"
    for a, b in zip(letters, letters[1:]):
        chat(f"Which letter comes after {a}?", f"The letter after {a} is {b}.")
    for word in WORDS:
        chat(f"Spell the word {word}.", "-".join(word) + ".")
        out.append({"instruction": "Write the word backwards.", "input": word, "output": word[::-1]})
    for a in range(2, 10):
        for b in (2, 3, 4, 5):
            out.append({"prompt": f"What is {a} times {b}?", "response": f"{a} times {b} is {a * b}."})
    rng.shuffle(out)
    return out


# A third phrasing of each kind of question, for every third fact of its table: the held-out
# set asks what training taught in words it never saw.
HELD_OUT = [(CAPITALS, "Which city is the capital of {a}?", "The capital of {a} is {b}."),
            (OPPOSITES, "What word means the opposite of {a}?", "The opposite of {a} is {b}."),
            (PLURALS, "Tell me the plural of {a}.", "The plural of {a} is {b}."),
            (SOUNDS, "What noise does a {a} make?", "A {a} says {b}.")]


def _held_out_examples() -> list[dict]:
    return [{"messages": [{"role": "user", "content": q.format(a=a)},
                          {"role": "assistant", "content": answer.format(a=a, b=b)}]}
            for table, q, answer in HELD_OUT for a, b in list(table.items())[::3]]


def write_held_out() -> None:
    with open(os.path.join(HERE, "eval.jsonl"), "w") as fh:
        for ex in _held_out_examples():
            fh.write(json.dumps(ex) + "\n")


def _tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


def _all_texts(examples: list[dict]) -> list[str]:
    texts = []
    for ex in examples:
        if "messages" in ex:
            texts += [m["content"] for m in ex["messages"]] + [m["role"] for m in ex["messages"]]
        else:
            texts += [str(v) for v in ex.values()]
    return texts + ["user", "assistant", "system"]


def main() -> None:
    examples = _examples(random.Random(0))
    with open(os.path.join(HERE, "data.jsonl"), "w") as fh:
        for ex in examples:
            fh.write(json.dumps(ex) + "\n")
    write_held_out()
    tok = _tokenizer(_all_texts(examples))
    tok.save(os.path.join(HERE, "tokenizer.json"))
    with open(os.path.join(HERE, "tokenizer_config.json"), "w") as fh:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|im_end|>",
                   "pad_token": "<|endoftext|>", "model_max_length": 1024, "chat_template": CHAT_TEMPLATE}, fh, indent=2)
    config = {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": tok.get_vocab_size(),
        "hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 128, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "num_experts": 16,
        "num_experts_per_tok": 4, "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "max_position_embeddings": 1024, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "hidden_act": "silu",
        "attention_bias": False, "attention_dropout": 0.0, "tie_word_embeddings": False, "use_cache": True,
        "initializer_range": 0.02, "output_router_logits": False, "router_aux_loss_coef": 0.001,
        "eos_token_id": tok.token_to_id("<|im_end|>"), "pad_token_id": tok.token_to_id("<|endoftext|>"),
        "bos_token_id": None, "torch_dtype": "bfloat16",
    }
    with open(os.path.join(HERE, "config.json"), "w") as fh:
        json.dump(config, fh, indent=2)
    print(f"{len(examples)} examples, vocabulary {tok.get_vocab_size()}")


if __name__ == "__main__":
    main()
