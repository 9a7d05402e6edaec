"""The paper's networks: frozen ViT features, segmenter head, MAE inpainter, projected D."""
