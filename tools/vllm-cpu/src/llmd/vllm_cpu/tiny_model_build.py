"""Generate a tiny random Llama (float32), a locally trained BPE tokenizer and a chat template.

Runs inside the vLLM virtualenv (it needs torch, transformers and tokenizers), as a plain script:
it must not import anything from llmd. The output is a function of the constants below only, so
every machine produces byte-identical files. Shapes respect vLLM's CPU attention constraints
(head_dim a multiple of 32) and the model is saved in float32 (bf16 picks AMX kernels that crash
with SIGILL on these CPUs).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

VOCAB_SIZE = 512
HIDDEN = 128
HEADS = 2
KV_HEADS = 2
LAYERS = 2
INTERMEDIATE = 256
MAX_POSITIONS = 8192
SEED = 1234
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def _corpus() -> list[str]:
    """A deterministic pseudo-English corpus so BPE learns merges for ordinary text."""
    rng = random.Random(SEED)
    letters = "etaoinshrdlucmfwypvbgkjqxz"
    words = [
        "".join(rng.choice(letters[: 8 + i % 18]) for _ in range(1 + i % 7)) for i in range(600)
    ]
    common = (
        "the of and to in is you that it he was for on are as with his they at be this have "
        "from or one had by word but not what all were we when your can said there use an each "
        "which she do how their if will up other about out many then them these so some her "
        "would make like him into time has look two more write go see number no way could "
        "people my than first water been call who oil its now find long down day did get come "
        "made may part system user assistant question answer document context prompt"
    ).split()
    lines = []
    for _ in range(4000):
        n = rng.randint(4, 16)
        lines.append(
            " ".join(rng.choice(common if rng.random() < 0.6 else words) for _ in range(n))
        )
    digits = [" ".join(str(rng.randint(0, 99999)) for _ in range(8)) for _ in range(200)]
    return lines + digits + ["!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"]


def build_tokenizer(out: Path) -> None:
    """Write tokenizer.json, tokenizer_config.json and chat_template.jinja with `tokenizers` only.

    The files are what transformers' PreTrainedTokenizerFast.save_pretrained writes for this
    tokenizer, produced without transformers so that llmd-sim can build the same tokenizer in the
    workspace environment.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="$A", pair="$A $B:1", special_tokens=[]
    )
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "backend": "tokenizers",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "model_max_length": MAX_POSITIONS,
        "pad_token": "</s>",
        "tokenizer_class": "TokenizersBackend",
        "unk_token": "<unk>",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)


def build_model(out: Path, vocab_size: int, bos: int, eos: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=eos,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(str(out), safe_serialization=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    args = parser.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out)
    vocab = json.loads((out / "tokenizer.json").read_text())["model"]["vocab"]
    build_model(out, vocab_size=len(vocab), bos=vocab["<s>"], eos=vocab["</s>"])
    print(f"tiny model written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
