"""Export a training run to a verified, self-describing ONNX file, and build a Space folder."""
