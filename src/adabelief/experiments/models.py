"""Compact model definitions for the experiments.

* :class:`DigitsCNN` - a small CNN for 8x8 digits (also the FID feature network of the GAN task).
* :func:`vgg11`, :func:`resnet34`, :func:`densenet121` - CIFAR-10 variants of the paper's models
  (32x32 inputs: 3x3 stem, no initial pooling).
* :class:`LSTMLanguageModel` - embedding, stacked LSTM, tied or untied decoder.
* :class:`TransformerLanguageModel` - a small causal (decoder-only) pre-norm Transformer.
* :class:`MLPGenerator`, :class:`MLPCritic` - 2-D GAN networks; :class:`DCGANGenerator`,
  :class:`DCGANDiscriminator` - a small DCGAN for 8x8 images.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

#: Per-layer ``(h, c)`` state of :class:`LSTMLanguageModel`.
LSTMState = list[tuple[torch.Tensor, torch.Tensor]]

__all__ = [
    "DCGANDiscriminator",
    "DCGANGenerator",
    "DigitsCNN",
    "LSTMLanguageModel",
    "LSTMState",
    "MLPCritic",
    "MLPGenerator",
    "TransformerLanguageModel",
    "build_classifier",
    "densenet121",
    "resnet34",
    "vgg11",
]


class DigitsCNN(nn.Module):
    """Three 3x3 conv layers and a two-layer head for ``(N, 1, 8, 8)`` inputs.

    :meth:`features` returns the penultimate ``feature_dim`` activations.
    """

    def __init__(self, num_classes: int = 10, width: int = 16, feature_dim: int = 64) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * width * 4, feature_dim),
            nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer activations."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


_VGG11 = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG(nn.Module):
    """VGG with batch norm for 32x32 inputs (configuration given as channels / ``"M"`` pools)."""

    def __init__(self, config: tuple[int | str, ...], num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                assert isinstance(item, int)
                layers += [nn.Conv2d(channels, item, 3, padding=1), nn.BatchNorm2d(item), nn.ReLU()]
                channels = item
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def vgg11(num_classes: int = 10) -> nn.Module:
    """VGG11 with batch norm (CIFAR variant)."""
    return VGG(_VGG11, num_classes)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a (projected when needed) identity shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet of basic blocks for 32x32 inputs."""

    def __init__(self, blocks: tuple[int, ...], num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(3, 64, 3, 1, 1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(),
        ]
        cin = 64
        for stage, count in enumerate(blocks):
            cout = 64 * 2**stage
            for i in range(count):
                layers.append(BasicBlock(cin, cout, 2 if stage > 0 and i == 0 else 1))
                cin = cout
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


def resnet34(num_classes: int = 10) -> nn.Module:
    """ResNet34 (blocks 3-4-6-3, CIFAR variant)."""
    return ResNet((3, 4, 6, 3), num_classes)


class DenseLayer(nn.Module):
    """Bottleneck dense layer: BN-ReLU-1x1 conv (4k) then BN-ReLU-3x3 conv (k); concatenates."""

    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.BatchNorm2d(cin),
            nn.ReLU(),
            nn.Conv2d(cin, 4 * growth, 1, bias=False),
            nn.BatchNorm2d(4 * growth),
            nn.ReLU(),
            nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.net(x)], dim=1)


