"""Build what the README's quick start runs on, locally: a trained image classifier in the Hugging
Face cache layout (as ``hf:acme/resnet-digits`` after a download would be) and folders of images.

    python -m fxcompress.examples.quickstart /tmp/qs         # writes /tmp/qs/hf_home and /tmp/qs/digits/{train,val}
    export HF_HOME=/tmp/qs/hf_home HF_HUB_OFFLINE=1
    fxcompress compile hf:acme/resnet-digits --recipe int8 --calibration /tmp/qs/digits/train \\
        --calibration-size 128 --eval /tmp/qs/digits/val --out resnet-digits-int8/

The images are scikit-learn's handwritten digits (8x8, shipped with the package) drawn at 32x32 as
PNGs in one folder per class; the model is a small transformers ``ResNetForImageClassification``
(four stages, 16-128 channels) trained here for a few epochs on the train folder through the same
image processor that is saved beside it. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

REPO = "acme/resnet-digits"
REVISION = "5f0c3e1a9b7d2c4e6f8a0b1c3d5e7f9a1b3c5d7e"  # any 40 hex digits: the cache's snapshot folder name


def write_images(root: Path, train_count: int = 1400) -> tuple[Path, Path]:
    """The digits as 32x32 RGB PNGs: ``root/train/<digit>/`` (first ``train_count``) and ``root/val/<digit>/``."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for index, (image, label) in enumerate(zip(digits.images, digits.target)):
        split = "train" if index < train_count else "val"
        folder = root / split / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (image / 16.0 * 255).astype(np.uint8)
        Image.fromarray(pixels, "L").resize((32, 32), Image.BILINEAR).convert("RGB").save(folder / f"{index:04d}.png")
    return root / "train", root / "val"


def train_model(snapshot: Path, train: Path, epochs: int = 6) -> None:
    """A small ResNet trained on the train folder, saved with its image processor into ``snapshot``."""
    from PIL import Image
    from transformers import ResNetConfig, ResNetForImageClassification, ViTImageProcessor

    labels = [str(d) for d in range(10)]
    processor = ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    files = sorted(train.glob("*/*.png"))
    pixels = processor(images=[Image.open(f).convert("RGB") for f in files], return_tensors="pt")["pixel_values"]
    targets = torch.tensor([labels.index(f.parent.name) for f in files])
    config = ResNetConfig(num_channels=3, embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                          layer_type="basic", downsample_in_first_stage=False, num_labels=10,
                          id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
    torch.manual_seed(0)
    model = ResNetForImageClassification(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(files))
        for start in range(0, len(files), 64):
            batch = order[start:start + 64]
            loss = model(pixel_values=pixels[batch], labels=targets[batch]).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        print(f"epoch {epoch + 1}: loss {loss.item():.3f}")
    model.eval().save_pretrained(snapshot)
    processor.save_pretrained(snapshot)


def main(argv: list[str] | None = None) -> None:
    """Build the quick start's model and image folders under the folder named on the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="an empty folder to build in")
    parser.add_argument("--epochs", type=int, default=6, help="training epochs (6: about 92%% top-1 on val)")
    args = parser.parse_args(argv)
    train, val = write_images(args.root / "digits")
    repo = args.root / "hf_home" / "hub" / f"models--{REPO.replace('/', '--')}"
    snapshot = repo / "snapshots" / REVISION
    train_model(snapshot, train, epochs=args.epochs)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(REVISION)
    print(json.dumps({"HF_HOME": str(args.root / "hf_home"), "model": f"hf:{REPO}", "train": str(train), "val": str(val)}))


if __name__ == "__main__":
    main()
