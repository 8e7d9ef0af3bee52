"""Weight-tensor shapes of real models, built from their architectures (no downloads)."""

from __future__ import annotations


def resnet50() -> list[tuple[int, ...]]:
    """Conv and fc weights of torchvision's ResNet-50 (25.5M weights in 54 tensors)."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7)]
    inplanes = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for block in range(blocks):
            shapes += [(width, inplanes, 1, 1), (width, width, 3, 3), (4 * width, width, 1, 1)]
            if block == 0:
                shapes.append((4 * width, inplanes, 1, 1))  # downsample
            inplanes = 4 * width
    shapes.append((1000, 2048))
    return shapes


def bert_base() -> list[tuple[int, ...]]:
    """Linear weights of BERT-base's 12 encoder layers plus the pooler (85M weights)."""
    hidden, inter = 768, 3072
    layer = [(hidden, hidden)] * 4 + [(inter, hidden), (hidden, inter)]
    return layer * 12 + [(hidden, hidden)]


def llama_7b() -> list[tuple[int, ...]]:
    """Linear weights of LLaMA-7B's 32 decoder layers plus lm_head (6.7e9 weights)."""
    hidden, inter, vocab = 4096, 11008, 32000
    layer = [(hidden, hidden)] * 4 + [(inter, hidden)] * 2 + [(hidden, inter)]
    return layer * 32 + [(vocab, hidden)]


MODELS = {"resnet50": resnet50, "bert_base": bert_base, "llama_7b": llama_7b}
