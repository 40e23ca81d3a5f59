"""Make the tiny random checkpoints that ship in the package: an OPT (with its 512-token byte-level BPE), a
GPT-Neo with a local attention window shorter than the test prompts, and that GPT-Neo in bitsandbytes 4-bit.

    python scripts/make_tiny_model.py                      # the three that ship, into neuron/assets/
    python scripts/make_tiny_model.py --kind gpt-neo-8bit --out /tmp/x   # 8-bit: made by the tests, not shipped

Weights come from fixed seeds, so a rerun rewrites the same files. The 4-bit and 8-bit ones need the
`quantized` extra (bitsandbytes, accelerate); the others do not.
"""

import argparse
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GPTNeoConfig, GPTNeoForCausalLM, OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast

SEED = 1234
VOCAB = 512
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]  # ids 0..3, as OPT numbers bos/pad/eos
ASSETS = Path(__file__).resolve().parent.parent / "neuron" / "assets"
# The GPT-Neo's local layers attend to the last WINDOW positions only: shorter than every prompt the tests send,
# so each test runs past the window (GPT-Neo 1.3B: 256, alternating global and local layers, as here).
WINDOW = 4
# Where each kind goes by default, under neuron/assets/ (the names `load_model` knows).
NAMES = {"opt": "tiny", "gpt-neo": "tiny-gpt-neo", "gpt-neo-4bit": "tiny-gpt-neo-4bit"}
KINDS = [*NAMES, "gpt-neo-8bit"]


def train_tokenizer(corpus: Path) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodes: no <unk> in practice
        show_progress=False,
    )
    tok.train([str(corpus)], trainer)
    # OPT prepends its bos to every sequence; keep the same convention.
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return wrap(tok)


def wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    # padding_side must be given to the constructor: set afterwards it is not saved.
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", padding_side="left", model_max_length=256)


def make_opt(tokenizer: PreTrainedTokenizerFast) -> OPTForCausalLM:
    config = OPTConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        ffn_dim=256,
        num_attention_heads=4,
        max_position_embeddings=256,
        word_embed_proj_dim=64,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        dropout=0.0,
        attention_dropout=0.0,
    )
    torch.manual_seed(SEED)
    # A larger init than OPT's 0.02 so the random model's next-token distributions are not
    # near-uniform: checks that compare distributions then have something to compare.
    config.init_std = 0.3
    return OPTForCausalLM(config).eval()


def make_gpt_neo(tokenizer: PreTrainedTokenizerFast) -> GPTNeoForCausalLM:
    """GPT-Neo 1.3B's shape in miniature: global and local layers alternating, tied embeddings."""
    config = GPTNeoConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_layers=2,
        attention_types=[[["global", "local"], 1]],
        num_heads=4,
        intermediate_size=256,
        window_size=WINDOW,
        max_position_embeddings=256,
        initializer_range=0.3,  # as the tiny OPT: distributions with something to compare
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(SEED)
    return GPTNeoForCausalLM(config).eval()


def quantize(source: Path, out: Path, bits: int) -> torch.nn.Module:
    """`source` loaded through bitsandbytes (4-bit: NF4, float32 compute, as a CPU serves it; or 8-bit) and saved
    pre-quantized, as the published GPT-Neo 1.3B 4-bit checkpoints are: its config.json carries the
    quantization_config."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bnb = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
           if bits == 4 else BitsAndBytesConfig(load_in_8bit=True))
    model = AutoModelForCausalLM.from_pretrained(source, quantization_config=bnb, dtype=torch.float32,
                                                 device_map={"": "cpu"})
    model.save_pretrained(out)
    return model


def save(model, tokenizer: PreTrainedTokenizerFast, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out)
    model.save_pretrained(out)
    model.generation_config.save_pretrained(out)


def make(kind: str, out: Path, corpus: Path) -> Path:
    """Write the `kind` checkpoint into `out`; the GPT-Neo ones reuse the tiny OPT's tokenizer."""
    if kind == "opt":
        tokenizer = train_tokenizer(corpus)
        save(make_opt(tokenizer), tokenizer, out)
    else:
        tokenizer = wrap(Tokenizer.from_file(str(ASSETS / "tiny" / "tokenizer.json")))
        if kind == "gpt-neo":
            save(make_gpt_neo(tokenizer), tokenizer, out)
        elif kind in ("gpt-neo-4bit", "gpt-neo-8bit"):
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                save(make_gpt_neo(tokenizer), tokenizer, Path(tmp))
                model = quantize(Path(tmp), out, 4 if kind == "gpt-neo-4bit" else 8)
            tokenizer.save_pretrained(out)
            model.generation_config.save_pretrained(out)
        else:
            raise ValueError(f"unknown kind {kind!r}: expected one of {', '.join(KINDS)}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", choices=[*KINDS, "all"], default="all", help="all: the three that ship")
    parser.add_argument("--corpus", type=Path, default=ASSETS / "corpus.txt")
    parser.add_argument("--out", type=Path, help="output directory (one kind only; needed for gpt-neo-8bit); default "
                        "neuron/assets/<name>")
    args = parser.parse_args()
    kinds = list(NAMES) if args.kind == "all" else [args.kind]
    if args.out is not None and len(kinds) > 1:
        parser.error("--out takes one --kind")
    if args.out is None and args.kind not in NAMES and args.kind != "all":
        parser.error(f"{args.kind} does not ship: give --out")
    for kind in kinds:
        out = make(kind, args.out or ASSETS / NAMES[kind], args.corpus)
        size = sum(p.stat().st_size for p in out.iterdir())
        print(f"{kind}: {size // 1024} KiB in {out}")


if __name__ == "__main__":
    main()
