"""Backbones map images (B x C x H x W) to embeddings (B x embedding_dim)."""
