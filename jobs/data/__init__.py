"""Data pipeline: WebDataset shards in object storage - make, check, stream.

Torch-free modules (safe for the CLI/service): `storage`, `manifest`, `tario`, `shards`, `check`.
Torch modules (training jobs only): `stream`, `loader` (`make_image_loader`), `tokens`
(`TokenShardWriter`, `make_token_loader`). Nothing is imported here eagerly, so `import jobs.data.shards`
never pulls in torch.
"""
