"""The classifier's architecture and pooling names, importable without torch (the CLI parser needs them)."""

ARCHITECTURES = ("compact", "resnet18", "resnet34")
POOLINGS = ("avg", "max", "topk", "lse")
