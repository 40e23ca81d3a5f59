"""Make the tiny OPT that ships in the package: a 512-token byte-level BPE and random weights from a fixed seed."""

import argparse
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast

SEED = 1234
VOCAB = 512
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]  # ids 0..3, as OPT numbers bos/pad/eos


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
    # padding_side must be given to the constructor: set afterwards it is not saved.
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        padding_side="left",
        model_max_length=256,
    )


def make_model(tokenizer: PreTrainedTokenizerFast) -> OPTForCausalLM:
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


def main() -> None:
    here = Path(__file__).resolve().parent.parent
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--corpus", type=Path, default=here / "neuron/assets/corpus.txt")
    parser.add_argument("--out", type=Path, default=here / "neuron/assets/tiny")
    args = parser.parse_args()
    tokenizer = train_tokenizer(args.corpus)
    model = make_model(tokenizer)
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(args.out)
    model.save_pretrained(args.out)
    model.generation_config.save_pretrained(args.out)
    size = sum(p.stat().st_size for p in args.out.iterdir())
    print(f"tiny model: {sum(p.numel() for p in model.parameters())} parameters, {size // 1024} KiB in {args.out}")


if __name__ == "__main__":
    main()