class DenseNet(nn.Module):
    """DenseNet-BC for 32x32 inputs (transitions halve channels and resolution)."""

    def __init__(self, blocks: tuple[int, ...], growth: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        channels = 2 * growth
        layers: list[nn.Module] = [nn.Conv2d(3, channels, 3, padding=1, bias=False)]
        for index, count in enumerate(blocks):
            for _ in range(count):
                layers.append(DenseLayer(channels, growth))
                channels += growth
            if index < len(blocks) - 1:
                reduced = channels // 2
                layers += [
                    nn.BatchNorm2d(channels),
                    nn.ReLU(),
                    nn.Conv2d(channels, reduced, 1, bias=False),
                    nn.AvgPool2d(2),
                ]
                channels = reduced
        layers += [nn.BatchNorm2d(channels), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


def densenet121(num_classes: int = 10) -> nn.Module:
    """DenseNet121 (blocks 6-12-24-16, growth 32, CIFAR variant)."""
    return DenseNet((6, 12, 24, 16), 32, num_classes)


def build_classifier(name: str, num_classes: int = 10) -> nn.Module:
    """Classifier by name: ``digits-cnn``, ``vgg11``, ``resnet34`` or ``densenet121``."""
    builders = {
        "digits-cnn": lambda: DigitsCNN(num_classes),
        "vgg11": lambda: vgg11(num_classes),
        "resnet34": lambda: resnet34(num_classes),
        "densenet121": lambda: densenet121(num_classes),
    }
    if name not in builders:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(builders)}")
    return builders[name]()


class LSTMLanguageModel(nn.Module):
    """Embedding, ``layers`` stacked LSTMs with dropout between them, linear decoder.

    With ``tie_weights`` the last LSTM layer has ``embedding_dim`` units and the decoder shares the
    embedding matrix (as in AWD-LSTM).
    """

    def __init__(
        self,
        vocab_size: int,
        embedding_dim: int,
        hidden_dim: int,
        layers: int,
        dropout: float = 0.0,
        tie_weights: bool = False,
    ) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embedding_dim)
        sizes = [embedding_dim] + [hidden_dim] * (layers - 1)
        sizes.append(embedding_dim if tie_weights else hidden_dim)
        self.lstms = nn.ModuleList(
            nn.LSTM(sizes[i], sizes[i + 1], batch_first=True) for i in range(layers)
        )
        self.dropout = nn.Dropout(dropout)
        self.decoder = nn.Linear(sizes[-1], vocab_size)
        if tie_weights:
            self.decoder.weight = self.embedding.weight

    def forward(
        self, tokens: torch.Tensor, state: LSTMState | None = None
    ) -> tuple[torch.Tensor, LSTMState]:
        """Logits ``(batch, time, vocab)`` and the new per-layer ``(h, c)`` state."""
        x = self.dropout(self.embedding(tokens))
        new_state: LSTMState = []
        for i, lstm in enumerate(self.lstms):
            x, layer_state = lstm(x, None if state is None else state[i])
            new_state.append(layer_state)
            x = self.dropout(x)
        return self.decoder(x), new_state


class TransformerLanguageModel(nn.Module):
    """Token and learned position embeddings, ``layers`` pre-norm Transformer blocks with a
    causal mask, a final layer norm, and a decoder tied to the token embedding.

    Inputs are ``(batch, time)`` token ids with ``time <= context``; outputs are logits
    ``(batch, time, vocab)``.
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        heads: int,
        layers: int,
        ff_dim: int,
        context: int,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.context = context
        self.embedding = nn.Embedding(vocab_size, d_model)
        self.position = nn.Embedding(context, d_model)
        block = nn.TransformerEncoderLayer(
            d_model, heads, ff_dim, dropout, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.decoder = nn.Linear(d_model, vocab_size, bias=False)
        self.decoder.weight = self.embedding.weight
        self.dropout = nn.Dropout(dropout)
        self.register_buffer(
            "causal_mask", nn.Transformer.generate_square_subsequent_mask(context), persistent=False
        )
        # Small embeddings (std 0.02, as in GPT-2): the tied decoder then starts near uniform.
        nn.init.normal_(self.embedding.weight, std=0.02)
        nn.init.normal_(self.position.weight, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.size(1)
        positions = torch.arange(length, device=tokens.device)
        x = self.dropout(self.embedding(tokens) + self.position(positions))
        mask: torch.Tensor = self.causal_mask[:length, :length]  # type: ignore[index]
        x = self.blocks(x, mask=mask, is_causal=True)
        return self.decoder(self.norm(x))


class MLPGenerator(nn.Module):
    """Noise ``(N, noise_dim)`` to 2-D points through ``depth`` ReLU layers."""

    def __init__(self, noise_dim: int = 16, hidden: int = 128, depth: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = noise_dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, 2))
        self.net = nn.Sequential(*layers)
        self.noise_dim = noise_dim

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class MLPCritic(nn.Module):
    """2-D points to one score (critic of WGAN-GP or logit of a standard GAN)."""

    def __init__(self, hidden: int = 128, depth: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = 2
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.LeakyReLU(0.2)]
            width = hidden
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(1)


class DCGANGenerator(nn.Module):
    """Noise to ``(N, 1, 8, 8)`` images in ``[-1, 1]``: linear to 2x2, two stride-2 transposed convs."""

    def __init__(self, noise_dim: int = 32, width: int = 64) -> None:
        super().__init__()
        self.noise_dim = noise_dim
        self.width = width
        self.project = nn.Sequential(
            nn.Linear(noise_dim, 2 * width * 4), nn.BatchNorm1d(2 * width * 4), nn.ReLU()
        )
        self.net = nn.Sequential(
            nn.ConvTranspose2d(2 * width, width, 4, 2, 1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.ConvTranspose2d(width, 1, 4, 2, 1),
            nn.Tanh(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(self.project(z).view(-1, 2 * self.width, 2, 2))


class DCGANDiscriminator(nn.Module):
    """``(N, 1, 8, 8)`` images to one logit: two stride-2 convs and a linear layer."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, width, 4, 2, 1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 4, 2, 1),
            nn.LeakyReLU(0.2),
            nn.Flatten(),
            nn.Linear(2 * width * 4, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(1)
