"""Metrics the field reports, computed from weights the user names (nothing is downloaded):
rFID / FID and IS on the FID Inception-v3, LPIPS on VGG16 / AlexNet, SSIM, PSNR, and the streaming
statistics that make them exact across ranks."""

from vqmodels.metrics.stats import (
    GaussianStats,
    bits_per_image,
    entropy_bits,
    frechet_distance,
    inception_score,
    load_reference,
    psnr,
    reference_meta,
    ssim,
    to_uint8,
)

__all__ = ["GaussianStats", "bits_per_image", "entropy_bits", "frechet_distance", "inception_score",
           "load_reference", "psnr", "reference_meta", "ssim", "to_uint8"]
