"""Models and data as users have them, built locally for the front-door tests (no downloads).

Each builder writes into a folder and returns its path: transformers models saved with
``save_pretrained`` beside a real tokenizer (a word-piece vocabulary trained with ``tokenizers``
on Python's own ``pydoc_data.topics``) or image processor, a timm checkpoint, a folder of drawn
images in class subfolders, a text file, and a ``datasets`` folder saved with ``save_to_disk``.
The models are tiny (a few thousand parameters) so the CLI runs on them in seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

LABELS = ["red", "blue"]


class _IgnoresItsSecondInput(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, unused: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.linear(x))


def unused_input():
    """A model whose forward() takes an argument it never reads (factory spec for the CLI)."""
    torch.manual_seed(0)
    return _IgnoresItsSecondInput().eval(), (torch.randn(1, 4), torch.randn(1, 2))


def corpus_lines(count: int = 400) -> list[str]:
    """Sentences of Python's documentation (ships with CPython), in a fixed order."""
    from pydoc_data.topics import topics

    lines = []
    for key in sorted(topics):
        for line in topics[key].splitlines():
            line = line.strip()
            if 30 < len(line) < 160 and not line.startswith(("*", "=", "-", ">>>")):
                lines.append(line)
    return lines[:count] if count else lines


def train_tokenizer(folder: Path, *, causal: bool = False):
    """A word-piece tokenizer trained on the documentation text, saved into ``folder``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer.train_from_iterator(corpus_lines(2000), trainers.WordPieceTrainer(vocab_size=300, special_tokens=specials))
    if not causal:
        cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
        tokenizer.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=32,
                                   **({"eos_token": "[SEP]", "bos_token": "[CLS]"} if causal else {}))
    if causal:
        fast.model_input_names = ["input_ids", "attention_mask"]
    fast.save_pretrained(folder)
    return fast


def bert_classifier(folder: Path) -> Path:
    """A 2-layer, 32-wide BERT sentence classifier (labels red/blue) and its tokenizer."""
    from transformers import BertConfig, BertForSequenceClassification

    tokenizer = train_tokenizer(folder)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=2,
                        id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)})
    torch.manual_seed(0)
    BertForSequenceClassification(config).eval().save_pretrained(folder)
    return folder


def bert_encoder(folder: Path) -> Path:
    """A 1-layer BERT without a head (feature extraction), with its tokenizer."""
    from transformers import BertConfig, BertModel

    tokenizer = train_tokenizer(folder)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, architectures=["BertModel"])
    torch.manual_seed(0)
    BertModel(config).eval().save_pretrained(folder)
    return folder


def vit_classifier(folder: Path) -> Path:
    """A 1-layer ViT on 32x32 images (labels red/blue) with its image processor."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64, num_labels=2, id2label=dict(enumerate(LABELS)),
                       label2id={n: i for i, n in enumerate(LABELS)})
    torch.manual_seed(0)
    ViTForImageClassification(config).eval().save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def llama(folder: Path) -> Path:
    """A 1-layer, 32-wide Llama causal LM with its tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = train_tokenizer(folder, causal=True)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).eval().save_pretrained(folder)
    return folder


def timm_checkpoint(path: Path, num_classes: int = 2) -> Path:
    """timm's ``test_resnet`` (370k parameters) with ``num_classes`` outputs, saved as safetensors."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=num_classes)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def image_folder(folder: Path, per_class: int = 3, size: int = 40) -> Path:
    """Class subfolders ``red/`` and ``blue/`` of PNGs: a disc of that colour on grey noise."""
    from PIL import Image, ImageDraw

    generator = torch.Generator().manual_seed(0)
    colours = {"red": (220, 30, 30), "blue": (30, 30, 220)}
    for label in LABELS:
        (folder / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            noise = (torch.rand(size, size, 3, generator=generator) * 80 + 90).to(torch.uint8).numpy()
            image = Image.fromarray(noise, "RGB")
            ImageDraw.Draw(image).ellipse((6 + i, 6, size - 6, size - 6 - i), fill=colours[label])
            image.save(folder / label / f"{label}_{i}.png")
    return folder


def text_file(path: Path, count: int = 6) -> Path:
    """``count`` lines of documentation text, one example per line."""
    path.write_text("\n".join(corpus_lines(count)) + "\n")
    return path


def jsonl_file(path: Path, count: int = 6) -> Path:
    """JSON lines with ``text`` and ``label`` (red/blue alternating)."""
    path.write_text("".join(json.dumps({"text": line, "label": LABELS[i % 2]}) + "\n"
                            for i, line in enumerate(corpus_lines(count))))
    return path


def saved_dataset(folder: Path, images: Path | None = None) -> Path:
    """A ``datasets`` folder (save_to_disk): ``text`` and ``label`` columns, plus ``image`` when
    an image folder is given."""
    import datasets

    if images is not None:
        files = sorted(images.glob("*/*.png"))
        from PIL import Image

        data = datasets.Dataset.from_dict({"image": [Image.open(f) for f in files],
                                           "label": [LABELS.index(f.parent.name) for f in files]},
                                          features=datasets.Features({"image": datasets.Image(),
                                                                      "label": datasets.ClassLabel(names=LABELS)}))
    else:
        lines = corpus_lines(6)
        data = datasets.Dataset.from_dict({"text": lines, "label": [i % 2 for i in range(len(lines))]})
    data.save_to_disk(str(folder))
    return folder
